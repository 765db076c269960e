"""The one token log-probability engine: every loss and every likelihood in imtune comes from here.

One forward pass per batch, with `logits_to_keep=1` so no [tokens x vocab] tensor is built (the top-level forward,
and with it any DDP/peft wrapper and its hooks, still runs); a forward hook on the backbone captures the final
hidden states, and the LM head (with the model's own logit scaling/softcapping, checked against the model's own
last-position logits) is applied in chunks to the positions that are scored only. Models whose forward has no
`logits_to_keep` fall back to computing their full logits once (the one probe of that argument, `_run_hidden`).

Users of the engine:
  * training loss (`training.loss.weighted_loss_sum`, with gradients and the KL term) on `batching.collate`/`pack`;
  * held-out loss during training and the per-example loss probe (`score_weighted`) on `batching.collate`;
  * benchmark log-likelihoods (`score_tokens` at arbitrary positions and targets) on
    `batching.collate_prefix_rows`, which shares one context between several continuations.
A batch is a dict with `input_ids` and `attention_mask` (2D, or 4D for prefix-shared rows) and/or `position_ids`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

# ----------------------------------------------------------------------------------------------- model plumbing

def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / accelerate / torch.compile wrappers (not peft)."""
    m = model
    while True:
        inner = getattr(m, "_orig_mod", None)
        if inner is None and isinstance(getattr(m, "module", None), nn.Module):
            inner = m.module
        if not isinstance(inner, nn.Module):
            return m
        m = inner


def peft_model_of(model: nn.Module):
    """The `PeftModel` inside `model`, or None."""
    m = unwrap_model(model)
    return m if hasattr(m, "peft_config") and hasattr(m, "disable_adapter") and hasattr(m, "get_base_model") else None


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The transformers `*ForCausalLM` (or multimodal generation model) under any wrapper."""
    m = unwrap_model(model)
    if peft_model_of(m) is not None:
        if getattr(m.active_peft_config, "is_prompt_learning", False):
            raise NotImplementedError("prompt-learning peft methods (prefix/prompt tuning) are not supported")
        m = m.get_base_model()
    return m


def _backbone(lm: nn.Module) -> nn.Module:
    dec = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    if dec is None or dec is lm:
        raise TypeError(f"cannot find the decoder backbone of {type(lm).__name__}")
    return dec


@dataclass(frozen=True)
class _LogitTransform:
    """What the model does to `lm_head(h)`: z = cap·tanh(scale·x / cap) (or scale·x without a cap)."""

    scale: float = 1.0
    cap: float | None = None


def _logit_transform(lm: nn.Module) -> _LogitTransform:
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    scale = 1.0
    if isinstance(getattr(lm, "logit_scale", None), (int, float)):  # Cohere multiplies
        scale *= float(lm.logit_scale)
    if getattr(cfg, "logits_scaling", None):  # Granite divides
        scale /= float(cfg.logits_scaling)
    cap = getattr(cfg, "final_logit_softcapping", None) or None  # Gemma 2/3
    return _LogitTransform(scale, float(cap) if cap else None)


def _transform(x: torch.Tensor, tf: _LogitTransform) -> torch.Tensor:
    if tf.scale != 1.0:
        x = x * tf.scale
    if tf.cap is not None:
        x = torch.tanh(x / tf.cap) * tf.cap
    return x


def _head_logits(head: nn.Module, tf: _LogitTransform, h: torch.Tensor) -> torch.Tensor:
    return _transform(head(h).float(), tf)


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    # The reference must be deterministic (no dropout, no NEFTune noise); restore each module's own flag, since
    # some are deliberately kept in eval mode during training.
    flags = [(m, m.training) for m in module.modules()]
    module.train(False)
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f


def _model_inputs(batch: dict) -> dict:
    out = {"input_ids": batch["input_ids"]}
    for k in ("attention_mask", "position_ids"):
        if batch.get(k) is not None:
            out[k] = batch[k]
    return out


def _run_hidden(model: nn.Module, backbone: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Final hidden states [B,T,H] plus the model's own logits at the last position (a free check on the head).

    `use_cache=False` matters beyond speed: with a cache object present transformers skips the packed-sequence
    detection from `position_ids`, and packed rows would attend across examples.
    """
    box: list[torch.Tensor] = []

    def grab(_mod, _args, out):
        box.append(out[0] if isinstance(out, tuple) else out.last_hidden_state)

    handle = backbone.register_forward_hook(grab)
    try:
        try:
            out = model(**_model_inputs(batch), use_cache=False, logits_to_keep=1)
        except TypeError as e:  # a model without logits_to_keep: correct, just computes the full logits once
            if "logits_to_keep" not in str(e):
                raise
            box.clear()
            out = model(**_model_inputs(batch), use_cache=False)
    finally:
        handle.remove()
    if not box:
        raise RuntimeError("the backbone did not run during the model's forward")
    logits = out[0] if isinstance(out, tuple) else getattr(out, "logits", None)
    return box[-1], (None if logits is None else logits[:, -1])


def _check_head(lm: nn.Module, head: nn.Module, tf: _LogitTransform, h_last: torch.Tensor,
                model_logits: torch.Tensor | None) -> None:
    """Refuse models whose logits are not `transform(lm_head(h))` (an unknown post-processing step)."""
    if model_logits is None:
        return
    with torch.no_grad():
        ours = _head_logits(head, tf, h_last)
        ref = model_logits.float()
        rel = 1e-4 if model_logits.dtype == torch.float32 else 2e-2
        err = (ours - ref).abs().max()
        bad = bool(err > 1e-4 + rel * ref.abs().max())
    if bad:
        raise NotImplementedError(
            f"{type(lm).__name__}: the model's logits differ from lm_head(h) after the known scaling/softcapping "
            f"(max err {float(err):.3g}); imtune does not support its logit post-processing")


