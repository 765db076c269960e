"""Batched text generation for evaluation and chat: left padding, length-sorted batches, KV cache, stop strings.

`generate_texts` is the one entry point. Prompts are raw text (any chat template is applied by the caller); the
returned completions exclude the prompt, stop at EOS or the chat template's end-of-turn token, and are cut at the
first stop string. Generation itself is transformers' `generate` (KV-cached), which also watches for the stop
strings (`stop_strings=`, matched on tokens as they are produced), so a row stops as soon as it has completed one.
"""


from __future__ import annotations

from collections.abc import Sequence

from imtune.masking.templates import END_OF_TURN


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids of the tokenizer and model plus end-of-turn tokens that the chat template emits (e.g. <|im_end|>).

    A chat-tuned model ends a reply with its template's end-of-turn marker, which is often not its EOS token
    (e.g. a base model's <|endoftext|> with a chatml template's <|im_end|>), so both must stop generation.
    """
    ids: list[int] = []

    def add(x):
        if x is None:
            return
        for i in (x if isinstance(x, (list, tuple)) else [x]):
            if i is not None and int(i) >= 0 and int(i) not in ids:
                ids.append(int(i))

    add(getattr(tokenizer, "eos_token_id", None))
    gen_cfg = getattr(model, "generation_config", None)
    if gen_cfg is not None:
        add(gen_cfg.eos_token_id)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # some tokenizers keep several named templates
        template = " ".join(str(v) for v in template.values())
    if template:
        unk = getattr(tokenizer, "unk_token_id", None)
        for marker in END_OF_TURN:
            if marker in template:
                tid = tokenizer.convert_tokens_to_ids(marker)
                # Only a marker that is one real token can be a stop id; multi-token markers are left to `stop`.
                if isinstance(tid, int) and tid != unk and tokenizer.convert_ids_to_tokens(tid) == marker:
                    add(tid)
    return ids


def truncate_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    if not stop:
        return text
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def generate_texts(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 256, do_sample: bool = False,
                   temperature: float = 1.0, top_p: float = 1.0, stop: list[str] | None = None,
                   batch_size: int = 8, seed: int = 0, add_special_tokens: bool = False,
                   progress: bool = True) -> list[str]:
    """Complete each prompt; results come back in input order.

    Batches are formed from prompts sorted by token length (longest first: least padding, and an out-of-memory
    error shows up on the first batch rather than the last). Sampling is deterministic for a given `seed`, prompt
    list and batch size: each batch reseeds a forked RNG, so the caller's global RNG state is left untouched.
    `temperature <= 0` means greedy. Top-k is disabled so that `top_p` alone shapes sampling (as in the Codex
    paper's pass@k setup), whatever the model's own generation_config says.
    """
    import torch
    from tqdm.auto import tqdm

    if not prompts:
        return []
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    stop = [s for s in (stop or []) if s]
    eos_ids = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    encoded = _encode_prompts(model, tokenizer, prompts, max_new_tokens, add_special_tokens, eos_ids, pad_id)
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    gen_kwargs = _generation_kwargs(tokenizer, max_new_tokens, do_sample and not (temperature is not None
                                                                                and temperature <= 0),
                                    temperature, top_p, eos_ids, pad_id, stop)
    out: list[str | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    fork_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    bar = tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not progress, leave=False)
    try:
        with torch.inference_mode(), torch.random.fork_rng(devices=fork_devices):
            batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
            for b, idx in enumerate(batches):
                torch.manual_seed(seed + b)
                news = _generate(model, [encoded[i] for i in idx], pad_id, gen_kwargs)
                for i, new in zip(idx, news, strict=True):
                    out[i] = _finish(model, tokenizer, encoded[i], new, gen_kwargs, eos_ids, stop, pad_id)
                bar.update(len(idx))
    finally:
        bar.close()
        if was_training:
            model.train()
    return out  # type: ignore[return-value]


def _generate(model, rows: list[list[int]], pad_id: int, kwargs: dict) -> list[list[int]]:
    """The new tokens of each row (rows that stopped early are filled up with `pad_id` by `generate`)."""
    from imtune.training.batching import pad_left

    device = next(model.parameters()).device
    input_ids, attn = pad_left(rows, pad_id)
    seqs = model.generate(input_ids=input_ids.to(device), attention_mask=attn.to(device), **kwargs)
    return seqs[:, input_ids.shape[1]:].tolist()


def _finish(model, tokenizer, prompt: list[int], new: list[int], kwargs: dict, eos_ids: list[int],
            stop: list[str], pad_id: int) -> str:
    """One row's completion: cut at its first stop id, then at its first stop string.

    transformers' `stop_strings` also fire on a stop string that begins inside the prompt (e.g. a prompt ending in
    "\n" and a first token "\n" for the stop "\n\n"), while a stop string counts only inside the completion (as
    lm-eval's `until`). Such a row goes on generating from where it stopped (the old match no longer ends the
    sequence, so it cannot fire again), until EOS, a stop string inside the completion, or the token budget.
    """
    budget = kwargs["max_new_tokens"]
    while True:
        new, ended = _cut_at_eos(new, eos_ids, pad_id)
        text = tokenizer.decode(new, skip_special_tokens=False)
        if ended or len(new) >= budget or not stop or any(s in text for s in stop):
            return truncate_at_stop(tokenizer.decode(new, skip_special_tokens=True), stop)
        new = new + _generate(model, [prompt + new], pad_id, dict(kwargs, max_new_tokens=budget - len(new)))[0]


def _cut_at_eos(new: list[int], eos_ids: list[int], pad_id: int) -> tuple[list[int], bool]:
    """Tokens before the first stop id (and whether there was one), without the padding of a row that stopped."""
    for k, t in enumerate(new):
        if t in eos_ids:
            return new[:k], True
    while new and new[-1] == pad_id:
        new = new[:-1]
    return new, False


def _encode_prompts(model, tokenizer, prompts, max_new_tokens: int, add_special_tokens: bool, eos_ids, pad_id):
    """Token ids of each prompt, one batched tokenizer call; never empty, and leaving room for the new tokens."""
    encoded = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
    # An empty prompt still needs one token to condition on: BOS when there is one, else EOS (as lm-eval).
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (eos_ids[0] if eos_ids else pad_id)
    encoded = [ids or [start_id] for ids in encoded]
    # Leave room for the new tokens inside the model's context, dropping the oldest prompt tokens (lm-eval does
    # the same left truncation for generation tasks).
    max_ctx = getattr(model.config, "max_position_embeddings", None)
    if max_ctx and max_ctx > max_new_tokens:
        encoded = [ids[-(max_ctx - max_new_tokens):] for ids in encoded]
    return encoded


def _generation_kwargs(tokenizer, max_new_tokens, do_sample, temperature, top_p, eos_ids, pad_id, stop) -> dict:
    kw = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=1, use_cache=True,
              repetition_penalty=1.0, eos_token_id=eos_ids or None, pad_token_id=pad_id)
    if do_sample:
        kw.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
    else:
        # Neutral values keep a model's own sampling defaults from triggering "unused flag" warnings.
        kw.update(temperature=1.0, top_p=1.0, top_k=None)
    if stop:
        kw.update(stop_strings=list(stop), tokenizer=tokenizer)
    return kw
