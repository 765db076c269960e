"""Chat replies from a model: render the prompt with a chat template, generate, cut at the template's end of turn.

The template defaults as in `loss_probe` (the model's training template, else `tulu`): a model replies well only in
the format it was tuned on, and each template has its own way of ending a turn, given here as stop strings.
"""

from __future__ import annotations

from collections.abc import Sequence

from imtune.errors import ImtuneError
from imtune.evaluation.loss_probe import default_template, model_ref_of
from imtune.records.conversation import Conversation


def stop_strings(template: str, tokenizer) -> list[str]:
    """Text that ends an assistant turn under `template`; generation is cut at the first occurrence.

    A model that has not learnt to emit EOS tends to go on with the next turn's header, so those headers stop it too.
    """
    eos = getattr(tokenizer, "eos_token", None)
    if template == "tulu":
        stops = [eos, "\n<|user|>", "<|user|>", "\n<|assistant|>", "<|assistant|>"]
    elif template == "chatml":
        stops = ["<|im_end|>", "<|im_start|>"]
    elif template == "alpaca":
        stops = [eos, "\n### Instruction:", "### Instruction:"]
    elif template in ("tokenizer", "chat_template", "auto"):
        from imtune.masking.templates import END_OF_TURN

        chat = getattr(tokenizer, "chat_template", None) or ""
        if isinstance(chat, dict):
            chat = " ".join(str(v) for v in chat.values())
        stops = [eos] + [m for m in END_OF_TURN if m in chat]
    else:
        raise ImtuneError(f"unknown template {template!r}: choose tokenizer, tulu, chatml or alpaca")
    return list(dict.fromkeys(s for s in stops if s))


def split_last_turn(conv: Conversation | dict | Sequence) -> tuple[list[dict], str]:
    """(messages before the last assistant turn, that turn's content): the prompt and the reference reply."""
    msgs = _messages(conv)
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ImtuneError("conversation has no assistant turn to use as the reference")
    if last == 0:
        raise ImtuneError("conversation starts with the assistant turn: there is no prompt before it")
    return msgs[:last], msgs[last]["content"]


def _messages(conv) -> list[dict]:
    if isinstance(conv, Conversation):
        return [{"role": m.role, "content": m.content} for m in conv.messages]
    if isinstance(conv, dict) and "messages" in conv:
        conv = conv["messages"]
    return [{"role": m["role"], "content": m["content"]} for m in conv]


def generate_chat(model, tokenizer, conversations: Sequence, *, template: str | None = None,
                  max_new_tokens: int = 256, do_sample: bool = False, temperature: float = 0.7, top_p: float = 0.9,
                  batch_size: int = 8, seed: int = 0, progress: bool = True) -> list[str]:
    """The model's next assistant reply to each conversation (its prompt messages, without the final assistant turn).

    `template=None` picks the model's training template (see module doc). Replies are cut at the template's stop
    strings and stripped of surrounding whitespace. Greedy unless `do_sample`.
    """
    from imtune.evaluation.generation import generate_texts, truncate_at_stop
    from imtune.masking.templates import render_prompt, resolve_template

    tpl = resolve_template(default_template(model_ref_of(model), template), tokenizer)
    prompts = []
    for i, conv in enumerate(conversations):
        msgs = _messages(conv)
        if not msgs:
            raise ImtuneError(f"conversation {i} has no messages")
        prompts.append(render_prompt(msgs, tokenizer, tpl))
    stops = stop_strings(tpl, tokenizer)
    # The prompt text already carries any BOS the template needs (render_prompt adds it), so none is added again.
    outs = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=do_sample,
                          temperature=temperature, top_p=top_p, stop=stops, batch_size=batch_size, seed=seed,
                          add_special_tokens=False, progress=progress)
    return [truncate_at_stop(o, stops).strip() for o in outs]
