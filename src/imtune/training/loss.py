"""The training loss: exact weighted next-token loss without a [tokens × vocab] logits tensor, a KL pull toward the
starting model, and NEFTune.

`weighted_loss_sum` is the gradient-carrying side of the token log-prob engine (`training.logprobs`): one forward
with `logits_to_keep=1` and the backbone's final hidden states captured (`forward_hidden`), only the positions whose
*target* carries weight (`weighted_positions`), then lm_head + cross-entropy on those rows in chunks. With a plain `nn.Linear` head (the usual case, tied or not, LoRA or full fine-tuning) a fused autograd
function computes the chunk's gradient analytically while the chunk logits are live, so backward never
recomputes them; any other head (peft-wrapped lm_head, quantised layers) goes through per-chunk
`torch.utils.checkpoint` instead. Either way the peak extra memory is O(chunk_size × vocab). On a GPU the head can
instead run through Liger's fused linear cross-entropy (`kernels`, see `training.kernels`), exact per-token weights
kept by grouping positions by weight.

The returned `loss_sum` is a *sum*: the trainer divides it by a normaliser for the whole optimizer step, so
micro-batching, gradient accumulation and data parallelism do not change the objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from imtune.training.logprobs import (  # noqa: F401  (causal_lm_of, unwrap_model: public via this module too)
    _backbone,
    _eval_mode,
    _head_logits,
    _logit_transform,
    _LogitTransform,
    _plain_weight,
    _run_hidden,
    causal_lm_of,
    forward_hidden,
    peft_model_of,
    unwrap_model,
    weighted_positions,
)

KL_TYPES = ("target_token", "full", "target_token_k1")
# exp() of a log-ratio above this would overflow fp32 long before it means anything; it only occurs when the
# model gives the data token ~e^-30 of the reference probability.
_MAX_LOG_RATIO = 30.0


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # Σ w·CE + kl_coef·Σ w·KL, with grad
    ce_sum: float  # Σ w·CE
    weight_sum: float  # Σ w
    n_weighted: int  # #{t: w_t > 0}
    kl_sum: float = 0.0  # Σ w·KL (0 when kl_coef == 0)


# ------------------------------------------------------------------------------------------------- reference


def reference_weighted_ce(logits: torch.Tensor, input_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_t w_t · CE(logits[t-1], input_ids[t]) on full [B,T,V] logits: the obviously correct version."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    targets = input_ids[:, 1:].reshape(-1)
    ce = F.cross_entropy(shift_logits, targets, reduction="none")
    return (ce * weights[:, 1:].reshape(-1).to(ce.dtype)).sum()


# ------------------------------------------------------------------------------------------------------- KL
#
# Both KL terms are taken only at weighted positions, each scaled by its weight w_t (so the KL follows the
# objective's emphasis), and are summed like the CE term. p = p_model(·|x_<t), q = p_ref(·|x_<t), y = x_t.
#
#   "full":           KL_t = Σ_v p(v) (log p(v) − log q(v))  = KL(p || q), the paper's `kl_penalty_type=full`
#                     (ZhengxiangShi/InstructionModelling src/utils.py: F.kl_div(ref_logprob, logprob,
#                     log_target=True).sum(-1)). Exact and ≥ 0; costs a reference lm_head per chunk.
#   "target_token":   KL_t = r − 1 − log r with log r = log q(y) − log p(y) (Schulman's k3, as TRL's GRPO
#                     per-token KL). ≥ 0 for every token, 0 iff p(y) = q(y); its gradient w.r.t. log p(y) is
#                     1 − q(y)/p(y), a genuine pull toward the reference on the data token. It is an unbiased
#                     KL(p||q) estimate only for y ~ p; here y is the data token, so read it as a penalty.
#   "target_token_k1": KL_t = log p(y) − log q(y), the paper code's literal target-token term
#                     (`compute_kl_penalty(..., "kl")`). Kept to reproduce the paper; note its gradient is exactly
#                     −kl_coef × the CE gradient, so it only rescales the CE term by (1 − kl_coef) and can be
#                     negative.


@dataclass
class _Ref:
    lq_y: torch.Tensor | None = None  # [N] log q(y) for the target-token kinds
    h: torch.Tensor | None = None  # [N,H] reference hidden states for "full"
    logits: Callable[[torch.Tensor], torch.Tensor] | None = None  # ref hidden chunk -> transformed fp32 logits


def _reference(model, batch, sel, kl_type, ref_model, ref_adapter_disabled, chunk_size) -> _Ref:
    if ref_adapter_disabled:
        peft = peft_model_of(model)
        if peft is None:
            raise ValueError("ref_adapter_disabled=True needs a peft model")
        lm = causal_lm_of(peft)
        runner, disable = peft, peft.disable_adapter
    else:
        runner = unwrap_model(ref_model)
        lm = causal_lm_of(runner)
        disable = nullcontext
    backbone, head, tf = _backbone(lm), lm.get_output_embeddings(), _logit_transform(lm)
    with torch.no_grad(), _eval_mode(runner), disable():
        hidden, _ = _run_hidden(runner, backbone, batch)
    h = hidden[:, :-1][sel]
    # A peft-wrapped head changes with the adapter, so the reference head must run with it disabled too.
    head_ctx = disable if (ref_adapter_disabled and _plain_weight(head) is None) else nullcontext

    def ref_logits(hc: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), head_ctx():
            return _head_logits(head, tf, hc)

    if kl_type == "full":
        return _Ref(h=h, logits=ref_logits)
    y = batch["input_ids"][:, 1:][sel]
    parts = []
    for s in range(0, h.shape[0], chunk_size):
        z = ref_logits(h[s:s + chunk_size])
        parts.append(z.gather(1, y[s:s + chunk_size, None]).squeeze(1) - torch.logsumexp(z, -1))
    lq_y = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    return _Ref(lq_y=lq_y)


# ------------------------------------------------------------------------------------------------ the loss


def weighted_loss_sum(model, batch: dict, *, chunk_size: int = 1024, kl_coef: float = 0.0,
                      kl_type: str = "target_token", ref_model=None, ref_adapter_disabled: bool = False,
                      kernels: str = "none") -> LossOutput:
    """Σ_t w_t·CE_t (+ kl_coef·Σ_{w_t>0} w_t·KL_t) over `batch` (`input_ids`, `weights`, and `attention_mask` or
    `position_ids`), never averaged. See the KL block above for `kl_type`. `kernels` picks the lm_head + CE
    backend: `none` (imtune's chunked head), `liger` (Liger's fused kernel, CUDA) or `torch` (the same grouping
    over plain torch, for tests); see `training.kernels` for where a fused backend does not apply."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type must be one of {KL_TYPES}, not {kl_type!r}")
    if kernels not in ("none", "liger", "torch"):
        raise ValueError(f"kernels must be none, liger or torch, not {kernels!r}")
    if not (kl_coef >= 0.0 and math.isfinite(kl_coef)):
        raise ValueError("kl_coef must be finite and >= 0")
    use_kl = kl_coef > 0.0
    if use_kl and ref_model is None and not ref_adapter_disabled:
        raise ValueError("kl_coef > 0 needs ref_model or ref_adapter_disabled=True")

    ref = None
    sel, y, w = weighted_positions(batch)
    if use_kl:
        ref = _reference(model, batch, sel, kl_type, ref_model, ref_adapter_disabled, chunk_size)
    head, hidden = forward_hidden(model, batch)
    h = hidden[:, :-1][sel]
    spec = _Spec(chunk_size, head.tf, kl_coef if use_kl else 0.0, kl_type)
    with _frozen_zero3_head(head.module) as gathered:
        plain = gathered or _plain_weight(head.module)
        if kernels != "none" and plain is not None and not use_kl and head.tf.scale == 1.0 and _kernel_fits(w):
            loss = _kernel_head_loss(h, plain[0], plain[1], y, w, head.tf, kernels)
            ce, kl = loss.detach(), loss.new_zeros(())
        elif plain is not None:
            loss, ce, kl = _fused_head_loss(h, plain[0], plain[1], y, w, ref, spec)
        else:
            loss, ce, kl = _checkpointed_head_loss(h, head.module, y, w, ref, spec)
    ce_sum, kl_sum, w_sum = torch.stack([ce.float(), kl.float(), w.sum()]).tolist()
    return LossOutput(loss, ce_sum, w_sum, int(y.numel()), kl_sum)


