"""Log-likelihood of continuations given contexts, the way lm-evaluation-harness computes it, with prompt reuse.

`loglikelihood(model, tokenizer, [(context, continuation), ...])` returns `(sum log p(continuation | context),
is_greedy)` per request, matching lm-eval's `HFLM.loglikelihood` request for request:

* tokenisation: trailing whitespace of the context moves onto the continuation, the concatenation is encoded
  whole and split at the context's token count (so the boundary tokenises as in running text); an empty context
  is replaced by a prefix token (BOS, else EOS); no special tokens unless `add_bos` (lm-eval adds BOS only for
  Gemma, and so do we by default);
* truncation: context+continuation keeps its last `max_length + 1` tokens;
* `is_greedy`: every continuation token is the argmax at its position.

Prompt reuse. Multiple-choice tasks ask for the same context with several continuations. Requests whose
(truncated) context tokens are equal are packed into ONE row: context, then each continuation minus its last
token, with a 4D attention mask in which every continuation sees the context and itself only, and position ids
that restart after the context for each continuation. The context is therefore run once per question, and a
single-token continuation (MMLU's " A".." D") adds nothing to the row at all: its log-prob is read from the
context's last position, so such a row is an ordinary causal sequence and runs with the model's own mask.
The rows are laid out by `training.batching.collate_prefix_rows` and scored by the token log-prob engine
(`training.logprobs.score_tokens`), which applies the vocabulary projection only at the scored positions, the
engine that also gives the training and held-out losses. Packing was chosen over a shared KV cache because it batches rows of different lengths with
plain right padding and needs no cache copies per choice; bench/eval_scoring.py measures all three ways.

lm-eval, by comparison, reuses a forward pass only when every choice is one token (its Collator groups requests
by context + continuation[:-1]); for multi-token choices each one re-runs the whole context.

Packing is skipped (one plain causal row per request; `reuse=False` does this for everything) where a custom 4D
mask would be wrong: flash-attention kernels (they ignore it) and sliding-window models whose packed row is
longer than the window (the custom mask replaces the model's own sliding mask).
"""

from __future__ import annotations

from collections.abc import Sequence

from imtune.config import DEFAULT_MAX_LENGTH

Request = tuple[str, str]


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def prefix_token_id(tokenizer) -> int:
    """What stands in for an empty context: BOS when the tokenizer has one, else EOS (as lm-eval)."""
    for tid in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to stand in for an empty context")


