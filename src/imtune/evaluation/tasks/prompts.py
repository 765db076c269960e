"""Documents to score: prompts and log-likelihood requests in lm-evaluation-harness's formats (cited per task)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from imtune.evaluation.humaneval import GENERATION as HUMANEVAL_GENERATION
from imtune.evaluation.humaneval import select_problems
from imtune.evaluation.tasks.data import (
    bbh_subtasks,
    load_bbh,
    load_bbh_prompt,
    load_gsm8k,
    load_mc,
    load_mmlu,
    load_truthfulqa,
    load_tydiqa,
    mmlu_subjects,
)
from imtune.evaluation.tasks.registry import TaskSpec


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


def first_n(rows: list, limit: int | None) -> list:
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
        rows = first_n(_interleave(per_subject), limit)
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
        for row in first_n(load_truthfulqa(), limit):
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
                for r in first_n(load_gsm8k(), limit)]
    if task == "bbh":
        subs = [spec.subtask] if spec.subtask else bbh_subtasks()
        rows = first_n(_interleave([load_bbh([s]) for s in subs]), limit)
        return [GenDoc(bbh_prompt(r["subtask"], r["input"], num_fewshot), r["target"], r["subtask"]) for r in rows]
    if task == "tydiqa":
        pool = load_tydiqa()
        n = len(pool) if limit is None else min(limit, len(pool))
        return [GenDoc(tydiqa_prompt(pool[i], _shots_from_pool(pool, i, num_fewshot)), pool[i]["answers"],
                       meta={"id": pool[i]["id"]}) for i in range(n)]
    if task == "humaneval":
        return [GenDoc(p["prompt"], None, meta=p) for p in select_problems(limit)]
    raise KeyError(task)
