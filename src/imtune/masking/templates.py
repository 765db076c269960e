"""Render a conversation to text with exact character spans for every segment.

A renderer returns `Rendered(text, spans)`; each span is (start, end, segment_code, message_index) over `text`.
Characters not covered by a span are template markup. Named templates are built piece by piece so spans are known
by construction; a tokenizer's own Jinja chat template is rendered once with unique placeholders in place of the
message contents, which are then located and substituted, and the result is checked against a plain render.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from imtune.config import DEFAULT_TEMPLATE
from imtune.errors import ImtuneError
from imtune.records.conversation import Conversation

SEGMENTS = ("template", "system", "user", "assistant", "eos")
TEMPLATE, SYSTEM, USER, ASSISTANT, EOS = range(5)
ROLE_CODE = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
NAMED_TEMPLATES = ("tulu", "chatml", "alpaca")
# End-of-turn markers that, right after assistant content in a chat template, are what the model must learn to emit.
END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "</s>", "<|endoftext|>", "<eos>", "<|eos|>")
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n")


@dataclass(frozen=True, slots=True)
class Rendered:
    text: str
    spans: tuple[tuple[int, int, int, int], ...]  # (start, end, segment code, message index)
    add_special_tokens: bool = False  # whether the tokenizer should add its BOS etc.


class _Builder:
    __slots__ = ("parts", "spans", "pos")

    def __init__(self):
        self.parts, self.spans, self.pos = [], [], 0

    def add(self, s: str, code: int = TEMPLATE, msg: int = -1):
        if s:
            if code != TEMPLATE:
                self.spans.append((self.pos, self.pos + len(s), code, msg))
            self.parts.append(s)
            self.pos += len(s)

    def text(self) -> str:
        return "".join(self.parts)


def render(conv: Conversation, tokenizer, template: str = DEFAULT_TEMPLATE) -> Rendered:
    """Render for training (the whole conversation)."""
    if template == "tulu":
        return _render_tulu(conv, _eos(tokenizer))
    if template == "chatml":
        return _render_chatml(conv)
    if template == "alpaca":
        return _render_alpaca(conv, _eos(tokenizer))
    if template in ("auto", "chat_template", "tokenizer"):
        return _render_chat_template(conv, tokenizer)
    raise ImtuneError(f"unknown template {template!r}: choose tokenizer, {', '.join(NAMED_TEMPLATES)}")


def resolve_template(template: str | None, tokenizer) -> str:
    """`None`/'auto' means the tokenizer's own chat template when it has one, else `tulu`."""
    if template in (None, "auto"):
        return "tokenizer" if getattr(tokenizer, "chat_template", None) else DEFAULT_TEMPLATE
    if template in ("tokenizer", "chat_template") and not getattr(tokenizer, "chat_template", None):
        raise ImtuneError("the tokenizer has no chat template; pick --template tulu, chatml or alpaca")
    if template not in NAMED_TEMPLATES + ("tokenizer", "chat_template"):
        raise ImtuneError(f"unknown template {template!r}: choose tokenizer, {', '.join(NAMED_TEMPLATES)}")
    return template


def render_prompt(messages: list[dict], tokenizer, template: str = DEFAULT_TEMPLATE) -> str:
    """Text that ends where the assistant's next reply should begin (for generation)."""
    if template in ("tokenizer", "chat_template", "auto"):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    conv = Conversation.from_messages(list(messages) + [{"role": "assistant", "content": "x"}])
    r = render(conv, tokenizer, template)
    prefix = r.text[: [s for s in r.spans if s[2] == ASSISTANT][-1][0]]
    if r.add_special_tokens and getattr(tokenizer, "bos_token", None) and _adds_bos(tokenizer):
        prefix = tokenizer.bos_token + prefix
    return prefix


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _eos(tokenizer) -> str:
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise ImtuneError("the tokenizer has no EOS token; the tulu/alpaca templates need one")
    return eos


