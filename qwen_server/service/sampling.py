"""Sampling parameters for the engine from a request's fields, with the model's own defaults (its
generation_config) under them, as vLLM's server applies them; and the fields every endpoint refuses."""

from __future__ import annotations

from typing import Any

import msgspec

from qwen_server import protocol as p
from qwen_server.engine import vllm_compat
from qwen_server.engine.lifecycle import Engine
from qwen_server.errors import bad_request, clip

_PLAIN = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


class Sampling:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def defaults(self) -> dict[str, Any]:
        """The model's generation_config defaults, read by the engine when it loaded the model."""
        return self.engine.sampling_defaults

    def params(
        self,
        req: p.SamplingFields,
        max_tokens: int,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
        tools_grammar: Any = None,
    ) -> Any:
        """`tools_grammar`, when given, is the grammar a chat's forced tool call needs; the request's
        own constraint (response_format, structured_outputs) cannot be combined with it."""
        kwargs: dict[str, Any] = {k: v for k, v in self.defaults().items() if k != "max_tokens"}
        for name in _PLAIN:
            value = getattr(req, name)
            if value is not None:
                kwargs[name] = value
        if req.logit_bias:
            try:
                kwargs["logit_bias"] = {int(k): v for k, v in req.logit_bias.items()}
            except ValueError:
                raise bad_request("logit_bias keys must be token ids.", "logit_bias") from None
        grammar = _structured(req, tools_grammar, vllm_compat.structured_output_options(self.engine.client))
        if grammar is not None:
            kwargs["structured_outputs"] = grammar
        try:
            params = vllm_compat.sampling_params(
                n=req.n,
                max_tokens=max_tokens,
                min_tokens=min(req.min_tokens, max_tokens),
                stop=req.stop,
                stop_token_ids=req.stop_token_ids,
                ignore_eos=req.ignore_eos,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=req.skip_special_tokens,
                spaces_between_special_tokens=req.spaces_between_special_tokens,
                allowed_token_ids=req.allowed_token_ids,
                bad_words=req.bad_words,
                include_stop_str_in_output=req.include_stop_str_in_output,
                # Streams take each step's new tokens; a non-streaming request only its final output,
                # so this worker is not woken once per token for a result nobody reads until the end.
                output_kind=vllm_compat.output_kind(req.stream),
                **kwargs,
            )
        except (ValueError, vllm_compat.client_error()) as exc:  # vLLM's checks raise VLLMValidationError
            raise bad_request(f"Invalid sampling parameters: {exc}", getattr(exc, "parameter", None)) from None
        client = self.engine.client
        if params.structured_outputs is not None and client is not None:
            # The engine checks a grammar when the request reaches it, after a stream's 200 went out:
            # checked here, a bad one is a 400 naming the field, streamed or not.
            try:
                vllm_compat.verify_sampling(client, params, self.engine.tokenizer)
            except (ValueError, vllm_compat.client_error()) as exc:
                source = constraint_of(req, params)
                raise bad_request(f"Invalid {source}: {clip(str(exc))}", source) from None
        return params


def constraint_of(req: p.SamplingFields, params: Any) -> str | None:
    """The field the engine's grammar came from, if it has one (where a grammar error points)."""
    if params.structured_outputs is None:
        return None
    if req.response_format is not None and req.response_format.type != "text":
        return "response_format"
    return "structured_outputs" if req.structured_outputs is not None else "tools"


def _structured(req: p.SamplingFields, tools_grammar: Any, server: dict[str, bool]) -> Any:
    """The engine's grammar, if any (constraint_of names the field it comes from). As in vLLM, response_format's constraint
    replaces structured_outputs' (whose options stay); a forced tool call's grammar combines with
    neither (vLLM drops the request's, silently: here it is a 400). `server`: the options vLLM's
    grammar backends take from the engine's config, not from the request."""
    fields: dict[str, Any] = {}
    source = "structured_outputs"
    if req.structured_outputs is not None:
        fields = {k: v for k, v in msgspec.structs.asdict(req.structured_outputs).items() if v is not None}
        _check_options(fields, server)
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        source = "response_format"
        if fmt.type == "json_object":
            fields["json_object"] = True
        else:
            if fmt.json_schema is None or fmt.json_schema.schema is None:
                raise bad_request(
                    "response_format json_schema needs json_schema.schema.", "response_format.json_schema"
                )
            fields["json"] = fmt.json_schema.schema
    if tools_grammar is not None:
        if fields:
            raise bad_request(
                f'{source} cannot be combined with a forced tool call (tool_choice "required" or a named '
                "function, or tools constrained by --tool-strict-level): the call's grammar would replace it.",
                source,
            )
        return tools_grammar
    if not fields and req.structured_outputs is None:
        return None
    try:
        return vllm_compat.structured_outputs(**fields)
    except (ValueError, TypeError, vllm_compat.client_error()) as exc:  # none, or several kinds of constraint
        raise bad_request(f"Invalid {source}: {clip(str(exc))}", source) from None


def _check_options(fields: dict[str, Any], server: dict[str, bool]) -> None:
    """vLLM 0.32 accepts these per request and applies the engine's values instead (its grammar
    backends read --structured-outputs-config; no backend reads whitespace_pattern): a value that
    would not be applied is refused."""
    if fields.pop("whitespace_pattern", None) is not None:
        raise bad_request(
            "structured_outputs.whitespace_pattern is not applied by vLLM's grammar backends.",
            "structured_outputs.whitespace_pattern",
            code="unsupported_field",
        )
    for name, value in server.items():
        if fields.get(name, False) != value:
            raise bad_request(
                f"structured_outputs.{name} is {str(value).lower()} for every request on this server (vLLM's "
                f'grammar backends take it from the engine: --engine-args \'{{"structured_outputs_config": '
                f'{{"{name}": ...}}}}\'); a request cannot change it.',
                f"structured_outputs.{name}",
                code="unsupported_field",
            )
        fields.pop(name, None)


def check_common(req: p.SamplingFields) -> None:
    """Fields not honoured are refused, not dropped; stream_options needs a stream (as in vLLM)."""
    for name, harmless in p.REFUSED_FIELDS.items():
        value = getattr(req, name)
        if (
            value is msgspec.UNSET
            or value is None
            or any(value == ok and isinstance(value, bool) == isinstance(ok, bool) for ok in harmless)
        ):
            continue
        raise bad_request(
            f"{name} is not supported by this server (see the README's table of fields).",
            name,
            code="unsupported_field",
        )
    options = req.stream_options
    if options is not None and not req.stream:
        raise bad_request("stream_options is only allowed with stream: true.", "stream_options")
    if options is not None and options.continuous_usage_stats and not options.include_usage:
        # vLLM ignores it without include_usage: asked for and not done, so refused here.
        raise bad_request(
            "stream_options.continuous_usage_stats needs include_usage: true.", "stream_options.continuous_usage_stats"
        )
