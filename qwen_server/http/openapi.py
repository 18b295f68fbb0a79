"""OpenAPI documentation for bodies the routes decode themselves (strictly, with msgspec).

The routes read raw bytes instead of a Litestar `data` parameter (whose conversion is lax), so
Litestar cannot see the request types; msgspec's own JSON Schema of the wire structs is inserted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody, Schema

from qwen_server.protocol import REFUSED_FIELDS

_REF = "#/$defs/{name}"


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Replace references with their definitions: Litestar rebuilds components/schemas from its own
    registry, so the wire structs (none of them recursive) are documented inline."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def json_schema(struct: type[msgspec.Struct]) -> dict[str, Any]:
    """The struct's schema, without the fields that are declared only to be refused (REFUSED_FIELDS)."""
    (top,), defs = msgspec.json.schema_components([struct], ref_template=_REF)
    schema: dict[str, Any] = _inline(top, defs)
    for name in REFUSED_FIELDS:
        schema.get("properties", {}).pop(name, None)
    return schema


@dataclass
class _RawSchema(Schema):
    """A JSON Schema dict passed through as it is."""

    raw: dict[str, Any] = field(default_factory=dict)

    def to_schema(self) -> dict[str, Any]:
        return self.raw


def with_json_body(struct: type[msgspec.Struct]) -> type[Operation]:
    """An Operation class whose request body is `struct` as JSON."""
    body = RequestBody(
        required=True,
        content={"application/json": OpenAPIMediaType(schema=_RawSchema(raw=json_schema(struct)))},
    )

    @dataclass
    class _Operation(Operation):
        def __post_init__(self) -> None:
            self.request_body = body

    return _Operation
