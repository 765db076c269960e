"""MT-Bench single-answer grading: 80 two-turn questions, each turn rated 1-10 by an LLM judge.

Follows FastChat's llm_judge: turn 1 is graded with `single-v1` (or `single-math-v1`, which shows GPT-4's
reference answer, for the math, reasoning and coding categories), turn 2 with the `-multi-turn` variants, which
show the whole two-turn conversation and ask about the second answer. Ratings are read from "[[rating]]".
Reported: mean per turn, per category (both turns), overall, and how many replies had no usable rating (left out
of the means, as FastChat does).

Answers are generated the FastChat way: turn 1, then turn 2 with the model's own turn-1 answer in context.
Unlike FastChat, imtune generates with one setting for all categories (whatever the generator does, greedy by
default) rather than FastChat's per-category temperatures.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from imtune.errors import ImtuneError, InputError
from imtune.evaluation.judge.client import JudgeClient

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "eval" / "mt_bench"
NEED_REF_CATS = frozenset({"math", "reasoning", "coding"})
CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")

_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_RATING_BACKUP = re.compile(r"\[\s*(\d+(?:\.\d+)?)\s*\]")


@lru_cache(maxsize=1)
def _questions() -> tuple[dict, ...]:
    return tuple(_read_jsonl(DATA_DIR / "question.jsonl"))


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        raise ImtuneError(f"bundled MT-Bench file {path} is missing (reinstall imtune)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_questions(limit: int | None = None) -> list[dict]:
    """`{question_id, category, turns: [q1, q2]}` in file order (the first `limit` when given)."""
    qs = [dict(q) for q in _questions()]
    if limit is not None:
        if limit < 1:
            raise ImtuneError("--limit must be >= 1")
        qs = qs[:limit]
    return qs


@lru_cache(maxsize=1)
def load_reference_answers() -> dict[int, list[str]]:
    """question_id -> GPT-4's two reference turns (math, reasoning and coding questions only)."""
    return {r["question_id"]: list(r["choices"][0]["turns"])
            for r in _read_jsonl(DATA_DIR / "reference_answer_gpt-4.jsonl")}


@lru_cache(maxsize=1)
def load_judge_prompts() -> dict[str, dict]:
    return {p["name"]: p for p in _read_jsonl(DATA_DIR / "judge_prompts.jsonl")}


def load_answers(path: str | Path) -> dict[int, list[str]]:
    """question_id -> answer turns, from `{question_id, turns: [a1, a2]}` records (.jsonl or a .json array);
    FastChat's own answer files (`{question_id, choices: [{turns: [...]}]}`) are accepted too."""
    from imtune.inputs import read_json_records

    known = {q["question_id"] for q in _questions()}
    out: dict[int, list[str]] = {}
    for where, r in read_json_records(path, "answers"):  # one line naming file + line for any unreadable input
        if not isinstance(r, dict) or "question_id" not in r:
            raise InputError(str(path), "expected an object with 'question_id' and 'turns'", **where)
        turns = r.get("turns")
        if turns is None and isinstance(r.get("choices"), list) and r["choices"] and isinstance(r["choices"][0], dict):
            turns = r["choices"][0].get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
            raise InputError(str(path), "'turns' must be a non-empty list of strings", **where)
        try:
            qid = int(r["question_id"])
        except (TypeError, ValueError, OverflowError):
            raise InputError(str(path), f"bad question_id {r['question_id']!r}", **where) from None
        if qid not in known:
            raise InputError(str(path), f"question_id {qid} is not an MT-Bench question", **where)
        out[qid] = list(turns)
    if not out:
        raise ImtuneError(f"{path}: no answers")
    return out


def generate_answers(generate: Callable[[list[list[dict]]], list[str]], questions: Sequence[dict]
                     ) -> list[dict]:
    """Two passes: all first turns, then all second turns with the model's own first answer in context.

    `generate` maps conversations (lists of `{role, content}` ending with a user turn) to replies, in order.
    """
    convs1 = [[{"role": "user", "content": q["turns"][0]}] for q in questions]
    a1 = list(generate(convs1))
    if len(a1) != len(convs1):
        raise ImtuneError(f"generation returned {len(a1)} replies for {len(convs1)} questions")
    convs2 = [c + [{"role": "assistant", "content": a}, {"role": "user", "content": q["turns"][1]}]
              for c, a, q in zip(convs1, a1, questions, strict=True)]
    a2 = list(generate(convs2))
    if len(a2) != len(convs2):
        raise ImtuneError(f"generation returned {len(a2)} replies for {len(convs2)} questions")
    return [{"question_id": q["question_id"], "category": q["category"], "turns": [x, y]}
            for q, x, y in zip(questions, a1, a2, strict=True)]


