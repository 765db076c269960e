"""Turn `Encoded` examples into model batches, and plan which examples go together.

Three layouts, the only ones the token log-prob engine (`training.logprobs`) is fed:
  * `collate`: right-padded [B,T] rows with an attention mask (dynamic padding to the longest example).
  * `collate_prefix_rows`: right-padded rows of one context followed by several continuations that each see the
    context and themselves only (a 4D mask and restarting position ids), so a shared context runs once.
  * `pack`: several examples concatenated into one [1,T] row with no attention mask and `position_ids` that
    restart at 0 for each example. transformers >= 4.56 detects such rows in `masking_utils`
    (`find_packed_sequence_indices`) and builds a block-diagonal causal mask for eager/sdpa/flex (flash-attention
    derives cu_seqlens from the same position_ids), so no example attends to another. The detection is skipped
    whenever a cache object exists, so the forward must pass `use_cache=False` (`logprobs.forward_hidden` does);
    `supports_packing` checks the whole thing empirically on the actual model.

Planning is numpy-only and a pure function of (lengths, seed, epoch), so resuming mid-epoch needs no RNG state.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence

import numpy as np
import torch

MEGABATCH_MULT = 50  # micro-batches per length-sorted mega-batch, as in transformers' LengthGroupedSampler


def _arrays(ex) -> tuple[list[int], list[float]]:
    ids, w = ex.input_ids, ex.weights
    if len(ids) != len(w):
        raise ValueError(f"example {getattr(ex, 'id', '?')!r}: {len(ids)} input_ids but {len(w)} weights")
    if len(ids) == 0:
        raise ValueError(f"example {getattr(ex, 'id', '?')!r} is empty")
    return ids, w


def collate(examples: Sequence, pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`/`attention_mask` (long) and `weights` (float32, 0 at padding and at t=0)."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    rows = [_arrays(e) for e in examples]
    input_ids, mask, width = _pad([ids for ids, _ in rows], pad_token_id, pad_to_multiple_of)
    weights = np.zeros((len(rows), width), dtype=np.float32)
    for i, (_, w) in enumerate(rows):
        weights[i, :len(w)] = w
    weights[:, 0] = 0.0  # nothing predicts the first token
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask),
            "weights": torch.from_numpy(weights)}


def _pad(rows: Sequence[Sequence[int]], pad_token_id: int, multiple: int | None = None, left: bool = False):
    """Padded [B,T] ids and the 0/1 attention mask (both int64), and T. Right padding unless `left`."""
    t = max(len(r) for r in rows)
    if multiple:
        t = -(-t // multiple) * multiple
    input_ids = np.full((len(rows), t), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), t), dtype=np.int64)
    for i, r in enumerate(rows):
        span = slice(t - len(r), t) if left else slice(0, len(r))
        input_ids[i, span] = r
        mask[i, span] = 1
    return input_ids, mask, t


def pad_left(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded `input_ids` and `attention_mask` [B,T]: prompts for batched generation end at the same column."""
    input_ids, mask, _ = _pad(rows, pad_token_id, left=True)
    return torch.from_numpy(input_ids), torch.from_numpy(mask)


