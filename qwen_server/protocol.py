"""OpenAI wire schemas (msgspec Structs): what clients send and what the server answers.

Requests decode strictly (no "0.5" for a float) but tolerate unknown top-level fields, which real
clients send. Bounds that OpenAI documents are declared here so that msgspec reports them with the
offending field's path. Responses encode every field OpenAI clients expect, nulls included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

# --- requests ---


class ImageURL(Struct, frozen=True):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(Struct, tag="text", tag_field="type", frozen=True):
    text: str


class ImageURLPart(Struct, tag="image_url", tag_field="type", frozen=True):
    image_url: ImageURL


class VideoURL(Struct, frozen=True):
    url: str


class VideoURLPart(Struct, tag="video_url", tag_field="type", frozen=True):
    video_url: VideoURL


ContentPart = TextPart | ImageURLPart | VideoURLPart


class FunctionCallIn(Struct, frozen=True):
    name: str
    arguments: str  # JSON text, as OpenAI sends it; the template gets the object (service/chat.py)


class ToolCallIn(Struct, frozen=True):
    """A call in an assistant message of the history."""

    id: str
    function: FunctionCallIn
    type: Literal["function"] = "function"


Role = Literal["system", "developer", "user", "assistant", "tool"]


class ChatMessage(Struct, frozen=True, kw_only=True):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call this result answers
    reasoning: str | None = None  # assistant messages (vLLM's name; reasoning_content is the other)
    reasoning_content: str | None = None


class FunctionDefinition(Struct, frozen=True):
    name: Annotated[str, Meta(min_length=1, max_length=256)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # true: the arguments are constrained to `parameters` (OpenAI's meaning)


class Tool(Struct, frozen=True):
    function: FunctionDefinition
    type: Literal["function"] = "function"


class FunctionName(Struct, frozen=True):
    name: str


class NamedToolChoice(Struct, frozen=True):
    function: FunctionName
    type: Literal["function"] = "function"


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class StreamOptions(Struct, frozen=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage in every chunk (with include_usage)


class JSONSchemaFormat(Struct, frozen=True):
    name: str = "response"
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(Struct, frozen=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """vLLM's `structured_outputs` (its StructuredOutputsParams): exactly one constraint, and the
    options that shape it. A misspelt key is a 400, not a constraint silently not applied."""

    json: str | dict[str, Any] | None = None  # a JSON schema (or its text)
    regex: str | None = None
    choice: Annotated[list[str], Meta(min_length=1, max_length=4096)] | None = None
    grammar: str | None = None  # EBNF / Lark, as the grammar backend reads it
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None


Temperature = Annotated[float, Meta(ge=0, le=100)]
Probability = Annotated[float, Meta(ge=0, le=1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
PositiveInt = Annotated[int, Meta(ge=1)]
# Integers handed to the engine as they are must fit its wire format (msgpack, 64 bits): vLLM fails a
# larger one after registering the request, which then stays counted in the engine for good.
Int64 = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
Stop = str | Annotated[list[str], Meta(max_length=16)] | None


# Request fields of OpenAI's and vLLM's APIs that this server does not honour (yet), with the values
# that ask for nothing (a client library's defaults). Any other value is a 400 naming the field:
# a client is never told "200" for work that was silently not done. Fields neither API has are
# tolerated, as real clients send extras. The README's field table gives the decision for each.
REFUSED_FIELDS: dict[str, tuple[Any, ...]] = {
    "use_beam_search": (False,),
    "length_penalty": (1.0,),
    "best_of": (1,),
    "prompt_logprobs": (),
    "logprob_token_ids": (),
    "truncate_prompt_tokens": (),
    "truncation_side": (),
    "request_id": (),
    "session_id": (),
    "return_tokens_as_token_ids": (False,),
    "return_token_ids": (False,),
    "return_token_offsets": (False,),
    "return_prompt_text": (False,),
    "routed_experts_prompt_start": (0,),
    "mm_payload": ("tensors",),
    "return_mm_kwargs": (),
    "kv_transfer_params": (),
    "ec_transfer_params": (),
    "vllm_xargs": ({},),
    "repetition_detection": (),
    "stream_interval": (),
    "watermarking": (),
    "thinking_token_budget": (),
    "prompt_embeds": (),
    "media_io_kwargs": ({},),
    "prediction": (),
    "audio": (),
    "modalities": (["text"],),
    "web_search_options": (),
    "functions": ([],),
    "function_call": ("none",),
    "documents": ([],),
}
# Accepted and ignored: they ask the service for nothing that changes the answer.
IGNORED_FIELDS = (
    "user",
    "store",
    "metadata",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
)

if TYPE_CHECKING:
    # The type checker cannot see fields made at run time: to it, the base declares none (the
    # service reads them by name, with getattr).
    class _Refusable(Struct, kw_only=True, frozen=True):
        pass

else:
    _Refusable = msgspec.defstruct(
        "_Refusable", [(name, Any, msgspec.UNSET) for name in REFUSED_FIELDS], kw_only=True, frozen=True
    )


class SamplingFields(_Refusable, kw_only=True, frozen=True):
    """Sampling parameters shared by chat and text completions (OpenAI's plus vLLM's extras)."""

    model: str | None = None
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    top_k: Annotated[int, Meta(ge=-1, le=2**63 - 1)] | None = None
    min_p: Probability | None = None
    seed: Int64 | None = None
    stop: Stop = None
    stop_token_ids: list[int] | None = None
    n: Annotated[int, Meta(ge=1, le=16)] = 1
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Meta(gt=0, le=10)] | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Meta(ge=0)] = 0
    logit_bias: dict[str, Annotated[float, Meta(ge=-100, le=100)]] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    allowed_token_ids: Annotated[list[Int64], Meta(max_length=1 << 20)] | None = None
    bad_words: Annotated[list[str], Meta(max_length=1024)] | None = None
    include_stop_str_in_output: bool = False
    add_special_tokens: bool | None = None  # vLLM's: None is its default (false for chat, true for completions)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    priority: Int64 = 0  # vLLM's: lower runs first, with --scheduling-policy priority
    # vLLM's bounds: it keys the prefix cache, which reads "/" and "@" as separators.
    cache_salt: Annotated[str, Meta(min_length=1, max_length=128, pattern=r"^[^@/\\\x00]+$")] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class ChatCompletionRequest(SamplingFields, kw_only=True, frozen=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    tools: Annotated[list[Tool], Meta(max_length=1024)] | None = None  # [] is accepted as none
    tool_choice: ToolChoice | None = None  # None: "auto" with tools, "none" without (OpenAI's default)
    parallel_tool_calls: bool | None = None  # false: at most one call
    include_reasoning: bool = True  # vLLM's: false drops the reasoning from the answer
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    echo: bool = False  # vLLM's chat echo; refused (service.py)
    chat_template: str | None = None  # vLLM's request-level template: needs --trust-request-chat-template
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class CompletionRequest(SamplingFields, kw_only=True, frozen=True):
    # A text, texts, token ids, or lists of token ids (service.py tells them apart).
    prompt: str | list[str | Int64 | list[Int64]]
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: str | None = None


class TokenizeRequest(Struct, kw_only=True, frozen=True):
    """vLLM's /tokenize in one struct: a completion's `prompt`, or a chat's `messages` (images
    included: their tokens are counted as the engine will see them)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # vLLM's defaults: true for a prompt, false for messages
    return_token_strs: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    tools: Annotated[list[Tool], Meta(max_length=1024)] | None = None  # rendered by the template, as for chat
    media_io_kwargs: dict[str, Any] | None = None  # refused unless empty, as for chat


