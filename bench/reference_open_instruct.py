"""The paper's masking, re-implemented as the baseline for bench/preprocess.py.

The Instruction Modelling paper (Shi et al., 2024) trains with an open-instruct fork (ZhengxiangShi/
InstructionModelling, src/finetune.py, `encode_with_messages_format`). What it does, per example:

* Text: every message becomes "<|role|>\\n" + content.strip() + "\\n", with the EOS token after assistant content
  (before that "\\n"); the concatenation is .strip()ped and tokenised once (add_special_tokens as the tokenizer's
  default, right truncation at max_seq_length). labels start as a copy of input_ids.
* IT (`use_lm_loss` off): for every non-assistant message i, the token range [start, end) is set to -100, where
  start = 0 for i == 0 else len(tokenize(concat(messages[:i]))), and end = len(tokenize(concat(messages[:i+1]) +
  "<|assistant|>\\n")) when an assistant message follows, else len(tokenize(concat(messages[:i+1]))). Every prefix
  is re-tokenised from scratch (quadratic in the number of messages) and the boundaries are token counts of
  prefixes, which can be off by one where a token of the full text straddles a message boundary.
* IM (`use_lm_loss` on): nothing is masked except template markers: each marker string is tokenised on its own
  and every position of input_ids where that exact id sequence occurs is set to -100, scanning position by position
  with a tensor comparison. The released code's marker list is ["wa\\n", "<|system|>\\n", "<|user|>\\n"] -- its
  comment says "<|assistant|>\\n" was meant, so "wa\\n" looks like a typo; both lists are available here
  (MARKERS_RELEASED, MARKERS_INTENDED).

This module is a re-implementation from that description (same tokenizer calls, same tensor operations, same
per-position scan), not a copy. It is only used by the benchmark and its agreement check.
"""

from __future__ import annotations

import torch

MARKERS_RELEASED = ("wa\n", "<|system|>\n", "<|user|>\n")
MARKERS_INTENDED = ("<|assistant|>\n", "<|system|>\n", "<|user|>\n")


def concat_messages(messages: list[dict], eos: str) -> str:
    parts = []
    for m in messages:
        role = m["role"]
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"invalid role {role!r}")
        parts.append(f"<|{role}|>\n{m['content'].strip()}")
        if role == "assistant":
            parts.append(eos)
        parts.append("\n")
    return "".join(parts)


def _ids(tokenizer, text: str, max_seq_length: int) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt", max_length=max_seq_length, truncation=True).input_ids


def encode_it(example: dict, tokenizer, max_seq_length: int = 2048) -> dict:
    """Mask every non-assistant message (and the assistant marker that follows it) by prefix re-tokenisation."""
    messages = example["messages"]
    if not messages:
        raise ValueError("messages field is empty")
    eos = tokenizer.eos_token
    input_ids = _ids(tokenizer, concat_messages(messages, eos).strip(), max_seq_length)
    labels = input_ids.clone()
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            continue
        start = 0 if i == 0 else _ids(tokenizer, concat_messages(messages[:i], eos), max_seq_length).shape[1]
        upto = concat_messages(messages[:i + 1], eos)
        if i + 1 < len(messages) and messages[i + 1]["role"] == "assistant":
            upto += "<|assistant|>\n"
        end = _ids(tokenizer, upto, max_seq_length).shape[1]
        labels[:, start:end] = -100
        if end >= max_seq_length:
            break
    return {"input_ids": input_ids.flatten(), "labels": labels.flatten(),
            "attention_mask": torch.ones_like(input_ids).flatten()}


def encode_im(example: dict, tokenizer, max_seq_length: int = 2048, markers=MARKERS_RELEASED) -> dict:
    """Train on everything except the template markers, found by scanning for their token sequences."""
    messages = example["messages"]
    if not messages:
        raise ValueError("messages field is empty")
    input_ids = _ids(tokenizer, concat_messages(messages, tokenizer.eos_token).strip(), max_seq_length)
    labels = input_ids.clone()
    n = input_ids.shape[1]
    for marker in markers:
        marker_ids = _ids(tokenizer, marker, max_seq_length)
        k = marker_ids.shape[1]
        for pos in range(n - k + 1):
            if torch.equal(input_ids[:, pos:pos + k], marker_ids):
                labels[:, pos:pos + k] = -100
    return {"input_ids": input_ids.flatten(), "labels": labels.flatten(),
            "attention_mask": torch.ones_like(input_ids).flatten()}


def to_example(conv) -> dict:
    """An imtune Conversation as the reference's input record."""
    return {"messages": [{"role": m.role, "content": m.content} for m in conv.messages]}
