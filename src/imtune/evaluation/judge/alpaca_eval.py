"""AlpacaEval-style pairwise win rate of a model's outputs against a reference model, with an LLM judge.

The 805 AlpacaEval instructions ship with two reference answer sets: version "1.0" (text-davinci-003, what
AlpacaEval 1.0 compares against) and "2.0" (GPT-4-turbo, gpt-4-1106-preview, AlpacaEval 2.0's baseline).

Each instruction is judged twice, once with the model's output shown first and once with the reference first;
the instruction's score is the mean of the two outcomes (win 1, tie 0.5, loss 0), which cancels a judge's
preference for a position. The win rate is the mean score in percent, with a standard error and a bootstrap 95%
interval. Also reported: unparseable verdicts, and the position-bias rate (how often the preferred output
changed when the order was swapped).

Not the official numbers: the judge prompt is imtune's own (in the spirit of AlpacaEval's `alpaca_eval_gpt4`,
asking for "Output (a)" or "Output (b)"), and the judge is whatever model you point it at. The
length-controlled (LC) win rate of AlpacaEval 2.0 needs a GLM fitted on the judge's preferences against output
lengths; it is out of scope here, so results carry `length_controlled: False` (average output lengths are
reported so a length effect can at least be seen).
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

DATA_DIR = Path(__file__).resolve().parents[2] / "data" / "eval" / "alpaca_eval"
REFERENCES = {
    "1.0": ("text_davinci_003_outputs.json", "text-davinci-003"),
    "2.0": ("gpt4_1106_preview_outputs.json", "gpt-4-1106-preview"),
}
LENGTH_CONTROLLED_NOTE = ("length-controlled win rate not computed: it needs AlpacaEval's GLM fitted on judge "
                          "preferences against output lengths (out of scope); compare avg_output_chars instead")

SYSTEM_PROMPT = ("You are an expert evaluator of AI assistants. You compare two responses to the same "
                 "instruction and decide which one a careful, knowledgeable person would prefer.")

USER_TEMPLATE = """Two AI assistants were given the instruction below. Decide which of their outputs is better.

What matters, in order: does the output do what the instruction asks (every part of it, in any requested format or length); is it correct, without made-up facts; is it helpful, clear and well organised; is it safe. Extra length counts only when the extra content is useful. Ignore which output comes first and any names the outputs mention.

[Instruction]
{instruction}
[End of instruction]

[Output (a)]
{output_a}
[End of output (a)]

[Output (b)]
{output_b}
[End of output (b)]