@contextmanager
def _frozen_zero3_head(head: nn.Module):
    """(weight, bias) of a frozen DeepSpeed ZeRO-3 head (LoRA) gathered whole for this pass, else None.

    DeepSpeed does not fetch a frozen ZeRO-3 parameter again when a checkpointed chunk is recomputed in the backward
    pass (the recompute sees an empty placeholder), so such a head takes the fused path instead: it computes the
    gradient while each chunk's logits exist and keeps nothing of the weight for the backward pass.
    """
    w = getattr(head, "weight", None)
    if type(head) is not nn.Linear or not hasattr(w, "ds_id") or any(p.requires_grad for p in head.parameters()):
        yield None
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(head.parameters())):
        yield w, head.bias


@dataclass(frozen=True)
class _Spec:
    chunk: int
    tf: _LogitTransform
    kl_coef: float
    kl_type: str


def _kernel_fits(w) -> bool:
    from imtune.training.kernels import grouped_kernel_fits

    return grouped_kernel_fits(w)


def _kernel_head_loss(h, weight, bias, y, w, tf: _LogitTransform, kernels: str) -> torch.Tensor:
    from imtune.training.kernels import BACKENDS, grouped_linear_ce

    dev = h.device.type
    cdtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    with torch.autocast(dev, enabled=False):  # the kernel gets one explicit dtype, as the fused path below
        return grouped_linear_ce(h, weight, bias, y, w, backend=BACKENDS[kernels], softcap=tf.cap,
                                 compute_dtype=cdtype)


