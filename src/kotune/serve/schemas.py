"""The OpenAI chat-completions request, its limits, and OpenAI-style errors."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """Becomes `{"error": {"message", "type", "param", "code"}}` with `status`, as OpenAI answers."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send `name`, `tool_calls`, …; they are not used

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        """Plain text of `content`, whether a string or a list of `{"type": "text", "text": …}` parts."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")


class ChatRequest(BaseModel):
    # OpenAI clients send more fields than a small local model can honour (`user`, `seed`, …):
    # they are accepted and ignored, except the ones whose meaning we cannot keep (checked in the app).
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: dict | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)


UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logprobs", "response_format")


class Limits(BaseModel):
    max_tokens: int = Field(1024, ge=1, description="Largest `max_tokens` a request may ask for.")
    max_message_chars: int = Field(4000, ge=1, description="Longest message, in characters.")
    max_messages: int = Field(100, ge=1, description="Most messages in one request.")
    max_queue: int = Field(64, ge=1, description="Requests waiting or generating at once; more get HTTP 429.")
    max_batch: int = Field(
        8, ge=1, description="Requests decoded together in the running batch; the others wait in the queue."
    )
    request_timeout_s: float | None = Field(
        300.0, gt=0, description="Longest a request may wait and generate, in seconds; then HTTP 504 (None: no limit)."
    )
