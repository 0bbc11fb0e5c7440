"""The CLI's `--json` output: one naming style (the proto field names, snake_case) and
numbers as JSON numbers.

protobuf's JSON mapping renders 64-bit integers as strings (JavaScript cannot hold them
exactly); the counts and micro-amounts a user scripts against stay far below 2**53, so
they are turned back into numbers here, deliberately, field by field from the descriptor.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

_INT64_TYPES = frozenset({
    FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64,
})


def message_dict(message: Message) -> dict[str, Any]:
    """`message` as a JSON object: snake_case keys, every field present, int64 as numbers."""
    raw = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                    always_print_fields_with_no_presence=True)
    return _numbers(message.DESCRIPTOR, raw)


def _numbers(descriptor: Any, value: dict[str, Any]) -> dict[str, Any]:
    # `descriptor` is a protobuf Descriptor (the upb and pure-Python ones type differently).
    for field in descriptor.fields:
        if field.name not in value:
            continue
        current = value[field.name]
        sub = field.message_type
        if field.type in _INT64_TYPES:
            value[field.name] = [int(v) for v in current] if isinstance(current, list) else int(current)
        elif sub is not None and sub.full_name.startswith("copilot."):
            if sub.GetOptions().map_entry:
                value_field = sub.fields_by_name["value"]
                if value_field.type in _INT64_TYPES:
                    value[field.name] = {k: int(v) for k, v in current.items()}
                elif value_field.message_type is not None:
                    value[field.name] = {k: _numbers(value_field.message_type, v) for k, v in current.items()}
            elif isinstance(current, list):
                value[field.name] = [_numbers(sub, v) for v in current]
            elif isinstance(current, dict):
                value[field.name] = _numbers(sub, current)
    return value