# --- generic path: any head module, chunk logits recomputed in backward by checkpoint


def _chunk_terms(hc, yc, wc, lq_c, ref_hc, head, ref, spec: _Spec) -> torch.Tensor:
    logp = _head_logits(head, spec.tf, hc).log_softmax(-1)
    lp_y = logp.gather(1, yc[:, None]).squeeze(1)
    ce = (wc * -lp_y).sum()
    kl = ce.new_zeros(())
    if spec.kl_coef > 0:
        if spec.kl_type == "full":
            lq = ref.logits(ref_hc).log_softmax(-1)
            k = (logp.exp() * (logp - lq)).sum(-1)
        elif spec.kl_type == "target_token":
            d = (lq_c - lp_y).clamp(max=_MAX_LOG_RATIO)
            k = torch.exp(d) - 1 - d
        else:
            k = lp_y - lq_c
        kl = (wc * k).sum()
    return torch.stack([ce + spec.kl_coef * kl, ce.detach(), kl.detach()])


def _checkpointed_head_loss(h, head, y, w, ref: _Ref | None, spec: _Spec):
    need_grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))
    total = h.new_zeros(3, dtype=torch.float32)
    if h.shape[0] == 0:
        total = total + h.sum() * 0.0  # keep the graph connected so backward() still works
    for s in range(0, h.shape[0], spec.chunk):
        e = s + spec.chunk
        args = (h[s:e], y[s:e], w[s:e],
                None if ref is None or ref.lq_y is None else ref.lq_y[s:e],
                None if ref is None or ref.h is None else ref.h[s:e], head, ref, spec)
        total = total + (checkpoint(_chunk_terms, *args, use_reentrant=False) if need_grad else _chunk_terms(*args))
    return total[0], total[1], total[2]


# --- fast path: plain Linear head, gradient computed while each chunk's logits exist
#
# Per weighted position with logits x = h·Wᵀ + b, z = cap·tanh(s·x/cap), p = softmax(z), y the target:
#   ∂CE/∂z = p − e_y
#   full KL:   ∂KL/∂z = p ⊙ (log p − log q − KL)
#   k3:        ∂KL/∂z = (q_y/p_y − 1)(p − e_y)
#   k1:        ∂KL/∂z = −(p − e_y)
#   ∂z/∂x = s·(1 − tanh²)  (s without a cap)
# and ∂/∂h = g·W, ∂/∂W = gᵀ·h, ∂/∂b = Σ g with g = w ⊙ ∂(CE + c·KL)/∂x.


