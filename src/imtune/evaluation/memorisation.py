"""How closely a model reproduces its training outputs when given the training instructions.

The paper's memorisation measure: generate greedily on training instructions and compare the generations with the
training outputs. Higher BLEU / ROUGE-L = more copying of the training data; IM should score lower than IT.

BLEU is sacrebleu's (13a tokenisation, exp smoothing): sentence BLEU per example with effective order (so short
outputs are not zeroed by missing 4-grams) and corpus BLEU over all examples. ROUGE-L is rouge-score's F-measure
with the Porter stemmer. Scores are on a 0-100 (BLEU) and 0-1 (ROUGE-L) scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imtune.errors import ImtuneError
from imtune.statistics import bootstrap_mean_ci


def memorisation_scores(outputs: Sequence[str], references: Sequence[str]) -> dict:
    """Scores of `outputs` against `references` (one reference each).

    Returns `{"n", "corpus_bleu", "sentence_bleu_mean", "sentence_bleu_ci95", "rougeL_mean", "rougeL_ci95",
    "bleu_signature", "sentence_bleu": [...], "rougeL": [...]}`; the two lists are per example, in input order,
    and the CIs are bootstrap CIs of the means (fixed seed).
    """
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    outputs, references = list(outputs), list(references)
    if len(outputs) != len(references):
        raise ImtuneError(f"{len(outputs)} outputs but {len(references)} references")
    for name, xs in (("output", outputs), ("reference", references)):
        for i, x in enumerate(xs):
            if not isinstance(x, str):
                raise ImtuneError(f"{name} {i} is {type(x).__name__}, expected a string")
    n = len(outputs)
    if n == 0:
        return {"n": 0, "corpus_bleu": None, "sentence_bleu_mean": None, "sentence_bleu_ci95": [None, None],
                "rougeL_mean": None, "rougeL_ci95": [None, None], "bleu_signature": None,
                "sentence_bleu": [], "rougeL": []}
    sent = BLEU(effective_order=True)
    sbleu = [float(sent.sentence_score(o, [r]).score) for o, r in zip(outputs, references, strict=True)]
    corpus = BLEU()
    cbleu = corpus.corpus_score(outputs, [references])
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [float(scorer.score(r, o)["rougeL"].fmeasure) for o, r in zip(outputs, references, strict=True)]
    return {
        "n": n,
        "corpus_bleu": float(cbleu.score),
        "sentence_bleu_mean": float(np.mean(sbleu)),
        "sentence_bleu_ci95": bootstrap_mean_ci(sbleu),
        "rougeL_mean": float(np.mean(rouge)),
        "rougeL_ci95": bootstrap_mean_ci(rouge),
        "bleu_signature": str(corpus.get_signature()),
        "sentence_bleu": sbleu,
        "rougeL": rouge,
    }


def summary_of(scores: dict) -> dict:
    """`scores` without the per-example lists."""
    return {k: v for k, v in scores.items() if k not in ("sentence_bleu", "rougeL")}


def read_generations(path: str | Path) -> list[dict]:
    """Rows of a generations JSONL (as written by `imtune generate`): each needs string `output` and `reference`."""
    from imtune.inputs import read_jsonl_rows

    rows = read_jsonl_rows(path, {"output": str, "reference": str}, what="generations")
    for i, row in enumerate(rows):
        row.setdefault("id", str(i))
    return rows
