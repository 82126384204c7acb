"""Secret values out of API responses: every shape a Secret comes back in (the object,
a SecretList, a ``v1 List``, a watch event, a Table row's object, a Status's details do
not carry data) has its ``data`` and ``stringData`` values redacted or masked, and the
Secrets read are reported by namespace and name for the "secret read" audit event.

The ``kubectl.kubernetes.io/last-applied-configuration`` annotation is the whole object
as last applied, values included: it is redacted too. ``managedFields`` name keys, not
values, and stay.

JSON only: a response in another encoding (protobuf, CBOR) cannot be inspected, so the
relay asks for JSON (``json_accept``) and refuses what still is not (``is_json``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

Mode = Literal["redact", "mask"]
Masker = Callable[[str], str]
"""Masks one text (the relay's masking policy: card numbers, track data, patterns)."""

REDACTED = "<redacted by castgate>"
"""What a redacted value decodes to; ``data`` values stay valid base64."""
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
MAX_LINE = 64 << 20
"""A watch event line longer than this ends the stream (the relay refuses, not buffers)."""


class SecretBodyError(ValueError):
    """A response the relay cannot inspect: it is refused, never passed through."""


@dataclass
class Redaction:
    """The result of one response body."""

    body: bytes
    read: list[tuple[str, str]] = field(default_factory=list)
    """(namespace, name) of each Secret in the body, in order."""
    changed: bool = False


_REDACTED_B64 = base64.b64encode(REDACTED.encode()).decode()


def _value(value: Any, mode: Mode, masker: Masker | None, encoded: bool) -> Any:
    if not isinstance(value, str):
        return _REDACTED_B64 if encoded else REDACTED
    if mode == "mask" and masker is not None:
        if not encoded:
            return masker(value)
        try:
            text = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return _REDACTED_B64  # not text: nothing a text masker can vouch for
        masked = masker(text)
        return value if masked == text else base64.b64encode(masked.encode()).decode()
    return _REDACTED_B64 if encoded else REDACTED


def _redact_annotation(meta: dict[str, Any], out: Redaction) -> None:
    annotations = meta.get("annotations")
    if isinstance(annotations, dict) and LAST_APPLIED in annotations:
        annotations[LAST_APPLIED] = REDACTED
        out.changed = True


def _redact_secret(obj: dict[str, Any], mode: Mode, masker: Masker | None, out: Redaction) -> None:
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    out.read.append((str(meta.get("namespace") or ""), str(meta.get("name") or "")))
    _redact_annotation(meta, out)
    for key, encoded in (("data", True), ("stringData", False)):
        values = obj.get(key)
        if isinstance(values, dict):
            for k, v in values.items():
                new = _value(v, mode, masker, encoded)
                if new != v:
                    values[k] = new
                    out.changed = True
        elif values is not None:
            obj[key] = {}
            out.changed = True


def _walk(
    obj: Any, mode: Mode, masker: Masker | None, out: Redaction, *, secret: bool, depth: int = 0
) -> None:
    """Find Secrets in a decoded body. ``secret``: untyped objects here are Secrets (the
    items of a SecretList carry no kind)."""
    if depth > 8 or not isinstance(obj, dict):
        return
    kind = obj.get("kind")
    if kind == "Secret" or (secret and kind is None and "metadata" in obj):
        _redact_secret(obj, mode, masker, out)
        return
    if secret and kind == "PartialObjectMetadata":
        # A Table row or metadata-only list: no values, but the last-applied annotation.
        meta = obj.get("metadata")
        if isinstance(meta, dict):
            _redact_annotation(meta, out)
        return
    if kind == "WatchEvent" or ("type" in obj and "object" in obj and kind is None):
        _walk(obj.get("object"), mode, masker, out, secret=secret, depth=depth + 1)
        return
    items_secret = secret or kind == "SecretList"
    if isinstance(obj.get("items"), list):
        for item in obj["items"]:
            _walk(item, mode, masker, out, secret=items_secret, depth=depth + 1)
    if kind == "Table" and isinstance(obj.get("rows"), list):
        for row in obj["rows"]:
            if isinstance(row, dict):
                _walk(row.get("object"), mode, masker, out, secret=secret, depth=depth + 1)


def redact(
    body: bytes, *, mode: Mode = "redact", masker: Masker | None = None, secret: bool = False
) -> Redaction:
    """Redact or mask the Secret values in one JSON body (an object, a list, a Table, or
    one watch event line).

    Args:
        body: the response body.
        mode: the target's ``secrets`` setting.
        masker: masks a decoded value (``mask`` mode); without one, ``mask`` redacts.
        secret: the request was for the ``secrets`` resource: untyped objects are Secrets.

    Returns:
        The new body (the same bytes when nothing changed) and the Secrets read.

    Raises:
        SecretBodyError: the body is not JSON (it must not reach the agent).
    """
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise SecretBodyError("response is not JSON") from None
    out = Redaction(body)
    _walk(obj, mode, masker, out, secret=secret)
    if out.changed:
        out.body = orjson.dumps(obj)
    return out


class WatchLines:
    """Split a chunked watch stream into complete event lines (a chunk may end anywhere)."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._buf = bytearray()
        self._max = max_line

    def feed(self, chunk: bytes) -> list[bytes]:
        """Complete lines (without their newline) now available."""
        self._buf += chunk
        lines: list[bytes] = []
        start = 0
        while (end := self._buf.find(b"\n", start)) != -1:
            if end > start:
                lines.append(bytes(self._buf[start:end]))
            start = end + 1
        del self._buf[:start]
        if len(self._buf) > self._max:
            raise SecretBodyError("watch event line too long")
        return lines

    def close(self) -> bytes:
        """What is left when the stream ends (an event without a final newline)."""
        rest, self._buf = bytes(self._buf), bytearray()
        return rest


def is_json(content_type: str | None) -> bool:
    """Whether a response's Content-Type is JSON (``application/json``, with or without
    parameters such as ``;as=Table``)."""
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json"


def json_accept(accept: str | None) -> str:
    """The Accept header to send upstream for a request whose response must be
    inspected: the agent's JSON choices (Table included), never protobuf or CBOR."""
    kept = [
        part.strip()
        for part in (accept or "").split(",")
        if part.strip().split(";")[0].strip().lower() == "application/json"
    ]
    return ",".join(kept) if kept else "application/json"