def collate_prefix_rows(rows: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], pad_token_id: int, *,
                        shared: bool, mask_dtype: torch.dtype = torch.float32) -> dict:
    """Rows of (context, [segment, ...]) laid out as context + segment + segment ...; `seg_starts[b]` holds where
    each segment of row b begins.

    `shared=False`: a plain causal row with a 2D attention mask (right for a row with at most one non-empty
    segment). `shared=True`: every segment attends to the context and to itself only (a 4D additive mask of
    `mask_dtype`) and its position ids continue from the context's, as if it alone followed the context.
    """
    if not rows:
        raise ValueError("cannot collate an empty batch")
    tokens, starts = [], []
    for ctx, segs in rows:
        t, st = list(ctx), []
        for seg in segs:
            st.append(len(t))
            t.extend(seg)
        tokens.append(t)
        starts.append(st)
    input_ids, mask, width = _pad(tokens, pad_token_id)
    out = {"input_ids": torch.from_numpy(input_ids), "seg_starts": starts}
    if not shared:
        out["attention_mask"] = torch.from_numpy(mask)
        return out
    allowed = torch.zeros((len(rows), width, width), dtype=torch.bool)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    causal = torch.ones((width, width), dtype=torch.bool).tril_()
    for b, ((ctx, segs), st) in enumerate(zip(rows, starts, strict=True)):
        n = len(ctx)
        position_ids[b, :n] = torch.arange(n)
        allowed[b, :n, :n] = causal[:n, :n]
        for s, seg in zip(st, segs, strict=True):
            k = len(seg)
            position_ids[b, s:s + k] = torch.arange(n, n + k)
            allowed[b, s:s + k, :n] = True
            allowed[b, s:s + k, s:s + k] = causal[:k, :k]
        pad = torch.arange(len(tokens[b]), width)
        allowed[b, pad, pad] = True  # padding attends to itself only, so no softmax row is empty (NaN)
    additive = torch.zeros((len(rows), 1, width, width), dtype=mask_dtype)
    additive.masked_fill_(~allowed[:, None], torch.finfo(mask_dtype).min)
    out.update(attention_mask=additive, position_ids=position_ids)
    return out


def pack(examples: Sequence, max_length: int) -> dict[str, torch.Tensor]:
    """One padding-free row: `input_ids`, `position_ids`, `weights` as [1,T], and `seq_lens` [k] (long).

    The first token of every example gets weight 0: it would otherwise be "predicted" from the previous example.
    """
    if not examples:
        raise ValueError("cannot pack an empty list")
    rows = [_arrays(e) for e in examples]
    lens = [len(ids) for ids, _ in rows]
    total = sum(lens)
    if total > max_length:
        raise ValueError(f"{len(rows)} examples total {total} tokens > max_length {max_length}")
    input_ids = np.fromiter((t for ids, _ in rows for t in ids), dtype=np.int64, count=total)
    weights = np.fromiter((x for _, w in rows for x in w), dtype=np.float32, count=total)
    starts = np.cumsum([0] + lens[:-1])
    weights[starts] = 0.0
    position_ids = np.arange(total, dtype=np.int64) - np.repeat(starts, lens)
    return {"input_ids": torch.from_numpy(input_ids)[None], "position_ids": torch.from_numpy(position_ids)[None],
            "weights": torch.from_numpy(weights)[None], "seq_lens": torch.tensor(lens, dtype=torch.long)}


def supports_packing(model) -> bool:
    """True when a packed row gives the same logits as its examples run one by one, on this very model.

    Runs three tiny no-grad forwards in eval mode (the model's training flags are restored afterwards).
    """
    from imtune.training.logprobs import _eval_mode, causal_lm_of

    lm = causal_lm_of(model)
    vocab = lm.config.get_text_config().vocab_size
    try:
        device = next(lm.parameters()).device
    except StopIteration:
        return False
    a = torch.tensor([[11, 23, 35, 47, 59, 71]], device=device) % vocab
    b = torch.tensor([[83, 95, 7, 19]], device=device) % vocab
    ids = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(a.shape[1]), torch.arange(b.shape[1])])[None].to(device)
    try:
        with torch.no_grad(), _eval_mode(lm):
            la = lm(input_ids=a, use_cache=False).logits.float()
            lb = lm(input_ids=b, use_cache=False).logits.float()
            lp = lm(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
    except Exception:  # any failure means "do not pack"
        return False
    sep = torch.cat([la, lb], 1)
    exact = next(lm.parameters()).dtype == torch.float32 and not torch.is_autocast_enabled(device.type)
    tol = (1e-4 if exact else 3e-2) * (1.0 + sep.abs().max())
    return bool(((lp - sep).abs().max() <= tol).item())


# -------------------------------------------------------------------------------------------------- planning


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch)])


