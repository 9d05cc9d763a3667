"""The message type every surface speaks; dicts with the same keys are accepted everywhere."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Union

from .errors import ChatFormatError

ROLES = ("system", "user", "assistant", "observation", "tool", "interpreter")


@dataclass
class ChatMessage:
    role: str
    content: str = ""
    tool_calls: list[dict[str, Any]] | None = None
    metadata: str = ""
    reasoning_content: str = ""  # what a reasoning model (GLM-Z1, GLM-4.5) thought before this reply

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            d["tool_calls"] = self.tool_calls
        if self.metadata:
            d["metadata"] = self.metadata
        if self.reasoning_content:
            d["reasoning_content"] = self.reasoning_content
        return d


MessageLike = Union[ChatMessage, Mapping[str, Any]]


def as_message(m: MessageLike) -> ChatMessage:
    """Normalise a dict or ChatMessage, rejecting unknown roles and non-text content early."""
    if isinstance(m, ChatMessage):
        msg = m
    elif isinstance(m, Mapping):
        if "role" not in m:
            raise ChatFormatError(f"message {dict(m)!r} has no 'role'")
        content = m.get("content") or ""
        msg = ChatMessage(str(m["role"]), content, m.get("tool_calls"), m.get("metadata") or "",
                          m.get("reasoning_content") or "")
    else:
        raise ChatFormatError(f"a message must be a dict or ChatMessage, not {type(m).__name__}")
    if msg.role not in ROLES:
        raise ChatFormatError(f"unknown role {msg.role!r}; expected one of {', '.join(ROLES)}")
    if not isinstance(msg.content, str):
        raise ChatFormatError(f"message content must be a string, not {type(msg.content).__name__}")
    return msg


def as_messages(messages: list[MessageLike]) -> list[ChatMessage]:
    return [as_message(m) for m in messages]
