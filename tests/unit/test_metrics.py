"""relay/metrics.py: the castgate_* names and labels /metrics has always had, from
prometheus_client, in a registry per relay context (two relays in one process keep
their own figures)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from recorder.config import parse_config
from recorder.signing import SigningKey
from recorder.store import Store
from relay.context import RelayContext
from relay.metrics import exposition, relay_registry

# name -> (type, label names): what /metrics showed before prometheus_client
EXPECTED = {
    "castgate_up": ("gauge", set()),
    "castgate_live_sessions": ("gauge", {"protocol"}),
    "castgate_watchers": ("gauge", set()),
    "castgate_approvals_pending": ("gauge", set()),
    "castgate_events_total": ("counter", {"kind", "outcome"}),
    "castgate_recording_failures_total": ("counter", {"action"}),
    "castgate_store_available": ("gauge", set()),
    "castgate_store_spool_pending": ("gauge", set()),
    "castgate_store_spooled_total": ("counter", set()),
    "castgate_store_replayed_total": ("counter", set()),
    "castgate_store_rejected_total": ("counter", set()),
}


@pytest.fixture
def contexts(tmp_path: Path) -> Iterator[list[RelayContext]]:
    made: list[RelayContext] = []
    stores: list[Store] = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        cfg = parse_config('data_dir = "data"\n', tmp_path / name / "castgate.toml")
        store = Store.open(cfg.store_url())
        stores.append(store)
        made.append(RelayContext(cfg, store, SigningKey.generate()))
    try:
        yield made
    finally:
        for store in stores:
            store.close()


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_names_labels_and_types(contexts: list[RelayContext]) -> None:
    ctx = contexts[0]
    ctx.audit.counters[("auth", "failure")] += 3
    ctx.audit.recording_failures["refused"] += 1
    text = exposition(relay_registry(ctx)).decode()
    types = {
        line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE")
    }
    assert types == {name: kind for name, (kind, _labels) in EXPECTED.items()}
    samples = _samples(text)
    for (name, labels), _value in samples.items():
        assert {k for k, _v in labels} == EXPECTED[name][1], name
    assert (
        samples["castgate_events_total", frozenset({("kind", "auth"), ("outcome", "failure")})] == 3
    )
    assert samples["castgate_recording_failures_total", frozenset({("action", "refused")})] == 1
    assert samples["castgate_live_sessions", frozenset({("protocol", "postgres")})] == 0
    assert samples["castgate_up", frozenset()] == 1
    assert "_created" not in text  # no creation-time series beside the counters


def test_a_registry_per_context(contexts: list[RelayContext]) -> None:
    a, b = contexts
    a.audit.counters[("record.read", "success")] += 2
    a.hub.open("s1", {"protocol": "ssh"}, 80, 24)
    ra, rb = relay_registry(a), relay_registry(b)
    sa, sb = _samples(exposition(ra).decode()), _samples(exposition(rb).decode())
    key = ("castgate_events_total", frozenset({("kind", "record.read"), ("outcome", "success")}))
    assert sa[key] == 2
    assert key not in sb
    assert sa["castgate_live_sessions", frozenset({("protocol", "ssh")})] == 1
    assert sb["castgate_live_sessions", frozenset({("protocol", "ssh")})] == 0
    # and nothing lands in the process-wide default registry
    assert REGISTRY.get_sample_value("castgate_up") is None


def test_watchers_of_both_kinds_are_counted(contexts: list[RelayContext]) -> None:
    ctx = contexts[0]
    stream = ctx.hub.open("s1", {"protocol": "ssh"}, 80, 24)
    stream.subscribe()  # a watcher over SSH (castgate@relay watch)

    async def send(payload: bytes) -> None:
        return None

    stream.subscribe_frames(send)  # a WebSocket watcher
    text = exposition(relay_registry(ctx)).decode()
    assert _samples(text)["castgate_watchers", frozenset()] == 2