def plan_batches(lengths: Sequence[int], micro_batch_size: int, *, seed: int, epoch: int,
                 group_by_length: bool = True, shuffle: bool = True) -> list[list[int]]:
    """Micro-batches of example indices covering every index exactly once.

    With `group_by_length`: shuffle, cut into mega-batches of `MEGABATCH_MULT` micro-batches, sort each by length
    (longest first), cut into micro-batches, shuffle the micro-batch order, then move the micro-batch with the
    most padded tokens to the front so an out-of-memory shows at step 0 rather than hours in.
    """
    if micro_batch_size < 1:
        raise ValueError("micro_batch_size must be >= 1")
    lens = np.asarray(lengths, dtype=np.int64)
    n = len(lens)
    if n == 0:
        return []
    rng = _rng(seed, epoch)
    order = rng.permutation(n) if shuffle else np.arange(n)
    if not group_by_length:
        return [order[i:i + micro_batch_size].tolist() for i in range(0, n, micro_batch_size)]
    mega = micro_batch_size * MEGABATCH_MULT
    batches: list[list[int]] = []
    cost: list[np.ndarray] = []  # padded tokens of each micro-batch: its size x its longest (the first, once sorted)
    for m0 in range(0, n, mega):
        chunk = order[m0:m0 + mega]
        chunk = chunk[np.argsort(-lens[chunk], kind="stable")]
        starts = np.arange(0, len(chunk), micro_batch_size)
        batches.extend(chunk[i:i + micro_batch_size].tolist() for i in starts.tolist())
        cost.append(np.minimum(micro_batch_size, len(chunk) - starts) * lens[chunk[starts]])
    if shuffle:
        perm = rng.permutation(len(batches))
        batches = [batches[i] for i in perm]
        first = int(np.argmax(np.concatenate(cost)[perm]))
        batches.insert(0, batches.pop(first))
    return batches


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of padded positions when each batch is padded to its longest example."""
    lens = np.asarray(lengths, dtype=np.int64)
    sizes = np.fromiter((len(bt) for bt in batches), dtype=np.int64, count=len(batches))
    sizes = sizes[sizes > 0]
    if not len(sizes):
        return 0.0
    flat = lens[np.fromiter((i for bt in batches for i in bt), dtype=np.int64, count=int(sizes.sum()))]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    padded = int((sizes * np.maximum.reduceat(flat, starts)).sum())
    return 0.0 if padded == 0 else 1.0 - int(flat.sum()) / padded


def pack_plan(lengths: Sequence[int], max_length: int, *, seed: int, epoch: int) -> list[list[int]]:
    """Bins of example indices, each totalling <= max_length tokens, every index exactly once.

    Best-fit decreasing (O(n log n) with a sorted list of free space): examples are shuffled with (seed, epoch)
    and then stably sorted longest first, so ties break differently each epoch; the bin order is shuffled too.
    """
    lens = np.asarray(lengths, dtype=np.int64)
    if len(lens) and (lens.max() > max_length or lens.min() < 1):
        bad = int(np.argmax((lens > max_length) | (lens < 1)))
        raise ValueError(f"example {bad} has {int(lens[bad])} tokens; each must be 1..max_length ({max_length})")
    rng = _rng(seed, epoch)
    order = rng.permutation(len(lens))
    order = order[np.argsort(-lens[order], kind="stable")]
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, bin id), sorted
    for i in order.tolist():
        need = int(lens[i])
        k = bisect_left(free, (need, -1))
        if k < len(free):
            space, b = free.pop(k)
            bins[b].append(i)
            if space - need > 0:
                insort(free, (space - need, b))
        else:
            bins.append([i])
            if max_length - need > 0:
                insort(free, (max_length - need, len(bins) - 1))
    return [bins[j] for j in rng.permutation(len(bins))]