def _render_tulu(conv: Conversation, eos: str) -> Rendered:
    # open-instruct's _concat_messages: contents stripped, EOS after assistant, whole text .strip()ed at the end.
    b = _Builder()
    n = len(conv.messages)
    for i, m in enumerate(conv.messages):
        b.add(f"<|{m.role}|>\n")
        b.add(m.content.strip(), ROLE_CODE[m.role], i)
        if m.role == "assistant":
            b.add(eos, EOS, i)
        if i < n - 1:
            b.add("\n")
    return Rendered(b.text(), tuple(b.spans), add_special_tokens=True)


def _render_chatml(conv: Conversation) -> Rendered:
    b = _Builder()
    for i, m in enumerate(conv.messages):
        b.add(f"<|im_start|>{m.role}\n")
        b.add(m.content, ROLE_CODE[m.role], i)
        b.add("<|im_end|>", EOS if m.role == "assistant" else TEMPLATE, i)
        b.add("\n")
    return Rendered(b.text(), tuple(b.spans), add_special_tokens=False)


def _render_alpaca(conv: Conversation, eos: str) -> Rendered:
    b = _Builder()
    msgs = conv.messages
    start = 0
    if msgs and msgs[0].role == "system":
        b.add(msgs[0].content.strip(), SYSTEM, 0)
        b.add("\n\n")
        start = 1
    else:
        b.add(ALPACA_PREAMBLE)
    for i in range(start, len(msgs)):
        m = msgs[i]
        if m.role == "user":
            b.add("### Instruction:\n")
            b.add(m.content.strip(), USER, i)
            b.add("\n\n")
        elif m.role == "assistant":
            b.add("### Response:\n")
            b.add(m.content.strip(), ASSISTANT, i)
            b.add(eos, EOS, i)
            b.add("\n\n")
        else:
            b.add(m.content.strip(), SYSTEM, i)
            b.add("\n\n")
    text = b.text()
    stripped = text.rstrip()
    return Rendered(stripped, tuple(b.spans), add_special_tokens=True)


_PH = "\u27e6imtune\u00b7{}\u27e7"
_PH_RE = re.compile("\u27e6imtune\u00b7(\\d+)\u27e7")


def _render_chat_template(conv: Conversation, tokenizer) -> Rendered:
    msgs = conv.messages
    ph = [{"role": m.role, "content": _PH.format(i)} for i, m in enumerate(msgs)]
    try:
        skeleton = tokenizer.apply_chat_template(ph, tokenize=False)
    except Exception as e:  # Jinja templates raise for role orders they do not accept
        raise ValueError(f"chat template rejected the conversation: {e}") from None
    out, spans, pos, last = [], [], 0, 0
    seen = []
    for mt in _PH_RE.finditer(skeleton):
        i = int(mt.group(1))
        seen.append(i)
        out.append(skeleton[last:mt.start()])
        pos += mt.start() - last
        content = msgs[i].content
        if _strips(tokenizer):
            content = content.strip()
        out.append(content)
        spans.append((pos, pos + len(content), ROLE_CODE[msgs[i].role], i))
        pos += len(content)
        last = mt.end()
        if msgs[i].role == "assistant":
            rest = skeleton[last:]
            for marker in END_OF_TURN:
                if rest.startswith(marker):
                    spans.append((pos, pos + len(marker), EOS, i))
                    break
    out.append(skeleton[last:])
    if sorted(seen) != list(range(len(msgs))):
        raise ValueError("chat template drops or repeats messages; use --template tulu/chatml/alpaca")
    text = "".join(out)
    return Rendered(text, tuple(spans), add_special_tokens=False)


_STRIP_CACHE: dict[int, bool] = {}


def _strips(tokenizer) -> bool:
    """Whether the tokenizer's chat template trims message contents (e.g. Llama-3's `| trim`), found once by probing."""
    key = id(tokenizer)
    if key not in _STRIP_CACHE:
        probe = [{"role": "user", "content": "  \u27e6probe\u27e7  "}]
        try:
            txt = tokenizer.apply_chat_template(probe, tokenize=False)
            _STRIP_CACHE[key] = "  \u27e6probe\u27e7  " not in txt and "\u27e6probe\u27e7" in txt
        except Exception:
            _STRIP_CACHE[key] = False
    return _STRIP_CACHE[key]
