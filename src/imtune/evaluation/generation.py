"""Batched text generation for evaluation and chat: left padding, length-sorted batches, stop strings.

`generate_texts` is the one entry point. Prompts are raw text (any chat template is applied by the caller); the
returned completions exclude the prompt, stop at EOS or the chat template's end-of-turn token, and are cut at the
first stop string.
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


def _stop_criteria(tokenizer, stop: Sequence[str], prompt_len: int):
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    longest = max(len(s) for s in stop)
    # A character is at most 4 bytes and a byte-level token at least one byte, so a stop string lies inside the
    # last 4*len+2 tokens once it is complete; decoding just that tail keeps the per-step check cheap.
    window = 4 * longest + 2

    class _StopStrings(StoppingCriteria):
        def __init__(self):
            self.done: torch.Tensor | None = None

        def __call__(self, input_ids, scores, **kwargs):
            if self.done is None:
                self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            gen = input_ids[:, prompt_len:]
            start = max(0, gen.shape[1] - window)
            tails = gen[:, start:].tolist()
            for row, tail in enumerate(tails):
                if not self.done[row]:
                    text = tokenizer.decode(tail, skip_special_tokens=False)
                    if any(s in text for s in stop):
                        self.done[row] = True
            return self.done.clone()

    return StoppingCriteriaList([_StopStrings()])


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
    if temperature is not None and temperature <= 0:
        do_sample = False

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos_ids = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = eos_ids[0] if eos_ids else 0

    # Leave room for the new tokens inside the model's context, dropping the oldest prompt tokens (lm-eval does
    # the same left truncation for generation tasks).
    max_ctx = getattr(model.config, "max_position_embeddings", None)
    keep = max_ctx - max_new_tokens if max_ctx and max_ctx > max_new_tokens else None
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    # An empty prompt still needs one token to condition on: BOS when there is one, else EOS (as lm-eval).
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (eos_ids[0] if eos_ids else pad_id)
    encoded = [ids or [start_id] for ids in encoded]
    if keep is not None:
        encoded = [ids[-keep:] for ids in encoded]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))

    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=1,
                      repetition_penalty=1.0, eos_token_id=eos_ids or None, pad_token_id=pad_id)
    if do_sample:
        gen_kwargs.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
    else:
        # Neutral values keep a model's own sampling defaults from triggering "unused flag" warnings.
        gen_kwargs.update(temperature=1.0, top_p=1.0, top_k=None)

    out: list[str | None] = [None] * len(prompts)
    fork_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    bar = tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not progress, leave=False)
    try:
        with torch.inference_mode(), torch.random.fork_rng(devices=fork_devices):
            for b, start in enumerate(range(0, len(order), batch_size)):
                idx = order[start:start + batch_size]
                rows = [encoded[i] for i in idx]
                width = max(len(r) for r in rows)
                input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                attn = torch.zeros((len(rows), width), dtype=torch.long)
                for j, r in enumerate(rows):
                    input_ids[j, width - len(r):] = torch.tensor(r, dtype=torch.long)
                    attn[j, width - len(r):] = 1
                input_ids, attn = input_ids.to(device), attn.to(device)
                torch.manual_seed(seed + b)
                kwargs = dict(gen_kwargs)
                if stop:
                    kwargs["stopping_criteria"] = _stop_criteria(tokenizer, stop, width)
                seqs = model.generate(input_ids=input_ids, attention_mask=attn, **kwargs)
                for j, i in enumerate(idx):
                    new = seqs[j, width:].tolist()
                    # Cut at the first stop id ourselves: rows that finished early are padded with pad_id, which
                    # need not be a special token that decode() would skip.
                    for k, t in enumerate(new):
                        if t in eos_ids:
                            new = new[:k]
                            break
                    text = tokenizer.decode(new, skip_special_tokens=True)
                    out[i] = truncate_at_stop(text, stop)
                bar.update(len(idx))
    finally:
        bar.close()
        if was_training:
            model.train()
    return out  # type: ignore[return-value]
