"""Pydantic models of the OpenAI group: requests (validated at the HTTP edge) and responses (documented
in /openapi.json). They live only here; below the edge, requests become plain generation jobs.

Unknown request fields are ignored (`extra="ignore"`), never a 422.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**63 - 1


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Resp(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- requests -------------------------------------------------------------------------------

class ContentPart(_Req):
    type: str
    text: str | None = None


class ChatMessage(_Req):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Req):
    include_usage: bool = False


class ResponseFormat(_Req):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None

    def as_dict(self) -> dict:
        return self.model_dump(exclude_none=True)


class _SamplingFields(_Req):
    model: str | None = Field(None, description="model id; optional in single-model mode")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1_000_000, description="extension: 0 = off")
    n: int | None = Field(None, ge=1, le=128)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=-MAX_SEED - 1, le=MAX_SEED)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool | None = Field(None, description="extension (as vLLM): keep generating past EOS, "
                                                       "until max_tokens, a stop string or the context end")


class ExplainOptions(_Req):
    top: int = Field(5, ge=1, le=100, description="features per generated token")


class ModelqlExtensions(_Req):
    """The `modelql` request field (other servers ignore it): modelql-only options."""

    explain: Union[bool, ExplainOptions, None] = Field(
        None, description="true or {top}: add per-token FFN feature attributions to each choice "
                          "(`choices[i].modelql.explain`; non-streaming requests only)")


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = Field(None, description="deprecated form of tools")
    function_call: Union[str, dict[str, Any], None] = Field(None, description="deprecated form of tool_choice")
    modelql: ModelqlExtensions | None = None


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1, le=128)
    suffix: str | None = None


class EmbeddingRequest(_Req):
    input: Union[str, list[str], list[int], list[list[int]]]
    model: str | None = None
    encoding_format: str | None = "float"
    dimensions: int | None = None
    user: str | None = None
    x_pooling: Literal["static", "mean", "last"] | None = Field(
        None, description="extension: static (mean of scaled embedding rows), mean or last (final-normed "
                          "hidden states); default mean when inference weights are served, else static")


# -- responses (documentation and conformance) ------------------------------------------------

class Usage(_Resp):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class TopLogprob(_Resp):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Resp):
    content: list[TokenLogprob] | None
    refusal: str | None = None


class AssistantMessage(_Resp):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(_Resp):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls", "function_call"]


class ChatCompletion(_Resp):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(_Resp):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Resp):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"]


class Completion(_Resp):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage


class Embedding(_Resp):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class EmbeddingUsage(_Resp):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(_Resp):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(_Resp):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "modelql"
    path: str = "/v1"
    features: int
    loaded: bool = True


class ModelList(_Resp):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(_Resp):
    status: str
    ready: bool
    model: str | None = None


class OpenAIErrorBody(_Resp):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(_Resp):
    error: OpenAIErrorBody


class KnowledgeError(_Resp):
    error: str


OPENAI_ERRORS = {status: {"model": OpenAIError} for status in (400, 401, 404, 413, 429, 503)}
