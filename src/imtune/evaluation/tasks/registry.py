"""The task table (name, kind, metrics, shots) and parsing of task lists such as 'arc_easy,mmlu@5,bbh:navigate'."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from imtune.errors import ImtuneError
from imtune.evaluation.tasks.data import bbh_subtasks, mmlu_subjects


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
LM_EVAL_PREFIX = "lm-eval:"
GROUPS = {
    "all": list(TASKS),
    "loglikelihood": [n for n, t in TASKS.items() if t.kind in ("multiple_choice", "loglikelihood")],
    "generative": [n for n, t in TASKS.items() if t.kind in ("generate", "code")],
}


@dataclass(frozen=True)
class TaskSpec:
    """A task as requested: base name, optional subtask (mmlu:anatomy), optional few-shot override (mmlu@5);
    `lm_eval`: an lm-evaluation-harness task, group or tag (lm-eval:hellaswag), run through its harness."""
    name: str
    subtask: str | None = None
    num_fewshot: int | None = None
    lm_eval: bool = False

    @property
    def label(self) -> str:
        s = (LM_EVAL_PREFIX if self.lm_eval else "") + self.name + (f":{self.subtask}" if self.subtask else "")
        return s + (f"@{self.num_fewshot}" if self.num_fewshot is not None else "")


def list_tasks() -> list[TaskInfo]:
    return list(TASKS.values())


def _shots(item: str) -> tuple[str, int | None]:
    base, at, k = item.partition("@")
    if not at:
        return item, None
    if not k.isdigit():
        raise ImtuneError(f"bad few-shot count in {item!r}: expected e.g. mmlu@5")
    return base, int(k)


def parse_tasks(tasks: str | Sequence[str]) -> list[TaskSpec]:
    """'arc_easy,mmlu@5,bbh:navigate' or a list of such names -> TaskSpecs; ImtuneError for unknown names.

    'lm-eval:' marks lm-evaluation-harness tasks: the item carrying it and every item after it
    ('arc_easy,lm-eval:hellaswag,piqa' runs hellaswag and piqa in lm-eval). Their names are checked by lm-eval.
    """
    items = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)]
    items = [t for t in items if t]
    if not items:
        raise ImtuneError("no tasks given; run 'imtune evaluate --tasks list' to see them")
    out: list[TaskSpec] = []
    in_lm_eval = False
    for item in items:
        if item.lower().startswith(LM_EVAL_PREFIX):
            in_lm_eval, item = True, item[len(LM_EVAL_PREFIX):].strip()
        base, shots = _shots(item)
        if in_lm_eval:
            if not base:
                raise ImtuneError("'lm-eval:' needs a task name, e.g. lm-eval:hellaswag")
            spec = TaskSpec(base, None, shots, lm_eval=True)
            if spec not in out:
                out.append(spec)
            continue
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
