"""Sampling parameters for the engine from a request's fields, with the model's own defaults (its
generation_config) under them, as vLLM's server applies them; and the fields every endpoint refuses."""

from __future__ import annotations

from typing import Any

import msgspec

from qwen_server import protocol as p
from qwen_server.engine import vllm_compat
from qwen_server.engine.lifecycle import Engine
from qwen_server.errors import bad_request

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
        structured: Any = msgspec.UNSET,
    ) -> Any:
        """`structured`, when given, is the grammar decided elsewhere (a chat's tool call), in place
        of the request's response_format."""
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
        if structured is not msgspec.UNSET:
            if structured is not None:
                kwargs["structured_outputs"] = structured
        elif req.response_format is not None and req.response_format.type != "text":
            fmt = req.response_format
            if fmt.type == "json_object":
                kwargs["structured_outputs"] = vllm_compat.structured_outputs(json_object=True)
            else:
                if fmt.json_schema is None or fmt.json_schema.schema is None:
                    raise bad_request(
                        "response_format json_schema needs json_schema.schema.", "response_format.json_schema"
                    )
                kwargs["structured_outputs"] = vllm_compat.structured_outputs(json=fmt.json_schema.schema)
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
                param = "tools" if params.structured_outputs.structural_tag else "response_format"
                raise bad_request(f"Invalid {param}: {exc}", getattr(exc, "parameter", None) or param) from None
        return params


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
    if options is not None and options.continuous_usage_stats:
        raise bad_request(
            "stream_options.continuous_usage_stats is not supported by this server.",
            "stream_options.continuous_usage_stats",
            code="unsupported_field",
        )
