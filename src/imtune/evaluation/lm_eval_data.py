"""The bundled evaluation files as lm-evaluation-harness datasets, for the task YAMLs in imtune/data/eval/lm_eval.

Each YAML names one of these functions as its `custom_dataset`, so `lm-eval:imtune_arc_easy` and the others run
offline on the same rows and with the same prompts as imtune's built-in tasks (documents come from
`imtune.evaluation.tasks`); HellaSwag and TruthfulQA keep their Hub schema and use lm-eval's own processing.
lm-eval calls each function with the task's metadata and dataset_kwargs (here: which task) as keyword
arguments.
"""

from __future__ import annotations


def _test_split(docs: list[dict]):
    from datasets import Dataset, DatasetDict

    return DatasetDict({"test": Dataset.from_list(docs)})


def multiple_choice(task: str, **_):
    """{query, choices, gold} rows of a built-in task; lm-eval puts its target delimiter (a space) between query
    and choice."""
    from imtune.evaluation.tasks import TaskSpec, build_mc_docs

    # Every built-in continuation is " " + choice, which is what lm-eval's delimiter recreates.
    return _test_split([{"query": d.contexts[0], "choices": [c[1:] for c in d.continuations], "gold": d.gold}
                        for d in build_mc_docs(TaskSpec(task), None, 0)])


def partial(task: str, **_):
    """{contexts, continuation, gold} for partial scoring (each option fills the blank; the rest is scored)."""
    from imtune.evaluation.tasks import TaskSpec, build_mc_docs

    return _test_split([{"contexts": d.contexts, "continuation": d.continuations[0][1:], "gold": d.gold}
                        for d in build_mc_docs(TaskSpec(task), None, 0)])


def hellaswag(**_):
    """The Hub schema (ctx_a, ctx_b, activity_label, endings, label), for lm-eval's own process_docs."""
    from imtune.evaluation.tasks import load_mc

    return _test_split([{**r, "label": str(r["label"])} for r in load_mc("hellaswag")])


def lambada_openai(**_):
    from imtune.evaluation.tasks import load_mc

    return _test_split([{"context": r["context"], "continuation": r["continuation"]}
                        for r in load_mc("lambada_openai")])


def truthfulqa(**_):
    """The Hub schema: question, mc1_targets and mc2_targets as {choices, labels}."""
    from imtune.evaluation.tasks import load_truthfulqa

    def targets(pair):
        return {"choices": list(pair[0]), "labels": list(pair[1])}

    return _test_split([{"question": r["question"], "mc1_targets": targets(r["mc1"]),
                         "mc2_targets": targets(r["mc2"])} for r in load_truthfulqa()])


def gsm8k(**_):
    """The Hub schema: question, answer (the solution, ending '#### N')."""
    from imtune.evaluation.tasks import load_gsm8k

    return _test_split([{"question": r["question"], "answer": r["answer"]} for r in load_gsm8k()])


def mmlu(subject: str, **_):
    """One subject in the Hub schema (question, subject, choices, answer 0-3): test rows, dev rows as shots."""
    from datasets import Dataset, DatasetDict

    from imtune.evaluation.tasks import load_mmlu

    return DatasetDict({split: Dataset.from_list(load_mmlu(split, [subject])) for split in ("test", "dev")})