def judge_messages(question: dict, answer_turns: Sequence[str], turn: int,
                   references: dict[int, list[str]] | None = None) -> tuple[str, list[dict]]:
    """(prompt name, chat messages) that grade `turn` (1 or 2) of an answer, exactly as FastChat builds them."""
    prompts = load_judge_prompts()
    refs = load_reference_answers() if references is None else references
    ref = refs.get(question["question_id"]) if question["category"] in NEED_REF_CATS else None
    if question["category"] in NEED_REF_CATS and ref is None:
        raise ImtuneError(f"no reference answer for MT-Bench question {question['question_id']}")
    name = ("single-math-v1" if ref is not None else "single-v1") + ("-multi-turn" if turn == 2 else "")
    p = prompts[name]
    if turn == 1:
        kw = {"question": question["turns"][0], "answer": answer_turns[0]}
        if ref is not None:
            kw["ref_answer_1"] = ref[0]
    elif turn == 2:
        kw = {"question_1": question["turns"][0], "question_2": question["turns"][1],
              "answer_1": answer_turns[0], "answer_2": answer_turns[1]}
        if ref is not None:
            kw.update(ref_answer_1=ref[0], ref_answer_2=ref[1])
    else:
        raise ValueError(f"turn must be 1 or 2, not {turn}")
    return name, [{"role": "system", "content": p["system_prompt"]},
                  {"role": "user", "content": p["prompt_template"].format(**kw)}]


def parse_rating(text: str) -> float | None:
    """The judge's 1-10 rating: the last "[[x]]" (FastChat's "[x]" as a fallback); None if absent or out of
    range. The last match, because a judge may quote the format example before giving its own rating."""
    if not text:
        return None
    found = _RATING.findall(text) or _RATING_BACKUP.findall(text)
    if not found:
        return None
    value = float(found[-1])
    return value if 1 <= value <= 10 else None


@dataclass
class MTBenchResult:
    summary: dict
    judgements: list[dict] = field(default_factory=list)

    @property
    def overall(self) -> float | None:
        return self.summary["overall"]

    def format(self) -> str:
        s = self.summary

        def f(x):
            return "n/a" if x is None else f"{x:.2f}"

        cats = ", ".join(f"{k} {f(v)}" for k, v in s["per_category"].items())
        return (f"MT-Bench: overall {f(s['overall'])} (turn 1 {f(s['per_turn'].get('1'))}, turn 2 "
                f"{f(s['per_turn'].get('2'))}), {s['n_rated']}/{s['n_judgements']} rated, "
                f"unparseable {s['n_unparseable']}\n  per category: {cats}")


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def grade(client: JudgeClient, answers: dict[int, Sequence[str]], questions: Sequence[dict] | None = None,
          progress: bool | None = None) -> MTBenchResult:
    """Grade every available turn of `answers` (question_id -> turns) for `questions` (default: all 80).

    A question without an answer is skipped (counted in `n_missing`); one with a single answer turn is graded
    on turn 1 only.
    """
    questions = list(questions) if questions is not None else load_questions()
    jobs, convs = [], []
    missing = []
    for q in questions:
        turns = answers.get(q["question_id"])
        if not turns:
            missing.append(q["question_id"])
            continue
        for t in (1, 2):
            if len(turns) < t:
                continue
            name, msgs = judge_messages(q, turns, t)
            jobs.append((q, t, name, turns[t - 1]))
            convs.append(msgs)
    if not convs:
        raise ImtuneError("no answers for the selected MT-Bench questions")
    replies = client.complete_many(convs, desc="MT-Bench judging", progress=progress, parse=parse_rating)

    judgements = []
    per_turn: dict[str, list[float]] = {}
    per_cat: dict[str, list[float]] = {}
    per_cat_turn: dict[str, dict[str, list[float]]] = {}
    n_unparseable = 0
    for (q, t, name, ans), reply in zip(jobs, replies, strict=True):
        score = parse_rating(reply)
        judgements.append({"question_id": q["question_id"], "category": q["category"], "turn": t,
                           "judge_prompt": name, "answer": ans, "score": score, "judge_reply": reply})
        if score is None:
            n_unparseable += 1
            continue
        per_turn.setdefault(str(t), []).append(score)
        per_cat.setdefault(q["category"], []).append(score)
        per_cat_turn.setdefault(q["category"], {}).setdefault(str(t), []).append(score)

    all_scores = [s for v in per_turn.values() for s in v]
    order = [c for c in CATEGORIES if c in per_cat] + sorted(c for c in per_cat if c not in CATEGORIES)
    summary = {
        "benchmark": "mt_bench",
        "overall": _mean(all_scores),
        "per_turn": {k: _mean(v) for k, v in sorted(per_turn.items())},
        "per_category": {c: _mean(per_cat[c]) for c in order},
        "per_category_turn": {c: {k: _mean(v) for k, v in sorted(per_cat_turn[c].items())} for c in order},
        "n_questions": len(questions) - len(missing),
        "n_missing": len(missing),
        "n_judgements": len(convs),
        "n_rated": len(all_scores),
        "n_unparseable": n_unparseable,
        "judge": {"model": client.model, "temperature": client.temperature, "max_tokens": client.max_tokens,
                  **client.stats.as_dict()},
    }
    return MTBenchResult(summary, judgements)


def write_results(out_dir: str | Path, result: MTBenchResult) -> dict[str, Path]:
    from imtune.evaluation.judge.redact import write_redacted

    return write_redacted(out_dir, {"results": ("mt_bench_results.json", result.summary),
                                    "judgements": ("mt_bench_judgements.jsonl", result.judgements)})
