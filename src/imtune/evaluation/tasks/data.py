"""Loaders for the bundled evaluation files under imtune/data/eval (one function per benchmark)."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "data" / "eval"


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