Which output is better? Reply with exactly "Output (a)" or "Output (b)" and nothing else."""

VERDICT_SCORE_MODEL_FIRST = {"a": 1.0, "b": 0.0, "tie": 0.5}
VERDICT_SCORE_REFERENCE_FIRST = {"a": 0.0, "b": 1.0, "tie": 0.5}


def pairwise_messages(instruction: str, output_a: str, output_b: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": USER_TEMPLATE.format(instruction=instruction, output_a=output_a,
                                                             output_b=output_b)}]


# ------------------------------------------------------------------------------------------------ verdicts

_LABEL = r"(?:output|response|answer|assistant)\s*"
_EXACT = re.compile(rf"(?:{_LABEL})?[\(\[]?\s*([ab])\s*[\)\]]?", re.I)
_BRACKETED = re.compile(rf"\[\[\s*(?:{_LABEL})?\(?\s*([ab])\s*\)?\s*\]\]", re.I)
# Without parentheses only a capital letter counts: "answer a question" must not read as a verdict.
_MENTION = re.compile(r"(?i:output|response|assistant)\s*(?:\(\s*([abAB])\s*\)|([AB])\b)")
_TIE = re.compile(r"(?:it'?s\s+)?(?:a\s+)?(?:tie|draw|equal(?:ly good)?|both(?: are)? (?:equally )?(?:good|bad))",
                  re.I)
_FINAL = re.compile(r"(?:final\s+)?(?:verdict|answer|choice|decision|better output)\s*(?:is)?\s*[:\-]", re.I)


def _clean(s: str) -> str:
    return s.strip().strip("*_`\"'“”‘’ .!:").strip()


def parse_verdict(text: str) -> str | None:
    """'a', 'b' or 'tie' from a judge reply; None when it does not commit to one.

    Tried in order, the first that decides wins: the bare answer ("Output (b)", "(b)", "b", "**Output (a)**.");
    "[[a]]"; a "Verdict: Output (a)" / "Final answer: ..." line (the last such); lines that are nothing but a
    verdict (whether the judge answers first and explains after, or the reverse); and, for chatty judges, the
    last line that mentions exactly one of the outputs. Conflicting verdict lines, or a last mention naming
    both ("Output (a) is better than Output (b)"), are ambiguous: None rather than a guess.
    """
    if not text or not text.strip():
        return None
    # Reasoning models may echo their thinking; only what follows it is the answer.
    text = re.split(r"</think>", text, flags=re.I)[-1]
    whole = _clean(text)
    m = _EXACT.fullmatch(whole)
    if m:
        return m.group(1).lower()
    if _TIE.fullmatch(whole):
        return "tie"
    brackets = {x.lower() for x in _BRACKETED.findall(text)}
    if len(brackets) == 1:
        return brackets.pop()
    lines = [_clean(ln) for ln in text.splitlines() if _clean(ln)]
    for line in reversed(lines):
        tail = _FINAL.split(line, maxsplit=1)
        if len(tail) == 2:
            t = _clean(tail[1])
            if _TIE.match(t):
                return "tie"
            m = _EXACT.match(t)
            if m and (m.end() == len(t) or not t[m.end()].isalnum()):
                return m.group(1).lower()
    bare = {m.group(1).lower() for m in map(_EXACT.fullmatch, lines) if m}
    if bare:
        return bare.pop() if len(bare) == 1 else None
    for line in reversed(lines):
        found = {(a or b).lower() for a, b in _MENTION.findall(line)}
        if found:
            return found.pop() if len(found) == 1 else None
    return None


# ------------------------------------------------------------------------------------------------ data


@lru_cache(maxsize=4)
def _load_reference_cached(version: str) -> tuple[dict, ...]:
    if version not in REFERENCES:
        raise ImtuneError(f"unknown AlpacaEval reference {version!r}; choose one of {', '.join(REFERENCES)}")
    path = DATA_DIR / REFERENCES[version][0]
    if not path.exists():
        raise ImtuneError(f"bundled AlpacaEval reference {path} is missing (reinstall imtune)")
    with open(path, encoding="utf-8") as f:
        return tuple(json.load(f))


def load_reference(version: str = "1.0") -> list[dict]:
    """The 805 `{dataset, instruction, output, generator}` records of reference `version` ("1.0" or "2.0")."""
    return [dict(r) for r in _load_reference_cached(str(version))]


def alpaca_eval_instructions(limit: int | None = None) -> list[str]:
    """The AlpacaEval instructions in their canonical order (the first `limit` when given)."""
    instr = [r["instruction"] for r in _load_reference_cached("1.0")]
    return instr[:limit] if limit is not None else instr


def load_model_outputs(path: str | Path) -> list[dict]:
    """`{instruction, output}` records from a .json array or .jsonl file (other keys, e.g. generator, kept)."""
    from imtune.inputs import read_json_records

    path = Path(path)
    out = []
    for where, r in read_json_records(path, "records", empty_ok=True):  # one line for any unreadable input
        if not isinstance(r, dict):
            raise InputError(str(path), "expected an object with 'instruction' and 'output'", **where)
        for k in ("instruction", "output"):
            if not isinstance(r.get(k), str):
                raise InputError(str(path), f"missing or non-string '{k}'", **where)
        out.append(r)
    if not out:
        raise ImtuneError(f"{path}: no records")
    return out


def pair_with_reference(outputs: Sequence[dict], reference: str = "1.0", limit: int | None = None
                        ) -> tuple[list[dict], list[str]]:
    """Match model outputs to reference records by instruction (whitespace-trimmed), in reference order.

    Returns (pairs, missing): pairs are `{instruction, output, reference, dataset}`; missing lists the
    instructions (within the first `limit`) the outputs do not cover. Outputs for instructions outside
    AlpacaEval are an error: that is the wrong file, not a partial one.
    """
    refs = load_reference(reference)
    if limit is not None:
        if limit < 1:
            raise ImtuneError("--limit must be >= 1")
        refs = refs[:limit]
    by_instr: dict[str, dict] = {}
    for r in outputs:
        by_instr.setdefault(r["instruction"].strip(), r)
    known = {r["instruction"].strip() for r in _load_reference_cached(str(reference))}
    unknown = [k for k in by_instr if k not in known]
    if unknown:
        raise ImtuneError(f"{len(unknown)} of {len(by_instr)} output(s) answer instructions that are not in "
                          f"AlpacaEval (first: {unknown[0][:60]!r}); generate with the AlpacaEval instructions")
    pairs, missing = [], []
    for ref in refs:
        got = by_instr.get(ref["instruction"].strip())
        if got is None:
            missing.append(ref["instruction"])
            continue
        pairs.append({"instruction": ref["instruction"], "output": got["output"], "reference": ref["output"],
                      "dataset": ref.get("dataset")})
    if not pairs:
        raise ImtuneError("the outputs answer none of the selected AlpacaEval instructions")
    return pairs, missing


def generate_outputs(generate: Callable[[list[list[dict]]], list[str]], instructions: Sequence[str],
                     generator: str | None = None) -> list[dict]:
    """Model outputs for `instructions`: `generate` maps single-turn conversations to replies in order."""
    convs = [[{"role": "user", "content": instr}] for instr in instructions]
    replies = list(generate(convs))
    if len(replies) != len(convs):
        raise ImtuneError(f"generation returned {len(replies)} replies for {len(convs)} instructions")
    return [{"instruction": i, "output": o, **({"generator": generator} if generator else {})}
            for i, o in zip(instructions, replies, strict=True)]


# ------------------------------------------------------------------------------------------------ judging


@dataclass
class AlpacaEvalResult:
    summary: dict
    annotations: list[dict] = field(default_factory=list)

    @property
    def win_rate(self) -> float | None:
        return self.summary["win_rate"]

    def format(self) -> str:
        s = self.summary
        if s["win_rate"] is None:
            return f"win rate vs {s['reference_generator']}: no parseable verdicts ({s['n_unparseable']})"
        lo, hi = s["ci95"]
        return (f"win rate vs {s['reference_generator']} (AlpacaEval {s['reference']} reference): "
                f"{s['win_rate']:.1f}% ± {s['standard_error']:.1f} (95% CI {lo:.1f}–{hi:.1f}), "
                f"n={s['n_scored']}/{s['n']}; W/T/L {s['wins']}/{s['ties']}/{s['losses']}; "
                f"unparseable verdicts {s['n_unparseable']}; position-bias rate "
                + (f"{100 * s['position_bias_rate']:.1f}%" if s["position_bias_rate"] is not None else "n/a"))


def win_rate_stats(scores: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean (percent), standard error of the mean and a percentile-bootstrap 95% interval."""
    from imtune.statistics import bootstrap_mean_ci, mean_stderr

    if len(scores) == 0:
        return {"win_rate": None, "standard_error": None, "ci95": None}
    mean, se = mean_stderr(scores)
    lo, hi = bootstrap_mean_ci(scores, n_boot=n_boot, seed=seed)
    return {"win_rate": 100 * mean, "standard_error": 100 * se, "ci95": [100 * lo, 100 * hi]}


