"""The meaningful range of every number a user gives imtune, declared once.

Each subcommand's numeric flag takes one of these as its argparse `type=` (so a bad value is refused while the
command line is parsed: one line, exit code 2), and `TrainConfig.validate` checks its YAML / CLI values against the
same ones. A seed outside [0, 2^32) cannot seed numpy; a NaN, infinite, zero or negative timeout or temperature
means nothing a run could do; a count below 1 asks for no work at all.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

SEED_MAX = 2**32 - 1  # numpy's and torch's seeds are unsigned 32-bit integers
COUNT_MAX = 2**31 - 1  # tensors index with int32 in places: no count a machine could run needs more
TIMEOUT_MAX_S = 24 * 3600.0


@dataclass(frozen=True)
class Range:
    """A number of `kind` (int or float) between `lo` and `hi` (None: unbounded), each end open or closed."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def describe(self) -> str:
        noun = "an integer" if self.kind is int else "a finite number"
        lo, hi = (self._show(v) for v in (self.lo, self.hi))
        if self.lo is not None and self.hi is not None:
            return f"{noun} in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{noun} {'>' if self.lo_open else '>='} {lo}"
        if self.hi is not None:
            return f"{noun} {'<' if self.hi_open else '<='} {hi}"
        return noun

    def _show(self, v) -> str:
        return "" if v is None else str(int(v)) if self.kind is int else f"{v:g}"

    def contains(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (self.kind is int and not isinstance(v, int)):
            return False
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def __call__(self, text: str):
        """argparse `type=`: the parsed value, or ArgumentTypeError with the range (argparse prints one line)."""
        try:
            v = int(text.strip()) if self.kind is int else float(text)
        except ValueError:
            v = None
        if v is None or not self.contains(v):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return v

    def check(self, name: str, v) -> None:
        """For values that did not come through argparse (a YAML config): ImtuneError naming the option."""
        from imtune.errors import ImtuneError

        if v is not None and not self.contains(v):
            raise ImtuneError(f"{name} must be {self.describe()}, got {v!r}")

    @property
    def __name__(self) -> str:  # argparse names the type in some messages
        return self.describe()


SEED = Range(int, 0, SEED_MAX)
COUNT = Range(int, 1, COUNT_MAX)  # how many: examples, tokens, samples, seeds, a batch, a limit
INDEX = Range(int, 0, COUNT_MAX)  # a 0-based position, or how many of something that may be none (retries, shots)
LENGTH = Range(int, 2, COUNT_MAX)  # a token length: a prompt token and a target at least
TEMPERATURE = Range(float, 0.0, 100.0)
TOP_P = Range(float, 0.0, 1.0, lo_open=True)
TIMEOUT_S = Range(float, 0.0, TIMEOUT_MAX_S, lo_open=True)
DEADLINE_S = Range(float, 0.0, 7 * 24 * 3600.0, lo_open=True)
BUDGET_MIN = Range(float, 0.0, 7 * 24 * 60.0, lo_open=True)
LEARNING_RATE = Range(float, 0.0, 1.0, lo_open=True)
POSITIVE = Range(float, 0.0, lo_open=True)
NON_NEGATIVE = Range(float, 0.0)
UNIT = Range(float, 0.0, 1.0, hi_open=True)  # a ratio, a probability, a beta: 0 allowed, 1 not
FRACTION = Range(float, 0.0, 1.0, lo_open=True, hi_open=True)  # of the data held out: some, not all

# A loss weight (a message's `weight` in the data, an objective's λ / ρ): 0, or a number whose float32 products with
# another weight and a token's loss, and their sums over a run's tokens, stay finite and normal. 1e308 overflows
# float32 to inf, and a subnormal such as 1e-45 turns the step's normaliser into 0/0: both gave a NaN step.
LOSS_WEIGHT_MIN, LOSS_WEIGHT_MAX = 1e-6, 1e6
LOSS_WEIGHT_TEXT = f"0 or a number in [{LOSS_WEIGHT_MIN:g}, {LOSS_WEIGHT_MAX:g}]"


def is_loss_weight(w) -> bool:
    """Is `w` a usable loss weight (see LOSS_WEIGHT_TEXT)? Booleans and strings are not."""
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
        return False
    return w == 0 or LOSS_WEIGHT_MIN <= w <= LOSS_WEIGHT_MAX