def _fused_head_loss(h, weight, bias, y, w, ref: _Ref | None, spec: _Spec):
    dev = h.device.type
    cdtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    needs = (torch.is_grad_enabled() and h.requires_grad,
             torch.is_grad_enabled() and weight.requires_grad,
             torch.is_grad_enabled() and bias is not None and bias.requires_grad)
    lq_y = None if ref is None else ref.lq_y
    ref_h = None if ref is None else ref.h
    if not any(needs):
        with torch.no_grad():
            loss, ce, kl, *_ = _fused_loop(h, weight, bias, y, w, lq_y, ref_h, ref, spec, cdtype, needs)
        return loss, ce, kl
    return _FusedHeadLoss.apply(h, weight, bias, y, w, lq_y, ref_h, ref, spec, cdtype, needs)


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, y, w, lq_y, ref_h, ref, spec, cdtype, needs):
        loss, ce, kl, gh, gw, gb = _fused_loop(h, weight, bias, y, w, lq_y, ref_h, ref, spec, cdtype, needs)
        # Kept as attributes, not saved tensors: they are gradients, not inputs that autograd must version-check.
        ctx.grads = (gh, gw, gb)
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, g_loss, _g_ce, _g_kl):
        gh, gw, gb = ctx.grads
        ctx.grads = None
        scale = [None if g is None else g * g_loss.to(g.dtype) for g in (gh, gw, gb)]
        return scale[0], scale[1], scale[2], None, None, None, None, None, None, None, None


def _fused_loop(h, weight, bias, y, w, lq_y, ref_h, ref: _Ref | None, spec: _Spec, cdtype, needs):
    need_h, need_w, need_b = needs
    need_grad = any(needs)
    tf, c = spec.tf, spec.kl_coef
    wc_ = weight.to(cdtype)
    bc_ = None if bias is None else bias.to(cdtype)
    gh = torch.empty_like(h) if need_h else None
    gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    gb = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
    ce_acc = torch.zeros((), dtype=torch.float32, device=h.device)
    kl_acc = torch.zeros((), dtype=torch.float32, device=h.device)
    with torch.autocast(h.device.type, enabled=False):
        for s in range(0, h.shape[0], spec.chunk):
            e = min(s + spec.chunk, h.shape[0])
            hc, yc, wc = h[s:e].to(cdtype), y[s:e], w[s:e]
            rows = torch.arange(e - s, device=h.device)
            x = F.linear(hc, wc_, bc_).float()  # becomes z, then log p, then p, then the gradient, in place
            dzdx = None
            if tf.scale != 1.0:
                x.mul_(tf.scale)
            if tf.cap is not None:
                x.div_(tf.cap).tanh_()
                if need_grad:
                    dzdx = (1.0 - x * x).mul_(tf.scale)
                x.mul_(tf.cap)
            lse = torch.logsumexp(x, -1)
            lp_y = x[rows, yc] - lse
            ce_acc += (wc * -lp_y).sum()
            logp = x.sub_(lse[:, None])
            coef = wc  # per-row multiplier of (p − e_y)
            g = None
            if c > 0 and spec.kl_type == "full":
                lq = ref.logits(ref_h[s:e])
                lq = lq.sub_(torch.logsumexp(lq, -1, keepdim=True))
                diff = lq.neg_().add_(logp)  # log p − log q
                p = logp.exp_()
                k = (p * diff).sum(-1)
                kl_acc += (wc * k).sum()
                if need_grad:
                    # w ⊙ [p ⊙ (1 + c(log p − log q − KL)) − e_y]
                    g = diff.sub_(k[:, None]).mul_(c).add_(1.0).mul_(p)
                    g[rows, yc] -= 1.0
                    g.mul_(wc[:, None])
            elif c > 0:
                if spec.kl_type == "target_token":
                    d = (lq_y[s:e] - lp_y).clamp(max=_MAX_LOG_RATIO)
                    r = torch.exp(d)
                    kl_acc += (wc * (r - 1.0 - d)).sum()
                    coef = wc * (1.0 + c * (r - 1.0))
                else:
                    kl_acc += (wc * (lp_y - lq_y[s:e])).sum()
                    coef = wc * (1.0 - c)
            if need_grad:
                if g is None:
                    g = logp.exp_()
                    g[rows, yc] -= 1.0
                    g.mul_(coef[:, None])
                if dzdx is not None:
                    g.mul_(dzdx)
                elif tf.scale != 1.0:
                    g.mul_(tf.scale)
                g = g.to(cdtype)
                if need_h:
                    gh[s:e] = (g @ wc_).to(gh.dtype)
                if need_w:
                    if gw.dtype == g.dtype:
                        gw.addmm_(g.t(), hc)
                    else:
                        gw.add_(g.t() @ hc)
                if need_b:
                    gb.add_(g.sum(0))
    loss = ce_acc + c * kl_acc
    gw = None if gw is None else gw.to(weight.dtype)
    gb = None if gb is None else gb.to(bias.dtype)
    return loss, ce_acc, kl_acc, gh, gw, gb


