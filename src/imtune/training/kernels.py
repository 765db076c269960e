"""Fused GPU kernels (Liger-Kernel): which to use, the model patches, and the weighted fused linear + CE backend.

`kernels: auto` uses Liger where it can run (a CUDA device with `liger-kernel` installed: `pip install
imtune[liger]`), `none` never, `liger` insists (one-line error where it cannot run). With Liger on:

* the model's RMSNorm, SwiGLU MLP and RoPE are swapped for Liger's Triton versions through its own instance-patching
  API (`_apply_liger_kernel_to_instance`, for the model types in its `MODEL_TYPE_TO_APPLY_LIGER_FN`); its fused
  loss forward is NOT installed (`fused_linear_cross_entropy=False`), because imtune runs the model's own forward
  with `logits_to_keep=1` and takes the loss from the final hidden states itself;
* the lm_head + cross-entropy of the training loss (`training.loss.weighted_loss_sum`, the one loss engine) runs
  through Liger's fused linear cross-entropy, which never builds the [tokens × vocab] logits. That kernel takes no
  per-token weights, so `grouped_linear_ce` calls it once per distinct weight value (a built-in objective has
  at most three: markup, prompt, response; weight-0 positions are never selected; a micro-batch with more than
  `MAX_WEIGHT_GROUPS` values, e.g. from per-message weights, falls back to the chunked head, `grouped_kernel_fits`) with `reduction="sum"` and adds up
  w × group loss. Σ_g w_g·Σ_{i∈g} CE_i = Σ_i w_i·CE_i, and since each call's gradient is computed in its forward
  and scaled by its upstream gradient (here w_g), the gradient is exact as well.

Where the fused kernel does not apply, the loss stays on imtune's own chunked head (same result): a KL term (it
needs the model's log-probabilities, which the kernel does not return), a logit scale (Granite, Cohere: Liger has
softcapping only) and heads that are not a plain `nn.Linear` (peft-wrapped lm_head, FSDP-sharded weights).
NEFTune (an input-embedding hook) and LoRA (adapters on the body; lm_head stays a plain Linear) work unchanged.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from imtune.errors import ImtuneError

KERNELS = ("auto", "none", "liger")
# Liger's patch switches, passed to its instance-patching API (each apply function takes the ones it knows).
LIGER_PATCHES = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                 "fused_linear_cross_entropy": False}
MAX_WEIGHT_GROUPS = 16  # kernel calls per micro-batch; built-in objectives give <= 3 distinct weights


def grouped_kernel_fits(w: torch.Tensor) -> bool:
    """Can `grouped_linear_ce` take these token weights? One kernel call per distinct value: a micro-batch with more
    (per-message weights from the data, a plug-in objective with graded weights) runs on imtune's chunked head
    instead, which takes any weights, rather than failing."""
    return torch.unique(w).numel() <= MAX_WEIGHT_GROUPS


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None and importlib.util.find_spec("triton") is not None


def resolve_kernels(requested: str, device: torch.device | str) -> tuple[str, str | None]:
    """(`liger` or `none`, reason for an automatic choice or None). `liger` where it cannot run -> ImtuneError."""
    if requested not in KERNELS:
        raise ImtuneError(f"kernels: {requested!r} is not one of {', '.join(KERNELS)}")
    if requested == "none":
        return "none", None
    device = torch.device(device)
    why = None
    if device.type != "cuda":
        why = f"Liger kernels are Triton/CUDA only, this run is on {device.type}"
    elif not liger_installed():
        why = "liger-kernel is not installed (pip install 'imtune[liger]')"
    if why is None:
        return "liger", (f"kernels auto: liger ({liger_version()})" if requested == "auto" else None)
    if requested == "liger":
        raise ImtuneError(f"kernels: liger cannot run here: {why}")
    return "none", f"kernels auto: none ({why})"


def liger_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"liger-kernel {version('liger-kernel')}"
    except PackageNotFoundError:
        return "liger-kernel"


def patch_model(model) -> str:
    """Swap in Liger's RMSNorm/SwiGLU/RoPE for `model`'s family in place; says what happened, in words."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    from imtune.training.logprobs import causal_lm_of

    lm = causal_lm_of(model)
    model_type = getattr(lm.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"no Liger layer patches for model type {model_type!r} (fused loss only)"
    _apply_liger_kernel_to_instance(model=lm, **LIGER_PATCHES)
    return f"Liger RMSNorm/SwiGLU/RoPE patches for {model_type}"


# ------------------------------------------------------------------------------------------ the loss backend


def torch_linear_cross_entropy(_input, weight, target, bias=None, ce_weight=None, ignore_index=-100,
                               lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", softcap=None,
                               return_z_loss=False, accum_dtype=None):
    """Liger's `liger_fused_linear_cross_entropy` contract in plain torch (logits materialised; any dtype, any
    device): the reference backend that the CPU tests run `grouped_linear_ce` over, fp64 included."""
    if ce_weight is not None or lse_square_scale or label_smoothing or return_z_loss:
        raise NotImplementedError("the torch backend implements plain cross-entropy only")
    del accum_dtype  # its accumulation is torch's own
    x = F.linear(_input, weight, bias)
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if softcap is not None:
        x = torch.tanh(x / softcap) * softcap
    return F.cross_entropy(x, target, ignore_index=ignore_index, reduction=reduction)


def liger_linear_cross_entropy(_input, weight, target, bias=None, **kw):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(_input, weight, target, bias, **kw)


BACKENDS = {"liger": liger_linear_cross_entropy, "torch": torch_linear_cross_entropy}


def grouped_linear_ce(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
                      w: torch.Tensor, *, backend=torch_linear_cross_entropy, softcap: float | None = None,
                      compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Σ_i w_i · CE(softcap(h_i·Wᵀ + b), y_i) for [N,H] rows with weights w_i > 0, through an unweighted fused
    linear-CE `backend` (Liger's signature): one `reduction="sum"` call per distinct weight. fp32 (or wider)
    scalar with the gradient of the weighted sum. `compute_dtype` casts h, W and b for the kernel (bf16 under
    autocast; the cast is differentiable, so fp32 master weights get fp32 gradients)."""
    if h.shape[0] == 0:
        # zero gradients rather than none, so backward() and the optimizer see the usual tensors
        return sum(t.sum() for t in (h, weight, bias) if t is not None) * 0.0
    if compute_dtype is not None:
        h, weight = h.to(compute_dtype), weight.to(compute_dtype)
        bias = None if bias is None else bias.to(compute_dtype)
    values, inverse = torch.unique(w, return_inverse=True)
    if values.numel() > MAX_WEIGHT_GROUPS:
        raise ValueError(f"{values.numel()} distinct token weights; the grouped fused loss takes at most "
                         f"{MAX_WEIGHT_GROUPS}")
    acc = torch.promote_types(h.dtype, torch.float32)
    kw = {"reduction": "sum", "softcap": softcap}
    if backend is liger_linear_cross_entropy:
        kw["accum_dtype"] = torch.float32  # weight/bias gradients summed over chunks in fp32, not bf16
    total = torch.zeros((), dtype=acc, device=h.device)
    for k, v in enumerate(values.tolist()):
        idx = (inverse == k).nonzero(as_tuple=True)[0]
        loss = backend(h.index_select(0, idx), weight, y.index_select(0, idx), bias, **kw)
        total = total + v * loss.to(acc)
    return total
