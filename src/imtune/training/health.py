"""Is the run healthy? Trained weights must stay finite; a loss that stops moving is worth a warning.

The finiteness check runs after every optimizer step and before every save, so it has to be cheap: one fused
`_foreach_norm` over the trainable tensors (the multi-tensor kernel `clip_grad_norm_` uses; NaN and inf propagate
into a tensor's norm), then one `isfinite` over the stacked norms and one device-to-host sync. The L2 norm, not the
max |x|: on CPU the inf-norm kernel is ~60x slower (190 ms vs 3 ms for 22M values on one core). The price is that a
tensor whose L2 norm overflows float32 (values around 1e17 and up in a 1e8-value tensor) also counts as non-finite:
weights that large have diverged anyway.
"""

from __future__ import annotations

import math
from collections import deque

import torch

# A loss identical to this relative tolerance over this many consecutive steps (each on different examples) means
# the model no longer depends on its input: typically weights saturated by a far too high learning rate.
STALL_STEPS = 5
STALL_RTOL = 1e-6


def local_tensors(params) -> list[torch.Tensor]:
    """This process' own values of each parameter; the caller reduces over processes.

    FSDP2 parameters are DTensors (the shard is `_local_tensor`); outside a forward pass a ZeRO-3 parameter is an
    empty placeholder whose values are this process' partition `ds_tensor`."""
    return [(p.ds_tensor if hasattr(p, "ds_tensor") else getattr(p, "_local_tensor", p)).detach() for p in params]


def all_finite(tensors) -> bool:
    """True when every value of every tensor is finite."""
    # meta tensors hold no values (the frozen base of an adapter saved on its own)
    tensors = [t for t in local_tensors(tensors) if t.numel() and t.is_floating_point() and not t.is_meta]
    if not tensors:
        return True
    norms = torch._foreach_norm(tensors)
    return bool(torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms])).all())


def trainable_finite(model, accelerator, sharded: bool) -> bool:
    """`all_finite` over the trainable parameters; with sharded parameters every process must agree."""
    ok = all_finite(p for p in model.parameters() if p.requires_grad)
    if sharded and accelerator.num_processes > 1:
        flag = torch.tensor([0.0 if ok else 1.0], device=accelerator.device)
        ok = float(accelerator.reduce(flag, "sum")) == 0.0
    return ok


class StallWatch:
    """Collects one warning each for zero gradients and for a loss that has not moved for `steps` steps."""

    def __init__(self, steps: int = STALL_STEPS, rtol: float = STALL_RTOL):
        self.losses: deque[float] = deque(maxlen=steps)
        self.rtol = rtol
        self.warnings: list[str] = []
        self._seen: set[str] = set()

    def observe(self, step: int, loss: float, grad_norm: float) -> str | None:
        """Record one step; returns a new warning (once per kind), else None."""
        self.losses.append(loss)
        if grad_norm == 0.0 and loss != 0.0:
            return self._warn("zero_grad", f"step {step}: the gradients are all zero although the loss is "
                                           f"{loss:.4g}: the weights no longer change (learning rate far too high?)")
        if len(self.losses) == self.losses.maxlen:
            lo, hi = min(self.losses), max(self.losses)
            if hi - lo <= self.rtol * max(1.0, abs(hi)):
                return self._warn("flat", f"steps {step - len(self.losses) + 1}-{step}: the loss has not moved "
                                          f"({hi:.6g} on every step, each on different examples): the model no "
                                          f"longer depends on its input (learning rate far too high?)")
        return None

    def _warn(self, kind: str, msg: str) -> str | None:
        if kind in self._seen or not math.isfinite(self.losses[-1]):
            return None
        self._seen.add(kind)
        self.warnings.append(msg)
        return msg