def _judge_one(p: dict, replies: tuple[str, str] | None) -> dict:
    """The annotation of one pair: both verdicts, the score (mean of the parseable ones; None when neither
    parses) and whether the winner flipped with the order. `replies` None: identical outputs, a tie."""
    ann = {"instruction": p["instruction"], "dataset": p.get("dataset"), "output": p["output"],
           "reference": p["reference"]}
    if replies is None:
        return {**ann, "identical": True, "verdict_model_first": "tie", "verdict_reference_first": "tie",
                "score": 0.5, "flipped": None}
    v1, v2 = parse_verdict(replies[0]), parse_verdict(replies[1])
    parts = ([VERDICT_SCORE_MODEL_FIRST[v1]] if v1 is not None else []) + (
        [VERDICT_SCORE_REFERENCE_FIRST[v2]] if v2 is not None else [])
    flipped = (VERDICT_SCORE_MODEL_FIRST[v1] != VERDICT_SCORE_REFERENCE_FIRST[v2]
               if v1 is not None and v2 is not None else None)
    return {**ann, "identical": False, "verdict_model_first": v1, "verdict_reference_first": v2,
            "score": sum(parts) / len(parts) if parts else None, "flipped": flipped,
            "judge_reply_model_first": replies[0], "judge_reply_reference_first": replies[1]}


