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
    if template in NAMED:
        return _render_named(conv, NAMED[template], tokenizer)
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


@dataclass(frozen=True, slots=True)
class NamedTemplate:
    """A named template as data: the Python renderer and the Jinja saved with a trained tokenizer are both generated
    from it, so prompts at inference render exactly as in training."""
    headers: dict  # role -> markup before the content
    strip: bool  # contents are .strip()ped (open-instruct's convention)
    end: str | None  # markup right after every message's content; None: the tokenizer's EOS after assistant turns
    sep: str  # markup between messages
    sep_after_last: bool
    preamble: str = ""  # markup opening a conversation whose first message is not a system message
    add_special_tokens: bool = True


NAMED = {
    # open-instruct's _concat_messages (the paper's format).
    "tulu": NamedTemplate({r: f"<|{r}|>\n" for r in ROLE_CODE}, strip=True, end=None, sep="\n", sep_after_last=False),
    "chatml": NamedTemplate({r: f"<|im_start|>{r}\n" for r in ROLE_CODE}, strip=False, end="<|im_end|>", sep="\n",
                            sep_after_last=True, add_special_tokens=False),
    "alpaca": NamedTemplate({"system": "", "user": "### Instruction:\n", "assistant": "### Response:\n"},
                            strip=True, end=None, sep="\n\n", sep_after_last=False, preamble=ALPACA_PREAMBLE),
}
assert tuple(NAMED) == NAMED_TEMPLATES


def _render_named(conv: Conversation, spec: NamedTemplate, tokenizer) -> Rendered:
    eos = _eos(tokenizer) if spec.end is None else spec.end
    msgs = conv.messages
    b = _Builder()
    if not msgs or msgs[0].role != "system":
        b.add(spec.preamble)
    for i, m in enumerate(msgs):
        b.add(spec.headers[m.role])
        b.add(m.content.strip() if spec.strip else m.content, ROLE_CODE[m.role], i)
        if m.role == "assistant":
            b.add(eos, EOS, i)
        elif spec.end is not None:
            b.add(spec.end)
        if spec.sep_after_last or i < len(msgs) - 1:
            b.add(spec.sep)
    return Rendered(b.text(), tuple(b.spans), add_special_tokens=spec.add_special_tokens)


def _jinja_str(s: str) -> str:
    # Jinja string literals are decoded with unicode-escape.
    return "'" + s.encode("unicode_escape").decode("ascii").replace("'", "\\'") + "'"


def _jinja_out(s: str) -> str:
    return "{{ " + _jinja_str(s) + " }}" if s else ""


def chat_template_jinja(name: str) -> str:
    """The Jinja chat template that renders exactly what `render(conv, tok, name)` renders."""
    spec = NAMED[name]
    role = "message['role']"
    headers = "".join(f"{'{% if' if i == 0 else '{% elif'} {role} == {_jinja_str(r)} %}}{_jinja_out(h)}"
                      for i, (r, h) in enumerate(spec.headers.items()))
    headers += "{% else %}{{ raise_exception('unknown role: ' + " + role + ") }}{% endif %}"
    end = ("{% if " + role + " == 'assistant' %}{{ eos_token }}{% endif %}" if spec.end is None
           else _jinja_out(spec.end))
    sep = _jinja_out(spec.sep) if spec.sep_after_last else "{% if not loop.last %}" + _jinja_out(spec.sep) + \
        "{% endif %}"
    gen_sep = "" if spec.sep_after_last else "{% if messages %}" + _jinja_out(spec.sep) + "{% endif %}"
    preamble = ("{% if not messages or messages[0]['role'] != 'system' %}" + _jinja_out(spec.preamble)
                + "{% endif %}") if spec.preamble else ""
    content = "message['content'] | trim" if spec.strip else "message['content']"
    return (preamble + "{% for message in messages %}" + headers + "{{ " + content + " }}" + end + sep
            + "{% endfor %}{% if add_generation_prompt %}" + gen_sep + _jinja_out(spec.headers["assistant"])
            + "{% endif %}")


# Stored with a tokenizer trained under a named template (training/recipe.py), and used by tests/tiny.py.
CHAT_TEMPLATES = {name: chat_template_jinja(name) for name in NAMED}


# Placeholder for message i, padded with a whitespace character no template writes (U+205F), so the skeleton shows
# per side whether the template trims the content (`| trim` removes the pad) or keeps it as is.
_PAD = "\u205f"
_PH = _PAD + "\u27e6imtune\u00b7{}\u27e7" + _PAD
_PH_RE = re.compile(f"({_PAD}?)\u27e6imtune\u00b7(\\d+)\u27e7({_PAD}?)")


def _render_chat_template(conv: Conversation, tokenizer) -> Rendered:
    """The tokenizer's own chat template, with spans found by rendering placeholders in place of the contents.

    Exact or an error, never a silent wrong mask: the result must equal the template's plain render of the real
    conversation, and every assistant turn must be closed by an end-of-turn token (which `it` trains).
    """
    msgs = conv.messages
    skeleton = _apply(tokenizer, [{"role": m.role, "content": _PH.format(i)} for i, m in enumerate(msgs)])
    ends = _end_markers(tokenizer)
    out, spans, pos, last, seen = [], [], 0, 0, []
    for mt in _PH_RE.finditer(skeleton):
        i = int(mt.group(2))
        seen.append(i)
        out.append(skeleton[last:mt.start()])
        pos += mt.start() - last
        content = msgs[i].content
        content = content if mt.group(1) else content.lstrip()
        content = content if mt.group(3) else content.rstrip()
        out.append(content)
        spans.append((pos, pos + len(content), ROLE_CODE[msgs[i].role], i))
        pos += len(content)
        last = mt.end()
        if msgs[i].role == "assistant":
            n = _end_of_turn(skeleton, last, ends)
            if n is None:
                raise ValueError(f"the chat template closes assistant message {i + 1} with no end-of-turn token "
                                 f"imtune recognises ({', '.join(ends)}), so the model would never learn to stop; "
                                 f"use --template tulu, chatml or alpaca")
            spans.append((pos, pos + n, EOS, i))
    out.append(skeleton[last:])
    if sorted(seen) != list(range(len(msgs))):
        raise ValueError("chat template drops or repeats messages; use --template tulu/chatml/alpaca")
    text = "".join(out)
    if text != _apply(tokenizer, [{"role": m.role, "content": m.content} for m in msgs]):
        raise ValueError("the chat template changes message text in a way imtune cannot map to exact token spans "
                         "(it renders differently from the placeholder render); use --template tulu, chatml or alpaca")
    return Rendered(text, tuple(spans), add_special_tokens=False)


def _apply(tokenizer, messages: list[dict]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # Jinja templates raise for role orders they do not accept
        raise ValueError(f"chat template rejected the conversation: {str(e).splitlines()[0] if str(e) else e!r}") \
            from None


def _end_markers(tokenizer) -> tuple[str, ...]:
    eos = getattr(tokenizer, "eos_token", None)
    return END_OF_TURN + ((eos,) if eos and eos not in END_OF_TURN else ())


def _end_of_turn(skeleton: str, pos: int, ends: tuple[str, ...]) -> int | None:
    """Length of the end of an assistant turn at `pos`: an end-of-turn marker, after any whitespace the template puts
    before it (the model has to produce that too)."""
    rest = skeleton[pos:]
    gap = len(rest) - len(rest.lstrip())
    for marker in ends:
        if rest.startswith(marker, gap):
            return gap + len(marker)
    return None
