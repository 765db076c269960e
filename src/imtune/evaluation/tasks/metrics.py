"""Per-example metrics: multiple-choice predictions, TruthfulQA MC2, GSM8K/BBH answer extraction, SQuAD F1/EM."""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Sequence


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