def _aggregate(annotations: list[dict], n_boot: int) -> dict:
    """Win rate and counts over the annotations (see judge_pairs)."""
    scores = [a["score"] for a in annotations if a["score"] is not None]
    judged = [a for a in annotations if not a["identical"]]
    verdicts = [v for a in judged for v in (a["verdict_model_first"], a["verdict_reference_first"])]
    decisive = [v for v in verdicts if v in ("a", "b")]
    both = [a for a in judged if a["flipped"] is not None]
    by_dataset: dict[str, list[float]] = {}
    for a in annotations:
        if a["score"] is not None:
            by_dataset.setdefault(a["dataset"] or "unknown", []).append(a["score"])
    return {
        **win_rate_stats(scores, n_boot=n_boot),
        "n": len(annotations), "n_scored": len(scores), "n_excluded": len(annotations) - len(scores),
        "n_unparseable": sum(v is None for v in verdicts), "n_judgements": len(verdicts),
        "wins": sum(s > 0.5 for s in scores), "ties": sum(s == 0.5 for s in scores),
        "losses": sum(s < 0.5 for s in scores),
        # Share of instructions (both verdicts parsed) whose winner changed when the order was swapped.
        "position_bias_rate": sum(a["flipped"] for a in both) / len(both) if both else None,
        # Share of decisive verdicts that picked whatever was shown first (0.5 = no lean).
        "first_position_rate": decisive.count("a") / len(decisive) if decisive else None,
        "by_dataset": {k: 100 * sum(v) / len(v) for k, v in sorted(by_dataset.items())},
    }


def judge_pairs(client: JudgeClient, pairs: Sequence[dict], progress: bool | None = None,
                n_boot: int = 2000) -> AlpacaEvalResult:
    """Judge each `{instruction, output, reference[, dataset]}` pair in both orders and aggregate.

    An instruction whose two verdicts are both unparseable is left out of the win rate (counted in
    `n_excluded`); with one parseable verdict, that one alone gives the score. Identical outputs are a tie
    without asking the judge. Only replies that parse as a verdict are cached.
    """
    asked = [i for i, p in enumerate(pairs) if p["output"].strip() != p["reference"].strip()]
    convs = [pairwise_messages(pairs[i]["instruction"], *shown) for i in asked
             for shown in ((pairs[i]["output"], pairs[i]["reference"]),  # model first, then reference first
                           (pairs[i]["reference"], pairs[i]["output"]))]
    replies = client.complete_many(convs, desc="AlpacaEval judging", progress=progress, parse=parse_verdict)
    got = {i: (replies[2 * k], replies[2 * k + 1]) for k, i in enumerate(asked)}
    annotations = [_judge_one(p, got.get(i)) for i, p in enumerate(pairs)]
    n = len(pairs)
    summary = {
        **_aggregate(annotations, n_boot),
        "avg_output_chars": {"model": sum(len(p["output"]) for p in pairs) / n if n else None,
                             "reference": sum(len(p["reference"]) for p in pairs) / n if n else None},
        "length_controlled": False,
        "length_controlled_note": LENGTH_CONTROLLED_NOTE,
        "judge": {"model": client.model, "temperature": client.temperature, "max_tokens": client.max_tokens,
                  "prompt": "imtune-pairwise-v1", **client.stats.as_dict()},
    }
    return AlpacaEvalResult(summary, annotations)


def evaluate_outputs(client: JudgeClient, outputs: Sequence[dict] | str | Path, reference: str = "1.0",
                     limit: int | None = None, progress: bool | None = None) -> AlpacaEvalResult:
    """Win rate of `outputs` (records or a file of `{instruction, output}`) against AlpacaEval `reference`."""
    if isinstance(outputs, (str, Path)):
        outputs = load_model_outputs(outputs)
    pairs, missing = pair_with_reference(outputs, reference, limit)
    res = judge_pairs(client, pairs, progress=progress)
    res.summary = {"benchmark": "alpaca_eval", "reference": str(reference),
                   "reference_generator": REFERENCES[str(reference)][1], "limit": limit,
                   "n_missing_outputs": len(missing), **res.summary}
    return res


def write_results(out_dir: str | Path, result: AlpacaEvalResult) -> dict[str, Path]:
    from imtune.evaluation.judge.redact import write_redacted

    return write_redacted(out_dir, {"results": ("alpaca_eval_results.json", result.summary),
                                    "annotations": ("alpaca_eval_annotations.jsonl", result.annotations)})
