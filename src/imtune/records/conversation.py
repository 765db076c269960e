"""The one conversation type every input format normalises to."""

from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str
    weight: float | None = None  # the data's per-message loss weight (a float >= 0; None: absent, i.e. 1)

    def to_dict(self) -> dict:
        d = {"role": self.role, "content": self.content}
        if self.weight is not None:
            d["weight"] = self.weight
        return d


@dataclass(frozen=True, slots=True)
class Conversation:
    messages: tuple[Message, ...]
    id: str = ""
    source: str = ""  # "file:line" or "file: record i", for error messages downstream
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_messages(cls, messages: list[dict], id: str = "", source: str = "") -> Conversation:
        return cls(tuple(Message(m["role"], m["content"], m.get("weight")) for m in messages), id=id, source=source)

    def to_dict(self) -> dict:
        return {"id": self.id, "messages": [m.to_dict() for m in self.messages]}

    @property
    def weighted(self) -> bool:
        """Does any message carry a `weight`?"""
        return any(m.weight is not None for m in self.messages)

    @property
    def n_turns(self) -> int:
        return sum(1 for m in self.messages if m.role == "assistant")