def _plain_weight(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) when the head is an ordinary dense nn.Linear we may multiply by directly."""
    if type(head) is not nn.Linear:
        return None
    w = head.weight
    # DTensor (FSDP2), ZeRO-3 placeholders and resharded flat params only become real inside the module's own
    # forward, so those heads must be called, not multiplied by.
    if (type(w) not in (torch.Tensor, nn.Parameter) or w.device.type == "meta" or hasattr(w, "ds_id")
            or tuple(w.shape) != (head.out_features, head.in_features)):
        return None
    return w, head.bias


# -------------------------------------------------------------------------------------------------- the engine


@dataclass
class Head:
    """The pieces that turn final hidden states into the model's logits."""

    lm: nn.Module
    module: nn.Module
    tf: _LogitTransform

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return _head_logits(self.module, self.tf, h)


def forward_hidden(model: nn.Module, batch: dict) -> tuple[Head, torch.Tensor]:
    """Run `model` once on `batch`; its LM head and final hidden states [B,T,H] (head checked against the model)."""
    lm = causal_lm_of(model)
    head = Head(lm, lm.get_output_embeddings(), _logit_transform(lm))
    hidden, last_logits = _run_hidden(model, _backbone(lm), batch)
    _check_head(lm, head.module, head.tf, hidden[:, -1], last_logits)
    return head, hidden


def weighted_positions(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sel [B,T-1] bool, targets [N], weights [N]): positions t-1 that predict a token t with weight > 0."""
    input_ids = batch["input_ids"]
    weights = batch["weights"].to(device=input_ids.device, dtype=torch.float32)
    if weights.shape != input_ids.shape:
        raise ValueError(f"weights {tuple(weights.shape)} and input_ids {tuple(input_ids.shape)} differ in shape")
    sel = weights[:, 1:] > 0
    return sel, input_ids[:, 1:][sel], weights[:, 1:][sel]


@dataclass
class TokenScores:
    """Per scored token: its batch row, log p(target), whether the target is the argmax, and its weight."""

    rows: torch.Tensor  # [N] long
    logprob: torch.Tensor  # [N] float32
    greedy: torch.Tensor  # [N] bool
    weight: torch.Tensor  # [N] float32 (1 where no weights were given)

    @property
    def ce_sum(self) -> float:
        return float((self.weight.double() * -self.logprob.double()).sum())

    @property
    def weight_sum(self) -> float:
        return float(self.weight.double().sum())

    def per_row(self, n_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Σ w·CE, Σ w and the number of scored tokens of each batch row (float64, float64, int64; on the CPU)."""
        rows, w = self.rows.cpu(), self.weight.double().cpu()
        ce = torch.zeros(n_rows, dtype=torch.float64).index_add_(0, rows, w * -self.logprob.double().cpu())
        ws = torch.zeros(n_rows, dtype=torch.float64).index_add_(0, rows, w)
        n = torch.zeros(n_rows, dtype=torch.int64).index_add_(0, rows, torch.ones_like(rows))
        return ce, ws, n


def score_tokens(model: nn.Module, batch: dict, rows: torch.Tensor, cols: torch.Tensor, targets: torch.Tensor, *,
                 weights: torch.Tensor | None = None, chunk_size: int = 1024) -> TokenScores:
    """log p(targets[k] | the sequence up to position (rows[k], cols[k])) for every k, without gradients.

    A position may be scored more than once with different targets (continuations that share a context).
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    with torch.no_grad():
        head, hidden = forward_hidden(model, batch)
        rows, cols = rows.to(hidden.device), cols.to(hidden.device)
        return _score_hidden(head, hidden[rows, cols], targets.to(hidden.device), rows, weights, chunk_size)


def score_weighted(model: nn.Module, batch: dict, *, chunk_size: int = 1024) -> TokenScores:
    """`score_tokens` at the weighted positions of a `batching.collate` batch: held-out and per-example loss."""
    with torch.no_grad():
        sel, y, w = weighted_positions(batch)
        head, hidden = forward_hidden(model, batch)
        rows = sel.nonzero(as_tuple=True)[0]  # row-major, the order hidden[sel] flattens to
        return _score_hidden(head, hidden[:, :-1][sel], y, rows, w, chunk_size)


def _score_hidden(head: Head, h: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, w: torch.Tensor | None,
                  chunk_size: int) -> TokenScores:
    lp, greedy = [], []
    for s in range(0, h.shape[0], chunk_size):
        z = head.logits(h[s:s + chunk_size])
        yc = y[s:s + chunk_size, None]
        lp.append((z.gather(1, yc) - torch.logsumexp(z, -1, keepdim=True)).squeeze(1))
        greedy.append(z.argmax(-1) == yc.squeeze(1))
    logprob = torch.cat(lp) if lp else h.new_zeros(0, dtype=torch.float32)
    greedy_t = torch.cat(greedy) if greedy else torch.zeros(0, dtype=torch.bool, device=h.device)
    weight = torch.ones_like(logprob) if w is None else w.to(device=logprob.device, dtype=torch.float32)
    return TokenScores(rows, logprob.float(), greedy_t, weight)
