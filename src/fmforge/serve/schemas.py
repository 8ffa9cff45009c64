"""OpenAI request and response bodies as pydantic models, checked to the ranges OpenAI documents.

Strict types: `max_tokens` must be a JSON integer (not 1.5, "10" or true); floats must be finite.
Text fields refuse lone surrogates and NUL bytes (they cannot be tokenised faithfully). Unknown
fields are an error, as with OpenAI ("Unrecognized request argument"), so a typo is not ignored.
Checks that need the model (vocabulary, context length, model name) live in `app.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

MAX_N = 8  # most choices per request
MAX_STOP = 4  # most stop strings
MAX_PROMPTS = 32  # most prompts in one completions request
MAX_EMBEDDING_INPUTS = 256

Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]


def check_text(text: str, what: str) -> str:
    """Return `text`; ValueError if it holds a lone surrogate or a NUL byte."""
    if "\x00" in text:
        raise ValueError(f"{what} contains a NUL byte")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} contains a lone surrogate (invalid Unicode)") from e
    return text


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class TextPart(_Body):
    """A content part of a chat message; only text is supported."""

    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Body):
    """One chat turn. `developer` is read as `system`."""

    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatMessage:
        check_text(self.text, "message content")
        return self

    @property
    def text(self) -> str:
        """Return the content as one string (text parts joined)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _Sampling(_Body):
    # Parameters shared by chat and completions.
    model: StrictStr | None = Field(None, description="the model id from /v1/models")
    max_tokens: StrictInt | None = Field(None, ge=1, description="default: fill the context")
    temperature: Temperature = Field(1.0, description="0 = greedy")
    top_p: TopP = 1.0
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    stop: StrictStr | list[StrictStr] | None = Field(None, description="up to 4 strings")
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, Bias] | None = Field(None, description="token id (string) -> bias")
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    store: StrictBool = Field(True, description="fmforge: false opts this request out of logging")
    metadata: dict[str, StrictStr] | None = None

    @model_validator(mode="after")
    def _check_common(self):
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"stop takes at most {MAX_STOP} strings")
        for stop in stops:
            if not stop:
                raise ValueError("stop strings must not be empty")
            check_text(stop, "stop")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def stop_strings(self) -> list[str]:
        """Return the stop strings as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, description="alias of max_tokens")
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens disagree")
            self.max_tokens = self.max_completion_tokens
        return self


Prompt = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: Prompt
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(None, ge=0, le=5)
    suffix: None = Field(None, description="not supported; must be null")
    best_of: StrictInt | None = Field(None, ge=1, le=MAX_N, description="must equal n")

    @model_validator(mode="after")
    def _check_prompt(self) -> CompletionRequest:
        prompt = self.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise ValueError("prompt must not be empty")
        if len(prompt) > MAX_PROMPTS and not isinstance(prompt[0], int):
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        for item in prompt:
            if isinstance(item, str):
                if not item:
                    raise ValueError("prompt must not be empty")
                check_text(item, "prompt")
            elif isinstance(item, list) and not item:
                raise ValueError("prompt token lists must not be empty")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of must equal n (fmforge returns every choice)")
        return self


class EmbeddingRequest(_Body):
    """POST /v1/embeddings."""

    model: StrictStr | None = None
    input: Prompt
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(None, ge=1)
    user: StrictStr | None = None

    @model_validator(mode="after")
    def _check_input(self) -> EmbeddingRequest:
        items = [self.input] if isinstance(self.input, str) else self.input
        if not items:
            raise ValueError("input must not be empty")
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"input takes at most {MAX_EMBEDDING_INPUTS} items")
        for item in items:
            if isinstance(item, str):
                if not item:
                    raise ValueError("input strings must not be empty")
                check_text(item, "input")
            elif isinstance(item, list) and not item:
                raise ValueError("input token lists must not be empty")
        return self


class FeedbackRequest(_Body):
    """POST /v1/feedback (fmforge extension): a reaction to a returned generation.

    value by kind: thumbs "up"|"down"; rating 1..5; edit the better answer (text); pairwise
    {"chosen": i, "rejected": j} (choice indexes of the same generation, e.g. n=2); comment text.
    A retry with the same idempotency_key (or Idempotency-Key header) creates no second row.
    """

    generation_id: StrictStr = Field(..., min_length=1, max_length=64)
    kind: Literal["thumbs", "rating", "edit", "pairwise", "comment"]
    value: Any
    choice_index: StrictInt = Field(0, ge=0, le=MAX_N * MAX_PROMPTS)
    idempotency_key: StrictStr | None = Field(None, min_length=1, max_length=200)

    @model_validator(mode="after")
    def _check_value(self) -> FeedbackRequest:
        if isinstance(self.value, str):
            check_text(self.value, "value")
        return self


# --- responses (for the OpenAPI schema) --------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The OpenAI error body."""

    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"]
    logprobs: dict[str, Any] | None = None


class ChatCompletion(BaseModel):
    """A chat.completion object."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: dict[str, Any] | None = None


class Completion(BaseModel):
    """A text_completion object."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fmforge"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class FeedbackResponse(BaseModel):
    """The stored feedback row; `created_now` is false for a retried idempotency key."""

    id: int
    object: Literal["feedback"] = "feedback"
    generation_id: str
    choice_index: int
    kind: str
    value: Any
    idempotency_key: str
    created: float
    created_now: bool
