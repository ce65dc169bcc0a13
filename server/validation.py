"""Input rules shared by the services: ids, names, tags, metadata size."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from server.errors import FieldViolation, InvalidArgument

ID_MAX = 128
NAME_MAX = 256
MODEL_MAX = 128
TAGS_MAX = 64
TAG_KEY_MAX = 128
TAG_VALUE_MAX = 256
METADATA_MAX_BYTES = 16 * 1024
METADATA_MAX_DEPTH = 10

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
ID_RULE = (
    f"1 to {ID_MAX} characters: letters, digits, '.', '_', ':' or '-', "
    "starting with a letter or digit"
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
TAG_KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,127}")


def check_id(field: str, value: str, out: list[FieldViolation]) -> None:
    if not value:
        out.append(FieldViolation(field, f"is required ({ID_RULE})"))
    elif len(value) > ID_MAX:
        out.append(FieldViolation(field, f"is {len(value)} characters; at most {ID_MAX}"))
    elif not ID_PATTERN.fullmatch(value):
        out.append(FieldViolation(field, f"{value[:40]!r} is not a valid id ({ID_RULE})"))


def raise_if(violations: list[FieldViolation]) -> None:
    """INVALID_ARGUMENT listing every violation, if there are any."""
    if violations:
        raise InvalidArgument(violations)


def require_id(field: str, value: str) -> str:
    """`value` if it is a valid id, else INVALID_ARGUMENT naming `field`."""
    out: list[FieldViolation] = []
    check_id(field, value, out)
    raise_if(out)
    return value


def check_text(field: str, value: str, limit: int, out: list[FieldViolation]) -> None:
    if len(value) > limit:
        out.append(FieldViolation(field, f"is {len(value)} characters; at most {limit}"))
    elif _CONTROL.search(value):
        out.append(FieldViolation(field, "must not contain control characters"))


def check_tags(field: str, tags: Mapping[str, str], out: list[FieldViolation]) -> None:
    if len(tags) > TAGS_MAX:
        out.append(FieldViolation(field, f"has {len(tags)} entries; at most {TAGS_MAX}"))
        return
    for key, value in tags.items():
        if not TAG_KEY_PATTERN.fullmatch(key):
            out.append(
                FieldViolation(
                    f"{field}[{key[:40]!r}]",
                    f"tag keys are 1 to {TAG_KEY_MAX} characters: letters, digits, "
                    "'.', '_', '/' or '-', starting with a letter or digit",
                )
            )
        check_text(f"{field}[{key[:40]!r}]", value, TAG_VALUE_MAX, out)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def check_document(
    field: str, doc: Mapping[str, Any], max_bytes: int, out: list[FieldViolation]
) -> None:
    size = len(json.dumps(doc, separators=(",", ":")).encode())
    if size > max_bytes:
        out.append(FieldViolation(field, f"is {size} bytes as JSON; at most {max_bytes}"))
    elif _depth(doc) > METADATA_MAX_DEPTH:
        out.append(FieldViolation(field, f"is nested deeper than {METADATA_MAX_DEPTH} levels"))