def default_add_bos(model) -> bool:
    """lm-eval's default: plain text without BOS, except for Gemma models, which degrade badly without it."""
    mtype = str(getattr(getattr(model, "config", None), "model_type", "") or "")
    return "gemma" in mtype.lower()


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool = False) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split the lm-eval way (see the module docstring)."""
    if context == "":
        cont = _encode(tokenizer, continuation)
        return [prefix_token_id(tokenizer)], cont
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    cont = whole[len(ctx):]
    if add_bos or not ctx:
        # A whitespace-only context has no tokens left once its spaces move to the continuation; something must
        # predict the first continuation token.
        bos = prefix_token_id(tokenizer)
        if not add_bos or not ctx or ctx[0] != bos:
            ctx = [bos] + ctx
    return ctx, cont


def max_length_of(model, tokenizer=None, default: int = DEFAULT_MAX_LENGTH) -> int:
    """Longest input, found as lm-eval's HFLM does: the model config's position limit, else the tokenizer's
    model_max_length (unless it is the 'unset' sentinel), else DEFAULT_MAX_LENGTH."""
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    t = getattr(tokenizer, "model_max_length", None)
    if isinstance(t, int) and 0 < t < 10**9:
        return t
    return default


def _packing_ok(model) -> int | None:
    """Longest packed row allowed (None: no limit), or 0 when packing is off for this model."""
    cfg = getattr(model, "config", None)
    impl = str(getattr(cfg, "_attn_implementation", "") or "")
    if "flash" in impl or "flex" in impl:
        return 0
    cfg = getattr(cfg, "text_config", None) or cfg
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) is not False:
        return int(window)
    return None


def loglikelihood(model, tokenizer, requests: Sequence[Request], batch_size: int = 16, *, reuse: bool = True,
                  add_bos: bool | None = None, max_length: int | None = None,
                  progress: bool = False) -> list[tuple[float, bool]]:
    """(sum of continuation log-probs, is_greedy) for each (context, continuation), in request order.

    `batch_size` counts rows per forward pass; with `reuse`, a row holds all the requests sharing a context.
    Rows are processed longest first, so an out-of-memory error shows up on the first batch, not the last.
    """
    if add_bos is None:
        add_bos = default_add_bos(model)
    pairs = [encode_pair(tokenizer, context, continuation, add_bos=add_bos) for context, continuation in requests]
    return loglikelihood_tokens(model, pairs, batch_size, reuse=reuse,
                                max_length=max_length or max_length_of(model, tokenizer), progress=progress)


def loglikelihood_tokens(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 16, *,
                         reuse: bool = True, max_length: int | None = None,
                         progress: bool = False) -> list[tuple[float, bool]]:
    """`loglikelihood` for requests that are already token ids: (context ids, continuation ids), the context
    non-empty (it predicts the first continuation token). lm-eval backends and rolling windows enter here."""
    import torch
    from tqdm.auto import tqdm

    if not pairs:
        return []
    items = _truncate(pairs, max_length or max_length_of(model))
    batches = _plan_batches(items, _packing_ok(model) if reuse else 0, batch_size)
    results: list[tuple[float, bool] | None] = [(0.0, True) if not cont else None for _, cont in items]
    was_training = model.training
    model.eval()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    bar = tqdm(total=len(items), desc="scoring", unit="req", disable=not progress, leave=False)
    try:
        with torch.inference_mode():
            for packed, batch in batches:
                _score_batch(model, batch, items, results, dtype, packed=packed)
                bar.update(sum(len(idx) for _, idx in batch))
    finally:
        bar.close()
        if was_training:
            model.train()
    return results  # type: ignore[return-value]


def _truncate(pairs, max_length: int) -> list[tuple[tuple[int, ...], list[int]]]:
    """Like lm-eval: context + continuation keeps its last max_length + 1 tokens."""
    items = []
    for ctx, cont in pairs:
        cont = list(cont)
        if len(cont) > max_length:
            raise ValueError(f"continuation of {len(cont)} tokens exceeds the model's {max_length}-token context")
        if cont and not ctx:
            raise ValueError("a request with an empty context has nothing to predict its first token from")
        whole = (list(ctx) + cont)[-(max_length + 1):]
        items.append((tuple(whole[:len(whole) - len(cont)]), cont))
    return items


def _plan_batches(items, limit: int | None, batch_size: int) -> list[tuple[bool, list]]:
    """Rows (context tokens, request indices) grouped into (packed?, rows) batches, longest first.

    Requests with equal context tokens share a row unless packing is off (`limit` 0) or the row would exceed
    `limit` tokens."""
    rows: list[tuple[tuple[int, ...], list[int]]] = []
    if limit == 0:
        rows = [(items[i][0], [i]) for i in range(len(items))]
    else:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(items):
            groups.setdefault(ctx, []).append(i)
        for ctx, idx in groups.items():
            packed_len = len(ctx) + sum(max(len(items[i][1]) - 1, 0) for i in idx)
            if limit is not None and packed_len > limit:
                rows.extend((ctx, [i]) for i in idx)
            else:
                rows.append((ctx, idx))

    def row_len(r):
        ctx, idx = r
        return len(ctx) + sum(max(len(items[i][1]) - 1, 0) for i in idx)

    # A row with at most one multi-token continuation is an ordinary causal sequence (context, then that
    # continuation; single-token continuations add no tokens), so it runs with the model's own causal mask and
    # fast attention path. Only rows holding several multi-token continuations need the packed 4D mask.
    def needs_packing(r):
        return sum(len(items[i][1]) > 1 for i in r[1]) > 1

    batches = []
    for kind in (True, False):
        same = sorted((r for r in rows if needs_packing(r) == kind), key=lambda r: (-row_len(r), r[1][0]))
        cur, total = [], 0
        for r in same:
            n = row_len(r)
            # A new batch also starts when padding would exceed a fifth of the batch: on CPU a padded token costs
            # as much as a real one, and batching long rows buys little there anyway.
            if cur and (len(cur) == batch_size or (len(cur) + 1) * row_len(cur[0]) > 1.25 * (total + n)):
                batches.append((kind, cur))
                cur, total = [], 0
            cur.append(r)
            total += n
        if cur:
            batches.append((kind, cur))
    batches.sort(key=lambda kb: -row_len(kb[1][0]))
    return batches


def _score_batch(model, batch, items, results, dtype, packed: bool) -> None:
    """Score one batch of rows (context, request indices) and fill in `results` for its requests."""
    import torch

    from imtune.training.batching import collate_prefix_rows
    from imtune.training.logprobs import score_tokens

    rows, live = [], []
    for ctx, idx in batch:
        idx = [i for i in idx if items[i][1]]
        rows.append((ctx, [items[i][1][:-1] for i in idx]))
        live.append(idx)
    if not any(live):
        return
    device = next(model.parameters()).device
    b = collate_prefix_rows(rows, 0, shared=packed, mask_dtype=dtype)
    r, c, y, owner = _targets(rows, live, items, b.pop("seg_starts"))
    scores = score_tokens(model, {k: v.to(device) for k, v in b.items()}, r, c, y)
    owner = owner.to(scores.logprob.device)
    total = torch.zeros(len(items), dtype=torch.float64, device=owner.device).index_add_(
        0, owner, scores.logprob.double())
    missed = torch.zeros(len(items), dtype=torch.int64, device=owner.device).index_add_(
        0, owner, (~scores.greedy).long())
    total, missed = total.cpu().tolist(), missed.cpu().tolist()
    for i in {i for idx in live for i in idx}:
        results[i] = (float(total[i]), missed[i] == 0)


def _targets(rows, live, items, seg_starts):
    """(row, position, target, request) of every scored continuation token, as four long tensors.

    Token t of a continuation is predicted at the context's last position (t = 0) or at its segment's position
    holding token t-1."""
    import torch

    r, c, y, owner = [], [], [], []
    for b, ((ctx, _), idx, starts) in enumerate(zip(rows, live, seg_starts, strict=True)):
        n = len(ctx)
        for i, s in zip(idx, starts, strict=True):
            cont = items[i][1]
            r += [b] * len(cont)
            c += [n - 1] + list(range(s, s + len(cont) - 1))
            y += cont
            owner += [i] * len(cont)
    return tuple(torch.tensor(v, dtype=torch.long) for v in (r, c, y, owner))
