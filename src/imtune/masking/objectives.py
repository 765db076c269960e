"""Loss objectives as per-segment weights.

Every token of a rendered conversation has a segment (see `templates.SEGMENTS`). An `Objective` maps segments to
loss weights. `it` and `im` are the two end points of `weighted:λ` (λ = weight on prompt content):

    segment      it   im   im-all   weighted:λ[:ρ]
    system       0    1    1        λ
    user         0    1    1        λ
    assistant    1    1    1        ρ (default 1)
    eos          1    1    1        ρ        (the end-of-turn token right after assistant content)
    template     0    0    1        0        (chat markup such as <|user|>, role headers, injected defaults)

With `last_turn_only`, assistant turns before the last one count as prompt (weight λ, so 0 for `it`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from imtune.errors import ImtuneError


@dataclass(frozen=True)
class Objective:
    name: str
    prompt_weight: float
    response_weight: float = 1.0
    markup_weight: float = 0.0
    last_turn_only: bool = False

    def __post_init__(self):
        for w in (self.prompt_weight, self.response_weight, self.markup_weight):
            if not math.isfinite(w) or w < 0:
                raise ImtuneError(f"objective {self.name!r}: weights must be finite and >= 0")
        if self.prompt_weight == self.response_weight == self.markup_weight == 0:
            raise ImtuneError(f"objective {self.name!r}: every weight is 0, nothing would be trained")

    def segment_weights(self) -> tuple[float, ...]:
        """Weights indexed by segment code (template, system, user, assistant, eos)."""
        p, r = self.prompt_weight, self.response_weight
        return (self.markup_weight, p, p, r, r)

    @property
    def spec(self) -> str:
        base = self.name
        return base + ("@last" if self.last_turn_only else "")

    def __str__(self) -> str:
        return self.spec


def parse_objective(spec: str | Objective, last_turn_only: bool | None = None) -> Objective:
    """Parse `it`, `im`, `im-all`, `weighted:λ` or `weighted:λ:ρ`, optionally suffixed `@last` (last turn only)."""
    if isinstance(spec, Objective):
        obj = spec
    else:
        s = str(spec).strip().lower()
        last = s.endswith("@last")
        s = s.removesuffix("@last")
        if s == "it":
            obj = Objective("it", 0.0, 1.0, 0.0, last)
        elif s == "im":
            obj = Objective("im", 1.0, 1.0, 0.0, last)
        elif s in ("im-all", "im_all", "all"):
            obj = Objective("im-all", 1.0, 1.0, 1.0, last)
        elif s.startswith("weighted:"):
            parts = s.split(":")[1:]
            if not 1 <= len(parts) <= 2:
                raise ImtuneError(f"bad objective {spec!r}: use weighted:λ or weighted:λ:ρ, e.g. weighted:0.1")
            try:
                vals = [float(x) for x in parts]
            except ValueError:
                raise ImtuneError(f"bad objective {spec!r}: weights must be numbers, e.g. weighted:0.1") from None
            lam, rho = vals[0], (vals[1] if len(vals) == 2 else 1.0)
            name = f"weighted:{_fmt(lam)}" + (f":{_fmt(rho)}" if len(vals) == 2 else "")
            obj = Objective(name, lam, rho, 0.0, last)
        else:
            raise ImtuneError(f"unknown objective {spec!r}: choose it, im, im-all, weighted:λ or weighted:λ:ρ")
    if last_turn_only is not None and last_turn_only != obj.last_turn_only:
        obj = Objective(obj.name, obj.prompt_weight, obj.response_weight, obj.markup_weight, last_turn_only)
    return obj


def _fmt(x: float) -> str:
    return f"{x:g}"
