"""Request bodies decoded strictly, within limits that refuse before objects are built: errors name
the field, nesting is bounded (msgspec and the code after it recurse)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

from qwen_server import protocol as p
from qwen_server.errors import bad_request, from_validation_error
from qwen_server.settings import Settings


def decode_chat(body: bytes, settings: Settings) -> p.ChatCompletionRequest:
    """A chat request in two passes (see protocol.py): the limits on messages and parts refuse a
    body before its objects are built."""
    outer = decode(p.chat_outer_decoder, body, settings.max_json_depth)
    fields = msgspec.structs.asdict(outer)
    fields["messages"] = decode_messages(outer.messages, settings)
    return p.ChatCompletionRequest(**fields)


def decode_tokenize(body: bytes, settings: Settings) -> p.TokenizeRequest:
    """A /tokenize request; its messages, if any, decoded as a chat's, within the same limits."""
    outer = decode(p.tokenize_outer_decoder, body, settings.max_json_depth)
    fields = msgspec.structs.asdict(outer)
    if outer.messages is not None:
        fields["messages"] = decode_messages(outer.messages, settings)
    return p.TokenizeRequest(**fields)


def decode_messages(raw_messages: list[msgspec.Raw], settings: Settings) -> list[p.ChatMessage]:
    """Each message, then each of its parts, decoded on its own, after the counts are checked."""
    if len(raw_messages) > settings.max_messages:
        raise bad_request(
            f"The request has {len(raw_messages)} messages; at most {settings.max_messages} are accepted.",
            "messages",
            code="too_many_messages",
        )
    messages = []
    for i, raw in enumerate(raw_messages):
        message = decode_part(p.chat_message_outer_decoder, raw, f"messages[{i}]")
        content = message.content
        if isinstance(content, list):
            if len(content) > settings.max_content_parts:
                raise bad_request(
                    f"Message {i} has {len(content)} content parts; at most {settings.max_content_parts} are accepted.",
                    f"messages[{i}].content",
                    code="too_many_content_parts",
                )
            content = [
                decode_part(p.content_part_decoder, part, f"messages[{i}].content[{j}]")
                for j, part in enumerate(content)
            ]
        fields = msgspec.structs.asdict(message)
        fields["content"] = content
        messages.append(p.ChatMessage(**fields))
    return messages


def decode_part(decoder: msgspec.json.Decoder[Any], data: bytes | msgspec.Raw, path: str) -> Any:
    """`data` (the body, or the part of it at `path`) decoded strictly; errors name the field."""
    try:
        return decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise from_validation_error(exc, path) from None
    except RecursionError:
        raise bad_request("The request body is nested too deeply to decode.", path or "body", code="too_deep") from None


def decode(decoder: msgspec.json.Decoder[Any], body: bytes, max_depth: int) -> Any:
    """Strict decoding of a request body; errors name the field. Free-form JSON fields (processor
    and template options, schemas) may nest at most `max_depth` levels: they reach code that recurses."""
    request = decode_part(decoder, body, "")
    for name in _FREE_FORM:
        value = getattr(request, name, None)
        if value is not None and depth_over(value, max_depth):
            raise bad_request(f"{name} is nested more than {max_depth} levels deep.", name, code="too_deep")
    for i, tool in enumerate(getattr(request, "tools", None) or ()):
        if tool.function.parameters is not None and depth_over(tool.function.parameters, max_depth):
            param = f"tools[{i}].function.parameters"
            raise bad_request(f"{param} is nested more than {max_depth} levels deep.", param, code="too_deep")
    format_ = getattr(request, "response_format", None)
    structured = getattr(request, "structured_outputs", None)
    for param, schema in (
        (
            "response_format.json_schema.schema",
            format_.json_schema.schema if format_ is not None and format_.json_schema is not None else None,
        ),
        ("structured_outputs.json", structured.json if structured is not None else None),
    ):
        if schema is not None and depth_over(schema, max_depth):
            raise bad_request(f"{param} is nested more than {max_depth} levels deep.", param, code="too_deep")
    return request


_FREE_FORM = ("mm_processor_kwargs", "chat_template_kwargs")


def depth_over(value: Any, limit: int) -> bool:
    """Whether containers nest deeper than `limit` in `value` (iterative: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False