class LoadLoRAAdapterRequest(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """vLLM's /v1/load_lora_adapter body; the path is relative to --allowed-lora-path (or inside it)."""

    lora_name: Annotated[str, Meta(min_length=1, max_length=256)]
    lora_path: Annotated[str, Meta(min_length=1, max_length=4096)]
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    lora_name: Annotated[str, Meta(min_length=1, max_length=256)]


class DetokenizeRequest(Struct, kw_only=True, frozen=True):
    model: str | None = None
    tokens: list[Int64]


# --- responses ---


class TokenizeResponse(Struct):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(Struct):
    prompt: str


class CompletionTokensDetails(Struct):
    reasoning_tokens: int


class PromptTokensDetails(Struct):
    """vLLM's (--enable-prompt-tokens-details): OpenAI's cached_tokens (prompt tokens the prefix
    cache served), vLLM's created_cache_tokens, and its per-modality count of the placeholder
    tokens already counted in prompt_tokens (null without media)."""

    cached_tokens: int
    created_cache_tokens: int | None = None
    multimodal_tokens: dict[str, int] | None = None


class Usage(Struct, omit_defaults=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None  # with --enable-prompt-tokens-details
    completion_tokens_details: CompletionTokensDetails | None = None  # with a reasoning parser


class TopLogprob(Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(Struct):
    token: str
    logprob: float | None  # None only for a completion prompt's first token (echo)
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Struct):
    content: list[TokenLogprob]


class FunctionCall(Struct):
    name: str
    arguments: str


class ToolCall(Struct):
    id: str
    function: FunctionCall
    type: str = "function"


class ResponseMessage(Struct, omit_defaults=True):
    role: str
    content: str | None  # always sent, null included (OpenAI's)
    # Absent when there are none, as OpenAI and vLLM send it (the SDK reads None, not []).
    tool_calls: list[ToolCall] = msgspec.field(default_factory=list)
    # The reasoning under both names: vLLM 0.32's `reasoning`, and `reasoning_content`, which
    # DeepSeek's API, LiteLLM and many clients read. Absent without reasoning.
    reasoning: str | None = None
    reasoning_content: str | None = None


class ChatChoice(Struct):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: str | None


class ChatCompletion(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"
    system_fingerprint: str | None = None


class DeltaFunction(Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(Struct, omit_defaults=True):
    """A fragment of call `index`: the first carries its id, type and name; the arguments follow."""

    index: int
    id: str | None = None
    type: str | None = None
    function: DeltaFunction | None = None


class Delta(Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(Struct):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    object: str = "chat.completion.chunk"
    usage: Usage | None = None


class CompletionLogprobs(Struct):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None
    object: str = "text_completion"


class ModelCard(Struct):
    id: str
    created: int
    max_model_len: int | None
    root: str
    object: str = "model"
    owned_by: str = "qwen-server"
    parent: str | None = None  # a LoRA adapter's base model (vLLM's field; null for the base)


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


class ErrorBody(Struct):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(Struct):
    error: ErrorBody


# --- two-phase chat decoding ---
# A body's cost grows with the objects it holds, and one decode call holds the event loop for all of
# them. The outer pass keeps each message as raw JSON (`msgspec.Raw`, no objects built), so that the
# message and part limits refuse a body of a million messages before they are built; then each
# message, and each part, decodes on its own.


class ChatRequestOuter(ChatCompletionRequest, kw_only=True, frozen=True):
    # Deliberately not a ChatCompletionRequest's type: this struct is only decoded, never used as one.
    messages: Annotated[list[msgspec.Raw], Meta(min_length=1)]  # type: ignore[assignment]


class TokenizeRequestOuter(TokenizeRequest, kw_only=True, frozen=True):
    messages: list[msgspec.Raw] | None = None  # type: ignore[assignment]  # decoded one by one, as a chat's


class ChatMessageOuter(ChatMessage, frozen=True, kw_only=True):
    content: str | list[msgspec.Raw] | None = None  # type: ignore[assignment]


# --- codecs (built once; msgspec caches the type plans) ---

chat_outer_decoder = msgspec.json.Decoder(ChatRequestOuter)
chat_message_outer_decoder = msgspec.json.Decoder(ChatMessageOuter)
content_part_decoder = msgspec.json.Decoder(ContentPart)
completion_request_decoder = msgspec.json.Decoder(CompletionRequest)
tokenize_outer_decoder = msgspec.json.Decoder(TokenizeRequestOuter)
detokenize_request_decoder = msgspec.json.Decoder(DetokenizeRequest)
load_lora_decoder = msgspec.json.Decoder(LoadLoRAAdapterRequest)
unload_lora_decoder = msgspec.json.Decoder(UnloadLoRAAdapterRequest)
encoder = msgspec.json.Encoder()
