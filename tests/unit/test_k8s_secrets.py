"""Secret values in every response shape: redacted or masked, names reported; bodies
that cannot be inspected refused."""

from __future__ import annotations

import base64

import orjson
import pytest

from relay.k8s.secrets import (
    LAST_APPLIED,
    REDACTED,
    SecretBodyError,
    WatchLines,
    is_json,
    json_accept,
    redact,
)

PAN = "4111111111111111"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def secret(name: str = "db", ns: str = "prod", typed: bool = True) -> dict[str, object]:
    obj: dict[str, object] = {
        "metadata": {
            "name": name,
            "namespace": ns,
            "annotations": {LAST_APPLIED: '{"data":{"password":"' + b64("hunter2") + '"}}'},
        },
        "data": {
            "password": b64("hunter2"),
            "card": b64(f"card {PAN}"),
            "bin": base64.b64encode(b"\xff\xfe").decode(),
        },
        "stringData": {"plain": "s3cret"},
        "type": "Opaque",
    }
    if typed:
        obj = {"kind": "Secret", "apiVersion": "v1", **obj}
    return obj


def mask(text: str) -> str:
    return text.replace(PAN, "411111******1111")


def test_object_redacted_and_named() -> None:
    out = redact(orjson.dumps(secret()))
    body = orjson.loads(out.body)
    assert out.read == [("prod", "db")] and out.changed
    assert {base64.b64decode(v).decode() for v in body["data"].values()} == {REDACTED}
    assert body["stringData"] == {"plain": REDACTED}
    assert body["metadata"]["annotations"][LAST_APPLIED] == REDACTED
    assert b"hunter2" not in out.body and b64("hunter2").encode() not in out.body


def test_mask_mode_masks_text_and_redacts_binary() -> None:
    out = redact(orjson.dumps(secret()), mode="mask", masker=mask)
    data = orjson.loads(out.body)["data"]
    assert base64.b64decode(data["password"]) == b"hunter2"  # nothing to mask in it
    assert base64.b64decode(data["card"]) == b"card 411111******1111"
    assert base64.b64decode(data["bin"]).decode() == REDACTED
    assert PAN.encode() not in out.body and b64(f"card {PAN}").encode() not in out.body
    # The last-applied annotation is redacted whatever the mode: it is the whole object.
    assert orjson.loads(out.body)["metadata"]["annotations"][LAST_APPLIED] == REDACTED


def test_lists_watch_events_and_tables() -> None:
    typed_list = {
        "kind": "SecretList",
        "items": [secret("a", typed=False), secret("b", typed=False)],
    }
    out = redact(orjson.dumps(typed_list))
    assert out.read == [("prod", "a"), ("prod", "b")] and b"hunter2" not in out.body
    generic = {
        "kind": "List",
        "items": [
            secret("a"),
            {"kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": "v"}},
        ],
    }
    out = redact(orjson.dumps(generic))
    assert out.read == [("prod", "a")]
    assert orjson.loads(out.body)["items"][1]["data"] == {"k": "v"}
    event = {"type": "MODIFIED", "object": secret("w")}
    out = redact(orjson.dumps(event))
    assert out.read == [("prod", "w")] and b64("hunter2").encode() not in out.body
    untyped_event = {"type": "ADDED", "object": secret("u", typed=False)}
    assert redact(orjson.dumps(untyped_event), secret=True).read == [("prod", "u")]
    table = {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "columnDefinitions": [{"name": "Name"}],
        "rows": [
            {"cells": ["db", "Opaque", 3, "1d"], "object": secret()},
            {
                "cells": ["m"],
                "object": {"kind": "PartialObjectMetadata", "metadata": secret()["metadata"]},
            },
        ],
    }
    out = redact(orjson.dumps(table), secret=True)
    assert out.read == [("prod", "db")]
    assert b"hunter2" not in out.body and b64("hunter2").encode() not in out.body


def test_untouched_bodies_are_the_same_bytes() -> None:
    body = b'{"kind":"PodList","items":[{"metadata":{"name":"p"}}]}'
    out = redact(body)
    assert out.body is body and not out.changed and out.read == []
    # An untyped object is a Secret only where the request was for secrets.
    assert redact(orjson.dumps(secret(typed=False))).read == []
    assert redact(orjson.dumps(secret(typed=False)), secret=True).read == [("prod", "db")]


def test_not_json_is_refused() -> None:
    with pytest.raises(SecretBodyError):
        redact(b"\x6b\x38\x73\x00protobuf")


def test_data_that_is_not_a_mapping_is_dropped() -> None:
    out = redact(b'{"kind":"Secret","metadata":{"name":"x"},"data":"c2VjcmV0"}')
    assert orjson.loads(out.body)["data"] == {}


def test_watch_lines_split_anywhere() -> None:
    stream = b"".join(
        orjson.dumps({"type": "ADDED", "object": secret(str(i))}) + b"\n" for i in range(3)
    )
    for cut in range(1, len(stream), 7):
        w = WatchLines()
        lines = w.feed(stream[:cut]) + w.feed(stream[cut:])
        assert [redact(line).read for line in lines] == [[("prod", str(i))] for i in range(3)]
        assert w.close() == b""
    w = WatchLines(max_line=10)
    with pytest.raises(SecretBodyError):
        w.feed(b"x" * 11)


def test_content_types() -> None:
    assert is_json("application/json") and is_json("application/json;as=Table;v=v1;g=meta.k8s.io")
    assert not is_json("application/vnd.kubernetes.protobuf") and not is_json(None)
    assert json_accept("application/vnd.kubernetes.protobuf,application/json") == "application/json"
    table = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"
    assert json_accept(table) == table
    assert json_accept("application/cbor") == "application/json"
    assert json_accept(None) == "application/json"
