"""Loss objectives: one plug-in turns a micro-batch's objective-independent token columns into loss weights.

The encoder (`masking.encoding`) stores, per token, what no objective changes: its segment (`templates.SEGMENTS`:
template, system, user, assistant, eos), the index of the message it belongs to (-1 for markup), its weight class
(markup / prompt / last-turn reply / earlier reply) and the weight its message carries in the data (`weight`, 1 when
absent). An `Objective` maps those columns (`Tokens`) to a float32 weight per token; `weights` then multiplies the
message weights in (markup keeps the objective's weight) and zeroes each example's first token (nothing predicts it).

The built-in objectives are a weight per class, which also lets the encode cache count weights without reading a
token (`class_weights`); `it` and `im` are the two end points of `weighted:λ` (λ = weight on prompt content):

    segment      it   im   im-all   weighted:λ[:ρ]
    system       0    1    1        λ
    user         0    1    1        λ
    assistant    1    1    1        ρ (default 1)
    eos          1    1    1        ρ        (the end-of-turn token right after assistant content)
    template     0    0    1        0        (chat markup such as <|user|>, role headers, injected defaults)

`@last` (any objective) weighs assistant turns before the last one as the objective weighs user content.

A new objective is one class: subclass `Objective`, implement `token_weights` (numpy over the flat tokens of a
micro-batch), and `register_objective("name")` it; `parse_objective("name:arg1:arg2")` then builds it with the
string arguments, everywhere a spec is accepted (`--objective`, YAML, `compare`). See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from imtune.errors import ImtuneError
from imtune.ranges import LOSS_WEIGHT_MAX, LOSS_WEIGHT_MIN, LOSS_WEIGHT_TEXT, is_loss_weight

# Weight classes: what a built-in objective's weight depends on, fixed by the encode.
CLASS_TEMPLATE, CLASS_PROMPT, CLASS_REPLY, CLASS_EARLIER_REPLY = range(4)
N_CLASSES = 4
_TEMPLATE, _SYSTEM, _USER, _ASSISTANT, _EOS = range(5)  # templates.SEGMENTS codes (templates imports records)


@dataclass(frozen=True)
class Tokens:
    """Flat tokens of several examples (example i owns [bounds[i], bounds[i+1])), objective-independent columns."""

    segments: np.ndarray  # int8 segment code (templates.SEGMENTS)
    messages: np.ndarray  # int32 index of the token's message in its conversation, -1 for markup
    classes: np.ndarray  # int8 weight class (CLASS_*)
    bounds: np.ndarray  # int64, len = examples + 1
    message_weights: np.ndarray | None = None  # float32 per token: its message's `weight` (markup 1); None: all 1

    @property
    def example(self) -> np.ndarray:
        """The example each token belongs to."""
        return np.repeat(np.arange(len(self.bounds) - 1, dtype=np.int64), np.diff(self.bounds))

    @property
    def is_reply(self) -> np.ndarray:
        return (self.segments == _ASSISTANT) | (self.segments == _EOS)


class Objective:
    """A loss objective. Subclasses implement `token_weights`, or `class_weights` for the count-only fast path."""

    # `name` is set by `register_objective` (a class attribute; dataclass subclasses may make it a field)
    last_turn_only: bool = False

    @property
    def spec(self) -> str:
        return getattr(self, "name", "") or type(self).__name__.lower()

    def __str__(self) -> str:
        return self.spec

    def class_weights(self) -> np.ndarray | None:
        """float32 weight per class (markup, prompt, last-turn reply, earlier reply), or None when the weight
        depends on more than the class (the cache then reads the tokens to count weights)."""
        return None

    def token_weights(self, t: Tokens) -> np.ndarray:
        """float32 weight of each token of `t` before message weights; must be finite and >= 0."""
        cw = self.class_weights()
        if cw is None:
            raise NotImplementedError(f"objective {self.spec!r} implements neither token_weights nor class_weights")
        return cw[t.classes]

    def describe(self) -> str:
        """One sentence for the model card."""
        return f"Objective `{self.spec}`."


def weights(obj: Objective, t: Tokens) -> np.ndarray:
    """The loss weight of every token of `t` under `obj`: objective weight x message weight (float32, one
    rounding), 0 at each example's first token. The one place weights are made, in memory and from the cache."""
    w = np.array(obj.token_weights(t), dtype=np.float32, copy=True)
    if w.shape != t.classes.shape:
        raise ImtuneError(f"objective {obj.spec!r}: token_weights gave {w.shape} weights for {t.classes.shape} tokens")
    lo, hi = np.float32(LOSS_WEIGHT_MIN), np.float32(LOSS_WEIGHT_MAX)  # NaN fails both comparisons
    if len(w) and not ((w == 0) | ((w >= lo) & (w <= hi))).all():
        raise ImtuneError(f"objective {obj.spec!r}: token weights must be finite and >= 0: {LOSS_WEIGHT_TEXT}")
    if t.message_weights is not None:
        w *= t.message_weights
    w[t.bounds[:-1][np.diff(t.bounds) > 0]] = 0.0
    return w