# ----------------------------------------------------------------------------------------------------- NEFTune


class _Handles:
    def __init__(self, *handles):
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def neftune_scale(shape: tuple[int, int], hidden_size: int, alpha: float, attention_mask=None,
                  position_ids=None, device=None) -> torch.Tensor:
    """Per-token noise bound alpha/sqrt(L·d) as a [B,T] float tensor, 0 at padding.

    L is the number of real tokens of the token's own sequence: from `attention_mask` for padded batches, the
    length of the packed example (segments restart where position_ids does not step by 1) for packed rows, else T.
    """
    b, t = shape
    d = float(hidden_size)
    if attention_mask is not None and tuple(attention_mask.shape) == (b, t):
        m = attention_mask.to(device=device, dtype=torch.float32)
        n = m.sum(1, keepdim=True).clamp_min(1.0)
        return alpha / torch.sqrt(n * d) * m
    if position_ids is not None and position_ids.shape[-1] == t:
        pos = position_ids.to(device).expand(b, t)
        starts = torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1
        seg = starts.long().cumsum(-1) + torch.arange(b, device=pos.device)[:, None] * t  # unique across rows
        counts = torch.bincount(seg.reshape(-1), minlength=b * t).to(torch.float32)
        return alpha / torch.sqrt(counts[seg] * d)
    return torch.full((b, t), alpha / math.sqrt(t * d), device=device)


def neftune_hook(model: nn.Module, alpha: float) -> _Handles:
    """NEFTune (Jain et al. 2023): add U(−1,1)·alpha/sqrt(L·d) to the input embeddings while the embedding module
    is in training mode. L counts a sequence's real tokens (per packed example for packed rows), so padding
    neither dilutes the noise nor receives any. Returns a handle whose `.remove()` detaches everything."""
    if alpha < 0 or not math.isfinite(alpha):
        raise ValueError("neftune alpha must be finite and >= 0")
    lm = causal_lm_of(model)
    backbone, emb = _backbone(lm), lm.get_input_embeddings()
    d = getattr(emb, "embedding_dim", None) or emb.weight.shape[-1]
    state: dict = {}

    # The embedding hook only sees input_ids; the backbone's call carries the mask/positions that define L.
    def remember(_mod, args, kwargs):
        state["attention_mask"] = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        state["position_ids"] = kwargs.get("position_ids", args[2] if len(args) > 2 else None)

    def forget(_mod, _args, _kwargs, _out):
        state.clear()

    def add_noise(mod, _args, out):
        if not mod.training or alpha == 0:
            return None
        am, pos = state.get("attention_mask"), state.get("position_ids")
        if am is not None and am.dim() != 2:
            am = None
        mag = neftune_scale(tuple(out.shape[:2]), d, alpha, am, pos, out.device)
        noise = torch.empty_like(out).uniform_(-1.0, 1.0)
        return out + (noise * mag[..., None].to(out.dtype)).detach()

    return _Handles(backbone.register_forward_pre_hook(remember, with_kwargs=True),
                    backbone.register_forward_hook(forget, with_kwargs=True),
                    emb.register_forward_hook(add_noise))
