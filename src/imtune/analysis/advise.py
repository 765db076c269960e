"""Before training: will IM help this data? A transparent rule on the paper's two axes.

The paper (Shi et al., NeurIPS 2024) finds IM's gain over IT grows with (1) the ratio of instruction length to output
length and (2) the scarcity of training examples (LIMA's 1k, Alpagasus' 3k/9k), because IM overfits less. It gives
no numeric thresholds, so the cut points below are imtune's heuristics, stated with every recommendation; the
recommendation is a prior, and `imtune compare` measures the answer on your data.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from imtune.config import DEFAULT_MAX_LENGTH, DEFAULT_TEMPLATE

# Cut points (heuristic, see module doc). Ratio = mean instruction tokens / mean output tokens.
RATIO_HIGH = 1.0  # instructions at least as long as outputs (Code-Alpaca/Flan-like data)
RATIO_LOW = 0.3  # outputs over ~3x longer than instructions (LIMA-like long-form answers)
SMALL_N = 10_000  # the paper's low-resource regime (LIMA 1k, Alpagasus 3k/9k)
LARGE_N = 50_000  # Tulu-scale data, where the paper's IM gains shrink


@dataclass
class Advice:
    recommendation: str  # it | im | weighted:λ
    confidence: str  # strong | moderate | weak
    predicted_im_minus_it: str  # "IM better" | "no clear difference" | "IT better"
    ratio: float
    examples: int
    ratio_level: str
    size_level: str
    reasons: list[str] = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    thresholds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _level(x: float, lo: float, hi: float, names=("low", "medium", "high")) -> str:
    return names[0] if x < lo else names[2] if x >= hi else names[1]


def advise_from_stats(stats: dict) -> Advice:
    """Pure function of `imtune.analysis.stats.dataset_stats` output."""
    r = float(stats["instruction_output_ratio"])
    n = int(stats["examples"])
    instr, out = stats["instruction_tokens"], stats["output_tokens"]
    ratio_level = _level(r, RATIO_LOW, RATIO_HIGH)
    size_level = "small" if n <= SMALL_N else "large" if n > LARGE_N else "medium"
    reasons = [
        f"Instructions average {instr['mean']:.0f} tokens and outputs {out['mean']:.0f} tokens: "
        f"instruction/output ratio {r:.2f} ({ratio_level}; imtune calls < {RATIO_LOW} low, ≥ {RATIO_HIGH} high).",
        f"{n:,} training examples ({size_level}; ≤ {SMALL_N:,} is the paper's low-resource regime, "
        f"> {LARGE_N:,} is where its IM gains shrink).",
    ]
    if ratio_level == "high" and size_level != "large":
        rec, conf, pred = "im", "strong", "IM better"
        reasons.append("Both of the paper's factors favour IM: long instructions with short outputs give IT few "
                       "tokens to learn from and it overfits them; IM also learns from the instructions.")
    elif ratio_level == "high":
        rec, conf, pred = "im", "moderate", "IM better"
        reasons.append("Long instructions relative to outputs favour IM; with this much data the paper's gains are "
                       "smaller, so expect a modest difference.")
    elif size_level == "small":
        rec, conf, pred = "im", "moderate" if ratio_level == "medium" else "weak", "IM better"
        reasons.append("Few examples: the paper's low-resource finding (e.g. LIMA, 1k examples, short prompts and "
                       "long answers) is that IM still helps because IT overfits the small set; the short "
                       "instructions make the effect smaller than on instruction-heavy data.")
    elif size_level == "large" and ratio_level == "low":
        rec, conf, pred = "it", "moderate", "no clear difference"
        reasons.append("Plenty of data with outputs much longer than prompts: IT's overfitting risk is low and "
                       "IM's extra tokens are mostly prompts; the paper sees little or no gain here.")
    else:
        rec, conf, pred = "weighted:0.1", "weak", "no clear difference"
        reasons.append("Neither factor is strong: a small prompt-loss weight (λ = 0.1, OpenAI's old default "
                       "prompt_loss_weight) keeps IM's regularising effect while leaving the output loss dominant.")
    trunc = stats.get("truncation")
    if trunc and trunc.get("dropped_it"):
        reasons.append(f"Note: at max length {trunc['max_length']}, {trunc['dropped_it']} example(s) would keep no "
                       "output token under IT (dropped) but still train under IM.")
    reasons.append("This is a prior from the paper's trends; run `imtune compare` to measure it on your data.")
    return Advice(rec, conf, pred, round(r, 4), n, ratio_level, size_level, reasons,
                  figures={"instruction_tokens_mean": instr["mean"], "output_tokens_mean": out["mean"],
                           "instruction_tokens_median": instr["median"], "output_tokens_median": out["median"],
                           "log10_ratio": round(math.log10(max(r, 1e-9)), 3), "examples": n},
                  thresholds={"ratio_low": RATIO_LOW, "ratio_high": RATIO_HIGH, "small_n": SMALL_N,
                              "large_n": LARGE_N})


def advise(records, tokenizer, template: str = DEFAULT_TEMPLATE, max_length: int = DEFAULT_MAX_LENGTH) -> tuple[Advice, dict]:
    from imtune.analysis.stats import dataset_stats

    stats = dataset_stats(records, tokenizer, template=template, max_length=max_length)
    return advise_from_stats(stats), stats