@dataclass(frozen=True)
class SegmentObjective(Objective):
    """The built-ins: one weight for prompt content, one for replies, one for markup (a weight per class)."""

    name: str
    prompt_weight: float
    response_weight: float = 1.0
    markup_weight: float = 0.0
    last_turn_only: bool = False

    def __post_init__(self):
        for w in (self.prompt_weight, self.response_weight, self.markup_weight):
            if not is_loss_weight(w):
                raise ImtuneError(f"objective {self.name!r}: weights must be {LOSS_WEIGHT_TEXT}, got {w!r}")
        if self.prompt_weight == self.response_weight == self.markup_weight == 0:
            raise ImtuneError(f"objective {self.name!r}: every weight is 0, nothing would be trained")

    def segment_weights(self) -> tuple[float, ...]:
        """Weights indexed by segment code (template, system, user, assistant, eos)."""
        p, r = self.prompt_weight, self.response_weight
        return (self.markup_weight, p, p, r, r)

    def class_weights(self) -> np.ndarray:
        m, p, r = (float(np.float32(x)) for x in (self.markup_weight, self.prompt_weight, self.response_weight))
        return np.asarray([m, p, r, p if self.last_turn_only else r], dtype=np.float32)

    @property
    def spec(self) -> str:
        return self.name + ("@last" if self.last_turn_only else "")

    def describe(self) -> str:
        text = (f"**Weighted** (`{self.name}`): prompt tokens weigh {self.prompt_weight:g}, output tokens "
                f"{self.response_weight:g}, template markup {self.markup_weight:g}.")
        if self.last_turn_only:
            text += " Only the last assistant turn counts as output; earlier turns are weighted as prompt."
        return text


@dataclass(frozen=True)
class LastTurnOnly(Objective):
    """`@last` for a plug-in objective: assistant turns before the last one are weighed as user content."""

    inner: Objective
    last_turn_only: bool = True

    @property
    def spec(self) -> str:
        return self.inner.spec + "@last"

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    def class_weights(self) -> np.ndarray | None:
        cw = self.inner.class_weights()
        if cw is None:
            return None
        cw = cw.copy()
        cw[CLASS_EARLIER_REPLY] = cw[CLASS_PROMPT]
        return cw

    def token_weights(self, t: Tokens) -> np.ndarray:
        earlier = t.classes == CLASS_EARLIER_REPLY
        seg = np.where(earlier, np.int8(_USER), t.segments).astype(np.int8)
        cls = np.where(earlier, np.int8(CLASS_PROMPT), t.classes).astype(np.int8)
        return self.inner.token_weights(replace(t, segments=seg, classes=cls))

    def describe(self) -> str:
        return self.inner.describe() + " Only the last assistant turn counts as output."


# ---- the registry: name -> factory(*string arguments) -----------------------------------------------------------
_REGISTRY: dict[str, Callable[..., Objective]] = {}


def register_objective(name: str, factory: Callable[..., Objective] | None = None, *, aliases: tuple = ()):
    """Register `factory` (a class or function taking the spec's `:`-separated string arguments) under `name`;
    usable as a class decorator. The class gets `name` unless it sets one."""

    def add(f):
        for n in (name, *aliases):
            _REGISTRY[n.lower()] = f
        if isinstance(f, type) and not f.__dict__.get("name"):
            f.name = name
        return f

    return add(factory) if factory is not None else add


def objective_names() -> list[str]:
    return sorted(_REGISTRY)


def parse_objective(spec: str | Objective, last_turn_only: bool | None = None) -> Objective:
    """`it`, `im`, `im-all`, `weighted:λ`, `weighted:λ:ρ` or any registered `name[:arg...]`, optionally suffixed
    `@last` (last turn only)."""
    obj = spec if isinstance(spec, Objective) else _build(str(spec))
    if last_turn_only is not None and last_turn_only != obj.last_turn_only:
        obj = _with_last(obj.inner if isinstance(obj, LastTurnOnly) else obj, last_turn_only)
    return obj


def _build(spec: str) -> Objective:
    s = spec.strip().lower()
    last = s.endswith("@last")
    name, *args = s.removesuffix("@last").split(":")
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ImtuneError(f"unknown objective {spec!r}: choose {', '.join(objective_names())} (e.g. weighted:0.1)")
    obj = factory(*args)
    if not isinstance(obj, Objective):
        raise ImtuneError(f"objective {spec!r}: its factory gave {type(obj).__name__}, not an Objective")
    return _with_last(obj, last) if last else obj


def _with_last(obj: Objective, last: bool) -> Objective:
    if isinstance(obj, SegmentObjective):
        return replace(obj, last_turn_only=last)
    return LastTurnOnly(obj) if last else obj


def _fixed(name: str, p: float, r: float, m: float) -> Callable[..., Objective]:
    def make(*args):
        if args:
            raise ImtuneError(f"bad objective {name + ':' + ':'.join(args)!r}: {name} takes no arguments")
        return SegmentObjective(name, p, r, m)

    return make


def _weighted(*parts: str) -> Objective:
    spec = ":".join(("weighted", *parts))
    if not 1 <= len(parts) <= 2:
        raise ImtuneError(f"bad objective {spec!r}: use weighted:λ or weighted:λ:ρ, e.g. weighted:0.1")
    try:
        vals = [float(x) for x in parts]
    except ValueError:
        raise ImtuneError(f"bad objective {spec!r}: weights must be numbers, e.g. weighted:0.1") from None
    lam, rho = vals[0], (vals[1] if len(vals) == 2 else 1.0)
    name = f"weighted:{_fmt(lam)}" + (f":{_fmt(rho)}" if len(vals) == 2 else "")
    return SegmentObjective(name, lam, rho, 0.0)


register_objective("it", _fixed("it", 0.0, 1.0, 0.0))
register_objective("im", _fixed("im", 1.0, 1.0, 0.0))
register_objective("im-all", _fixed("im-all", 1.0, 1.0, 1.0), aliases=("im_all", "all"))
register_objective("weighted", _weighted)


def _fmt(x: float) -> str:
    return f"{x:g}"
