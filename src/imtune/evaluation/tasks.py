"""Benchmark tasks on the bundled evaluation data: loaders, prompts, metrics and the `run_tasks` runner.

Why not lm-evaluation-harness itself? We follow its prompt formats and metrics (cited per task below) but do not
depend on it for scoring, because
  * its HF backend re-runs the shared prompt for every choice of a multiple-choice question; it reuses a forward
    pass only when all choices are single tokens (its `Collator(group_by="contexts")` keys on
    context + continuation[:-1]), so ARC, HellaSwag, PIQA or TruthfulQA pay one full context pass per choice,
    while `scoring.loglikelihood` runs each context once;
  * its tasks load HF-hub datasets (`dataset_path` in each task YAML), whereas imtune ships its evaluation data
    and must run offline from a fresh clone;
  * it is a heavy dependency (datasets, evaluate, sacrebleu, scikit-learn, ...) for what is here a few hundred
    lines.
When lm-eval is installed, tests/test_eval_tasks.py runs ARC-Easy and HellaSwag rows through it (local JSON task
YAMLs, HF backend, HellaSwag with lm-eval's own preprocessing) and checks that the requests are identical, the
per-request log-likelihoods agree to 1e-3 and acc/acc_norm are equal (passes with lm-eval 0.4.13).

Prompts are raw text even for chat-tuned models, as in the paper's lm-eval runs: no chat template is applied.
No special tokens are added, except BOS for Gemma models (lm-eval's default, see scoring.default_add_bos).

Task results are means over examples with the standard error of the mean (sample std / sqrt(n), as lm-eval);
LAMBADA perplexity is exp(-mean log-likelihood) and has no standard error here.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import difflib
import json
import math
import re
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from imtune.errors import ImtuneError
from imtune.evaluation.humaneval import GENERATION as HUMANEVAL_GENERATION
from imtune.evaluation.humaneval import run_humaneval, samples_per_problem, select_problems

DATA = Path(__file__).resolve().parent.parent / "data" / "eval"


# ----------------------------------------------------------------------------------------------------- loaders

def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


MC_FILES = {"arc_easy": "arc_easy", "arc_challenge": "arc_challenge", "piqa": "piqa", "openbookqa": "openbook_qa",
            "winogrande": "winogrande", "wsc273": "winograd_wsc", "lambada_openai": "lambada_openai",
            "hellaswag": "hellaswag_1k"}


def load_mc(name: str) -> list[dict]:
    """Rows of a bundled mc/*.jsonl file, by task name (arc_easy, ..., hellaswag) or file stem."""
    stem = MC_FILES.get(name, name)
    return _jsonl(DATA / "mc" / f"{stem}.jsonl")


def mmlu_subjects() -> list[str]:
    return sorted(p.name[: -len("_test.csv")] for p in (DATA / "mmlu" / "test").glob("*_test.csv"))


def load_mmlu(split: str = "test", subjects: Sequence[str] | None = None) -> list[dict]:
    """MMLU rows {subject, question, choices[4], answer (0-3)} from the headerless CSVs, subject by subject."""
    out = []
    for subject in subjects or mmlu_subjects():
        path = DATA / "mmlu" / split / f"{subject}_{split}.csv"
        with open(path, encoding="utf-8", newline="") as f:
            for row in csv.reader(f):
                if not row:
                    continue
                if len(row) != 6 or row[5].strip() not in "ABCD":
                    raise ValueError(f"{path}: malformed row {row!r}")
                out.append({"subject": subject, "question": row[0], "choices": row[1:5],
                            "answer": "ABCD".index(row[5].strip())})
    return out


def load_truthfulqa() -> list[dict]:
    """TruthfulQA MC rows {question, mc1: (choices, labels), mc2: (choices, labels)}."""
    with open(DATA / "truthfulqa" / "mc_task.json", encoding="utf-8") as f:
        raw = json.load(f)
    return [{"question": r["question"],
             "mc1": (list(r["mc1_targets"]), [int(v) for v in r["mc1_targets"].values()]),
             "mc2": (list(r["mc2_targets"]), [int(v) for v in r["mc2_targets"].values()])} for r in raw]


def load_gsm8k() -> list[dict]:
    """GSM8K test rows {question, answer (full solution), target (the number after '####')}."""
    rows = _jsonl(DATA / "gsm8k" / "test.jsonl")
    return [{"question": r["question"], "answer": r["answer"],
             "target": r["answer"].split("####")[-1].strip().replace(",", "")} for r in rows]


def bbh_subtasks() -> list[str]:
    return sorted(p.stem for p in (DATA / "bbh" / "bbh").glob("*.json"))


def load_bbh(subtasks: Sequence[str] | None = None) -> list[dict]:
    """BBH rows {subtask, input, target}."""
    out = []
    for sub in subtasks or bbh_subtasks():
        with open(DATA / "bbh" / "bbh" / f"{sub}.json", encoding="utf-8") as f:
            for ex in json.load(f)["examples"]:
                out.append({"subtask": sub, "input": ex["input"], "target": ex["target"]})
    return out


def load_bbh_prompt(subtask: str) -> tuple[str, list[str]]:
    """(task description, CoT exemplars 'Q: ...\\nA: Let's think step by step. ... So the answer is X.')."""
    text = (DATA / "bbh" / "cot-prompts" / f"{subtask}.txt").read_text(encoding="utf-8")
    body = text.split("-----\n", 1)[1].strip() if "-----\n" in text else text.strip()
    # Exemplars start at a line beginning with "Q: "; no exemplar answer contains a blank line.
    blocks = re.split(r"\n\n(?=Q: )", body)
    return blocks[0].strip(), [b.strip() for b in blocks[1:]]


def load_tydiqa() -> list[dict]:
    """TyDiQA-GoldP English dev rows {id, title, context, question, answers: [text, ...]} (SQuAD format)."""
    with open(DATA / "tydiqa" / "english_dev.json", encoding="utf-8") as f:
        raw = json.load(f)
    out = []
    for art in raw["data"]:
        for para in art["paragraphs"]:
            for qa in para["qas"]:
                out.append({"id": qa["id"], "title": art.get("title", ""), "context": para["context"],
                            "question": qa["question"], "answers": [a["text"] for a in qa["answers"]]})
    return out


# ----------------------------------------------------------------------------------------------------- metrics

def mc_predictions(lls: Sequence[float], lengths: Sequence[int]) -> tuple[int, int]:
    """(argmax of log-likelihoods, argmax of log-likelihood per character).

    lm-eval's acc_norm divides by `len(choice)`, the length of the choice string in characters (which equals bytes
    for ASCII text); first index wins ties, as with numpy.argmax.
    """
    best = max(range(len(lls)), key=lambda i: (lls[i], -i))
    normed = [ll / max(1, n) for ll, n in zip(lls, lengths, strict=True)]
    best_norm = max(range(len(lls)), key=lambda i: (normed[i], -i))
    return best, best_norm


def mc2_score(lls: Sequence[float], labels: Sequence[int]) -> float:
    """TruthfulQA MC2: probability mass of the true answers among all answers (lm-eval's process_results_mc2).

    Computed with log-sum-exp, which equals lm-eval's exp/sum but does not turn into 0/0 for long answers.
    """
    m = max(lls)
    mass = [math.exp(ll - m) for ll in lls]
    total = sum(mass)
    return sum(p for p, lab in zip(mass, labels, strict=True) if lab) / total


_NUM = re.compile(r"-?[$0-9.,]{2,}|-?[0-9]+")
_STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+)")


def extract_gsm8k_answer(text: str, strict: bool = False) -> str | None:
    """The final number of a GSM8K chain of thought, normalised ('1,000.' -> '1000').

    strict: only 'The answer is N' counts (lm-eval's strict-match); otherwise that pattern first, then the last
    number in the text (lm-eval's flexible-extract).
    """
    m = _STRICT.findall(text)
    if m:
        cand = m[-1]
    elif strict:
        return None
    else:
        nums = [n for n in _NUM.findall(text) if any(c.isdigit() for c in n)]
        if not nums:
            return None
        cand = nums[-1]
    return _normalise_number(cand)


def _normalise_number(s: str) -> str:
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        v = float(s)
    except ValueError:
        return s
    if math.isfinite(v) and v == int(v):
        return str(int(v))
    return repr(v)


def gsm8k_correct(prediction: str | None, target: str) -> bool:
    return prediction is not None and prediction == _normalise_number(target)


def extract_bbh_answer(text: str) -> str:
    """What follows the last 'the answer is' (any case) on its line, without the final period ('' if absent)."""
    i = text.lower().rfind("the answer is")
    if i < 0:
        return ""
    ans = text[i + len("the answer is"):].split("\n")[0].strip()
    if ans.endswith("."):
        ans = ans[:-1].strip()
    return ans


def bbh_correct(answer: str, target: str) -> bool:
    """Exact match; a letter option also matches when the model repeats the option's text ('(B) 12/25/1937')."""
    a, t = answer.strip(), target.strip()
    if a == t:
        return True
    return bool(re.fullmatch(r"\([A-Z]\)", t)) and a.startswith(t + " ")


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and the articles a/an/the, squeeze whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_f1(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = collections.Counter(p) & collections.Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_em(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n))."""
    n = len(values)
    if n == 0:
        return float("nan"), None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


# ------------------------------------------------------------------------------------------------- task table

@dataclass(frozen=True)
class TaskInfo:
    name: str
    kind: str  # "multiple_choice" | "loglikelihood" | "generate" | "code"
    metrics: tuple[str, ...]
    default_fewshot: int
    max_fewshot: int | None  # None: any number; 0: zero-shot only
    description: str
    subtasks: Callable[[], list[str]] | None = None


TASKS: dict[str, TaskInfo] = {t.name: t for t in [
    TaskInfo("arc_easy", "multiple_choice", ("acc", "acc_norm"), 0, None,
             "ARC-Easy test (2376): 'Question: ..\\nAnswer:' scored over ' <choice>'"),
    TaskInfo("arc_challenge", "multiple_choice", ("acc", "acc_norm"), 0, None, "ARC-Challenge test (1172)"),
    TaskInfo("piqa", "multiple_choice", ("acc", "acc_norm"), 0, None, "PIQA validation (1838)"),
    TaskInfo("openbookqa", "multiple_choice", ("acc", "acc_norm"), 0, None, "OpenBookQA test (500)"),
    TaskInfo("hellaswag", "multiple_choice", ("acc", "acc_norm"), 0, None,
             "HellaSwag validation, first 1000 (lm-eval preprocessing)"),
    TaskInfo("winogrande", "multiple_choice", ("acc",), 0, None,
             "Winogrande (1267), partial scoring: the option fills the blank, the shared rest is scored"),
    TaskInfo("wsc273", "multiple_choice", ("acc",), 0, None, "Winograd WSC273, partial scoring like Winogrande"),
    TaskInfo("lambada_openai", "loglikelihood", ("acc", "perplexity"), 0, 0,
             "LAMBADA (OpenAI, 5153): last word greedy-correct, and its perplexity"),
    TaskInfo("mmlu", "multiple_choice", ("acc", "acc_macro"), 0, 5,
             "MMLU test, 57 subjects (14042); dev rows as shots (mmlu@5 for 5-shot); mmlu:<subject> for one"),
    TaskInfo("truthfulqa_mc2", "multiple_choice", ("mc2",), 0, 0,
             "TruthfulQA MC2 (817): normalised probability of the true answers, lm-eval's 6-QA preamble"),
    TaskInfo("truthfulqa_mc1", "multiple_choice", ("acc",), 0, 0, "TruthfulQA MC1 (817): single true answer"),
    TaskInfo("gsm8k", "generate", ("exact_match", "exact_match_strict"), 8, 8,
             "GSM8K test (1319), 8-shot chain of thought (Wei et al. 2022 exemplars), final number"),
    TaskInfo("bbh", "generate", ("exact_match",), 3, 3,
             "BIG-Bench Hard, 27 subtasks (6511), 3-shot CoT, answer after 'So the answer is'; bbh:<subtask>"),
    TaskInfo("tydiqa", "generate", ("f1", "exact_match"), 1, None,
             "TyDiQA-GoldP English dev (440): passage + question, SQuAD F1/EM; shots from other dev rows"),
    TaskInfo("humaneval", "code", ("pass@1",), 0, 0,
             "HumanEval (164): completions run in a sandbox; pass@k (unbiased) with --n-samples"),
]}
TASKS["mmlu"] = dataclasses.replace(TASKS["mmlu"], subtasks=mmlu_subjects)
TASKS["bbh"] = dataclasses.replace(TASKS["bbh"], subtasks=bbh_subtasks)

ALIASES = {"openbook_qa": "openbookqa", "winograd_wsc": "wsc273", "wsc": "wsc273", "lambada": "lambada_openai",
           "hellaswag_1k": "hellaswag", "truthfulqa": "truthfulqa_mc2", "tydiqa_goldp": "tydiqa",
           "arc_e": "arc_easy", "arc_c": "arc_challenge"}
GROUPS = {
    "all": list(TASKS),
    "loglikelihood": [n for n, t in TASKS.items() if t.kind in ("multiple_choice", "loglikelihood")],
    "generative": [n for n, t in TASKS.items() if t.kind in ("generate", "code")],
}


@dataclass(frozen=True)
class TaskSpec:
    """A task as requested: base name, optional subtask (mmlu:anatomy), optional few-shot override (mmlu@5)."""
    name: str
    subtask: str | None = None
    num_fewshot: int | None = None

    @property
    def label(self) -> str:
        s = self.name + (f":{self.subtask}" if self.subtask else "")
        return s + (f"@{self.num_fewshot}" if self.num_fewshot is not None else "")


def list_tasks() -> list[TaskInfo]:
    return list(TASKS.values())


def parse_tasks(tasks: str | Sequence[str]) -> list[TaskSpec]:
    """'arc_easy,mmlu@5,bbh:navigate' or a list of such names -> TaskSpecs; ImtuneError for unknown names."""
    items = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)]
    items = [t for t in items if t]
    if not items:
        raise ImtuneError("no tasks given; run 'imtune evaluate --tasks list' to see them")
    out: list[TaskSpec] = []
    for item in items:
        base, shots = item, None
        if "@" in base:
            base, _, k = base.partition("@")
            if not k.isdigit():
                raise ImtuneError(f"bad few-shot count in {item!r}: expected e.g. mmlu@5")
            shots = int(k)
        base, _, sub = base.partition(":")
        base = ALIASES.get(base.lower(), base.lower())
        if base in GROUPS and not sub:
            out.extend(TaskSpec(n, None, shots) for n in GROUPS[base])
            continue
        if base not in TASKS:
            near = difflib.get_close_matches(base, list(TASKS) + list(ALIASES) + list(GROUPS), n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise ImtuneError(f"unknown task {item!r}{hint}; run 'imtune evaluate --tasks list' to see them")
        info = TASKS[base]
        if sub:
            if info.subtasks is None:
                raise ImtuneError(f"task {base!r} has no subtasks")
            if sub not in info.subtasks():
                near = difflib.get_close_matches(sub, info.subtasks(), n=3)
                hint = f" (did you mean {', '.join(near)}?)" if near else ""
                raise ImtuneError(f"unknown {base} subtask {sub!r}{hint}")
        if shots is not None and info.max_fewshot is not None and shots > info.max_fewshot:
            raise ImtuneError(f"{base} takes at most {info.max_fewshot} shots, not {shots}")
        spec = TaskSpec(base, sub or None, shots)
        if spec not in out:
            out.append(spec)
    return out


# -------------------------------------------------------------------------------------------- document builders

@dataclass
class MCDoc:
    """One multiple-choice question as log-likelihood requests: choice i is (contexts[i], continuations[i])."""
    contexts: list[str]
    continuations: list[str]
    gold: int
    lengths: list[int]  # characters of each choice, for acc_norm
    labels: list[int] | None = None  # truthfulqa_mc2: 1 for true answers
    group: str = ""  # subtask (MMLU subject)


@dataclass
class GenDoc:
    prompt: str
    target: object
    group: str = ""
    meta: dict = field(default_factory=dict)


def _interleave(groups: list[list]) -> list:
    """Round-robin over subtasks, so `--limit` covers as many subtasks as it can."""
    out, i = [], 0
    while any(i < len(g) for g in groups):
        out.extend(g[i] for g in groups if i < len(g))
        i += 1
    return out


def _limit(rows: list, limit: int | None) -> list:
    return rows if limit is None else rows[:max(0, limit)]


def _shots_from_pool(pool: list, index: int, k: int) -> list:
    """k other rows following `index` (cyclically): deterministic shots that never include the question itself."""
    if k <= 0 or len(pool) < 2:
        return []
    return [pool[(index + 1 + j) % len(pool)] for j in range(min(k, len(pool) - 1))]


def _plain_mc(context: str, choices: list[str], gold: int) -> MCDoc:
    return MCDoc([context] * len(choices), [" " + c for c in choices], gold, [len(c) for c in choices])


def _with_shots(doc: MCDoc, shots: list[MCDoc]) -> MCDoc:
    if not shots:
        return doc
    prefix = "".join(s.contexts[s.gold] + s.continuations[s.gold] + "\n\n" for s in shots)
    return MCDoc([prefix + c for c in doc.contexts], doc.continuations, doc.gold, doc.lengths, doc.labels,
                 doc.group)


def _hellaswag_preprocess(text: str) -> str:
    # lm-eval hellaswag/utils.py: the brackets are WikiHow artifacts.
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _mc_row_doc(task: str, row: dict) -> MCDoc:
    if task in ("arc_easy", "arc_challenge", "piqa"):
        # lm-eval: "Question: {{question}}\nAnswer:" (the bundled query already holds "Question: ...").
        q = row["query"].strip()
        if not q.startswith("Question:"):
            q = "Question: " + q
        return _plain_mc(q + "\nAnswer:", row["choices"], int(row["gold"]))
    if task == "openbookqa":
        return _plain_mc(row["query"], row["choices"], int(row["gold"]))
    if task == "hellaswag":
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        query = _hellaswag_preprocess(row["activity_label"] + ": " + ctx)
        return _plain_mc(query, [_hellaswag_preprocess(e) for e in row["endings"]], int(row["label"]))
    if task in ("winogrande", "wsc273"):
        # Partial scoring (lm-eval winogrande/wsc273): each option completes the sentence up to the blank; the
        # shared remainder is the continuation, so the options are compared on how well they predict it.
        # One space joins them; lm-eval's wsc273 ends up with two (its target keeps the text's own leading
        # space and the default delimiter adds another), which we do not copy.
        opts = row["context_options"]
        cont = " " + row["continuation"].strip()
        return MCDoc(list(opts), [cont] * len(opts), int(row["gold"]), [len(cont) - 1] * len(opts))
    raise KeyError(task)


TRUTHFULQA_PREAMBLE = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


def _mmlu_text(row: dict) -> str:
    q = row["question"].strip()
    opts = "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", row["choices"], strict=True))
    return f"{q}{opts}\nAnswer:"


def mmlu_prompt(row: dict, shots: Sequence[dict] = ()) -> str:
    """lm-eval's MMLU prompt: subject description, then dev shots ('... Answer: B'), then the question."""
    subject = row["subject"].replace("_", " ")
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    body = "".join(f"{_mmlu_text(s)} {'ABCD'[s['answer']]}\n\n" for s in shots)
    return head + body + _mmlu_text(row)


def build_mc_docs(spec: TaskSpec, limit: int | None, num_fewshot: int) -> list[MCDoc]:
    task = spec.name
    if task == "mmlu":
        subjects = [spec.subtask] if spec.subtask else mmlu_subjects()
        per_subject = [load_mmlu("test", [s]) for s in subjects]
        rows = _limit(_interleave(per_subject), limit)
        dev = {}
        docs = []
        for row in rows:
            if num_fewshot and row["subject"] not in dev:
                dev[row["subject"]] = load_mmlu("dev", [row["subject"]])
            shots = dev[row["subject"]][:num_fewshot] if num_fewshot else []
            d = _plain_mc(mmlu_prompt(row, shots), ["A", "B", "C", "D"], row["answer"])
            d.group = row["subject"]
            docs.append(d)
        return docs
    if task in ("truthfulqa_mc1", "truthfulqa_mc2"):
        docs = []
        for row in _limit(load_truthfulqa(), limit):
            choices, labels = row["mc2" if task.endswith("mc2") else "mc1"]
            ctx = TRUTHFULQA_PREAMBLE + "\n\nQ: " + row["question"] + "\nA:"
            d = _plain_mc(ctx, choices, labels.index(1))
            d.labels = labels
            docs.append(d)
        return docs
    rows = load_mc(task)
    pool = [_mc_row_doc(task, r) for r in rows]
    n = len(pool) if limit is None else min(limit, len(pool))
    return [_with_shots(pool[i], _shots_from_pool(pool, i, num_fewshot)) for i in range(n)]


# Chain-of-thought exemplars of Wei et al. (2022), "Chain-of-thought prompting elicits reasoning in large language
# models", Table 20 (the GSM8K prompt), as used by lm-eval's gsm8k-cot.
GSM8K_COT_EXEMPLARS: tuple[tuple[str, str], ...] = (
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
     "now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
     "computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
)


def gsm8k_prompt(question: str, num_fewshot: int = 8) -> str:
    shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in GSM8K_COT_EXEMPLARS[:num_fewshot])
    return f"{shots}Q: {question}\nA:"


def bbh_prompt(subtask: str, question: str, num_fewshot: int = 3) -> str:
    """The BBH paper's CoT format: description, exemplars, then 'Q: ..\\nA: Let's think step by step.'."""
    desc, shots = load_bbh_prompt(subtask)
    parts = [desc] + shots[:num_fewshot] + [f"Q: {question}\nA: Let's think step by step."]
    return "\n\n".join(parts)


TYDIQA_INSTRUCTION = "Answer the following question based on the information in the given passage."


def tydiqa_prompt(row: dict, shots: Sequence[dict] = ()) -> str:
    """open-instruct's TyDiQA GoldP English prompt (instruction, then Passage/Question/Answer blocks).

    open-instruct draws its shot from the train split and cuts passages to 512 tokens; we have only the dev split,
    so shots are other dev rows, and over-long prompts are cut from the left by the generator instead.
    """
    parts = [TYDIQA_INSTRUCTION]
    for s in shots:
        parts.append(f"Passage: {s['context']}\nQuestion: {s['question']}\nAnswer: {s['answers'][0]}")
    parts.append(f"Passage: {row['context']}\nQuestion: {row['question']}\nAnswer:")
    return "\n\n".join(parts)


GEN_SETTINGS = {  # default max_new_tokens and stop strings
    "gsm8k": (256, ["Q:", "</s>", "<|im_end|>"]),  # lm-eval gsm8k-cot
    "bbh": (512, ["\n\n", "Q:", "</s>", "<|im_end|>"]),  # lm-eval: until \n\n; open-instruct: 512 tokens
    "tydiqa": (50, ["\n"]),
    "humaneval": HUMANEVAL_GENERATION,
}


def build_gen_docs(spec: TaskSpec, limit: int | None, num_fewshot: int) -> list[GenDoc]:
    task = spec.name
    if task == "gsm8k":
        return [GenDoc(gsm8k_prompt(r["question"], num_fewshot), r["target"])
                for r in _limit(load_gsm8k(), limit)]
    if task == "bbh":
        subs = [spec.subtask] if spec.subtask else bbh_subtasks()
        rows = _limit(_interleave([load_bbh([s]) for s in subs]), limit)
        return [GenDoc(bbh_prompt(r["subtask"], r["input"], num_fewshot), r["target"], r["subtask"]) for r in rows]
    if task == "tydiqa":
        pool = load_tydiqa()
        n = len(pool) if limit is None else min(limit, len(pool))
        return [GenDoc(tydiqa_prompt(pool[i], _shots_from_pool(pool, i, num_fewshot)), pool[i]["answers"],
                       meta={"id": pool[i]["id"]}) for i in range(n)]
    if task == "humaneval":
        return [GenDoc(p["prompt"], None, meta=p) for p in select_problems(limit)]
    raise KeyError(task)


# -------------------------------------------------------------------------------------------------------- runner

def _summarise(per_doc: dict[str, list[float]], groups: list[str] | None = None) -> tuple[dict, dict, dict]:
    metrics, stderr = {}, {}
    for name, vals in per_doc.items():
        m, se = mean_stderr(vals)
        metrics[name] = m
        stderr[name] = se
    sub = {}
    if groups and len(set(groups)) > 1:
        for g in sorted(set(groups)):
            idx = [i for i, x in enumerate(groups) if x == g]
            sub[g] = {"n": len(idx), **{k: sum(v[i] for i in idx) / len(idx) for k, v in per_doc.items()}}
    return metrics, stderr, sub


def _run_mc(model, tokenizer, spec, docs: list[MCDoc], opts) -> tuple[dict, dict, dict, list]:
    from imtune.evaluation.scoring import loglikelihood

    requests, spans = [], []
    for d in docs:
        spans.append((len(requests), len(d.contexts)))
        requests.extend(zip(d.contexts, d.continuations, strict=True))
    out = loglikelihood(model, tokenizer, requests, batch_size=opts["batch_size"], reuse=opts["reuse"],
                        progress=opts["progress"])
    per: dict[str, list[float]] = collections.defaultdict(list)
    samples = []
    for d, (start, n) in zip(docs, spans, strict=True):
        lls = [ll for ll, _ in out[start:start + n]]
        if spec.name == "truthfulqa_mc2":
            per["mc2"].append(mc2_score(lls, d.labels))
            pred = None
        else:
            pred, pred_norm = mc_predictions(lls, d.lengths)
            per["acc"].append(float(pred == d.gold))
            if "acc_norm" in TASKS[spec.name].metrics:
                per["acc_norm"].append(float(pred_norm == d.gold))
        if opts["log_samples"]:
            samples.append({"context": d.contexts[d.gold], "choices": d.continuations, "gold": d.gold,
                            "loglikelihoods": lls, "prediction": pred})
    groups = [d.group for d in docs]
    metrics, stderr, sub = _summarise(per, groups)
    if spec.name == "mmlu":
        # acc is the micro average over questions (lm-eval's size-weighted group score); acc_macro averages the
        # subjects, as in the original MMLU paper.
        accs = [s["acc"] for s in sub.values()] or [metrics["acc"]]
        metrics["acc_macro"], stderr["acc_macro"] = sum(accs) / len(accs), None
    return metrics, stderr, sub, samples


def _run_lambada(model, tokenizer, spec, rows: list[dict], opts):
    from imtune.evaluation.scoring import loglikelihood

    out = loglikelihood(model, tokenizer, [(r["context"], " " + r["continuation"]) for r in rows],
                        batch_size=opts["batch_size"], reuse=opts["reuse"], progress=opts["progress"])
    accs = [float(g) for _, g in out]
    lls = [ll for ll, _ in out]
    acc, se = mean_stderr(accs)
    ppl = math.exp(-sum(lls) / len(lls)) if lls else float("nan")
    samples = [{"context": r["context"][-200:], "target": r["continuation"], "loglikelihood": ll, "greedy": g}
               for r, (ll, g) in zip(rows, out, strict=True)] if opts["log_samples"] else []
    return {"acc": acc, "perplexity": ppl}, {"acc": se, "perplexity": None}, {}, samples


def _run_generate(model, tokenizer, spec, docs: list[GenDoc], opts):
    from imtune.evaluation.generation import generate_texts
    from imtune.evaluation.scoring import default_add_bos

    max_new, stop = GEN_SETTINGS[spec.name]
    if opts["max_new_tokens"] is not None:
        max_new = opts["max_new_tokens"]
    outs = generate_texts(model, tokenizer, [d.prompt for d in docs], max_new_tokens=max_new, stop=stop,
                          batch_size=opts["batch_size"], seed=opts["seed"], progress=opts["progress"],
                          add_special_tokens=default_add_bos(model))
    per: dict[str, list[float]] = collections.defaultdict(list)
    samples = []
    for d, text in zip(docs, outs, strict=True):
        if spec.name == "gsm8k":
            flex, strict = extract_gsm8k_answer(text), extract_gsm8k_answer(text, strict=True)
            per["exact_match"].append(float(gsm8k_correct(flex, d.target)))
            per["exact_match_strict"].append(float(gsm8k_correct(strict, d.target)))
            pred = flex
        elif spec.name == "bbh":
            pred = extract_bbh_answer(text)
            per["exact_match"].append(float(bbh_correct(pred, d.target)))
        else:  # tydiqa
            pred = text.strip()
            per["f1"].append(max(squad_f1(pred, g) for g in d.target))
            per["exact_match"].append(max(squad_em(pred, g) for g in d.target))
        if opts["log_samples"]:
            samples.append({"prompt_tail": d.prompt[-300:], "generation": text, "prediction": pred,
                            "target": d.target, **({"subtask": d.group} if d.group else {})})
    metrics, stderr, sub = _summarise(per, [d.group for d in docs])
    return metrics, stderr, sub, samples


def _run_humaneval(model, tokenizer, spec, docs: list[GenDoc], opts):
    per, samples = run_humaneval(model, tokenizer, [d.meta for d in docs], opts)
    metrics, stderr, sub = _summarise(per)
    return metrics, stderr, sub, samples


def run_task(model, tokenizer, spec: TaskSpec | str, *, limit: int | None = None, num_fewshot: int | None = None,
             batch_size: int = 16, max_new_tokens: int | None = None, n_samples: int = 1,
             temperature: float | None = None, seed: int = 0, reuse: bool = True, progress: bool = True,
             log_samples: bool = False, code_timeout: float = 10.0, code_workers: int | None = None,
             completions: dict[str, list[str]] | None = None) -> dict:
    """Evaluate one task; returns {metrics, stderr, n, num_fewshot, time_s[, subtasks][, samples]}.

    `completions` (task_id -> completions) scores given HumanEval completions instead of generating them."""
    if isinstance(spec, str):
        (spec,) = parse_tasks(spec)
    info = TASKS[spec.name]
    k = spec.num_fewshot if spec.num_fewshot is not None else (
        num_fewshot if num_fewshot is not None else info.default_fewshot)
    if info.max_fewshot is not None:
        k = min(k, info.max_fewshot)
    opts = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, n_samples=n_samples, temperature=temperature,
                seed=seed, reuse=reuse, progress=progress, log_samples=log_samples, code_timeout=code_timeout,
                code_workers=code_workers, completions=completions)
    t0 = time.perf_counter()
    if info.kind == "multiple_choice":
        docs = build_mc_docs(spec, limit, k)
        metrics, stderr, sub, samples = _run_mc(model, tokenizer, spec, docs, opts)
    elif info.kind == "loglikelihood":
        docs = _limit(load_mc(spec.name), limit)
        metrics, stderr, sub, samples = _run_lambada(model, tokenizer, spec, docs, opts)
    elif info.kind == "generate":
        docs = build_gen_docs(spec, limit, k)
        metrics, stderr, sub, samples = _run_generate(model, tokenizer, spec, docs, opts)
    else:
        docs = [GenDoc(p["prompt"], None, meta=p) for p in select_problems(limit, completions)]
        metrics, stderr, sub, samples = _run_humaneval(model, tokenizer, spec, docs, opts)
    out = {"metrics": metrics, "stderr": stderr, "n": len(docs), "num_fewshot": k,
           "time_s": round(time.perf_counter() - t0, 3)}
    if info.kind == "code":
        out["n_samples"] = samples_per_problem(n_samples, completions)
    if sub:
        out["subtasks"] = sub
    if log_samples:
        out["samples"] = samples
    return out


def run_tasks(model, tokenizer, tasks: str | Sequence[str], limit: int | None = None, *,
              num_fewshot: int | None = None, batch_size: int = 16, max_new_tokens: int | None = None,
              n_samples: int = 1, temperature: float | None = None, seed: int = 0, reuse: bool = True,
              progress: bool = True, log_samples: bool = False, code_timeout: float = 10.0,
              code_workers: int | None = None, completions: dict[str, list[str]] | None = None,
              on_result: Callable[[str, dict], None] | None = None) -> dict:
    """Evaluate `model` on `tasks` ('arc_easy,mmlu@5,bbh:navigate', a list, or a group: all, loglikelihood,
    generative). Returns {"results": {task label: run_task(...) dict}, "config": {...}}.

    `limit` caps examples per task (spread evenly over subtasks for mmlu/bbh); `num_fewshot` overrides every
    task's default (a task's own '@k' wins); `on_result(label, result)` is called as each task finishes.
    """
    specs = parse_tasks(tasks)
    results = {}
    for spec in specs:
        res = run_task(model, tokenizer, spec, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                       max_new_tokens=max_new_tokens, n_samples=n_samples, temperature=temperature, seed=seed,
                       reuse=reuse, progress=progress, log_samples=log_samples, code_timeout=code_timeout,
                       code_workers=code_workers, completions=completions)
        results[spec.label] = res
        if on_result is not None:
            on_result(spec.label, res)
    config = {"tasks": [s.label for s in specs], "limit": limit, "num_fewshot": num_fewshot,
              "batch_size": batch_size, "max_new_tokens": max_new_tokens, "n_samples": n_samples,
              "temperature": temperature, "seed": seed, "prompt_reuse": reuse,
              "prompt_format": "raw text (no chat template)"}
    return {"results": results, "config": config}
