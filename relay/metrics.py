"""The relay's Prometheus metrics, with prometheus_client.

The figures live where the work is done (the relay context's counters, the spool, the
uploader, the cluster listener, the live hub), so they are read at scrape time by one
custom collector rather than mirrored into metric objects on every change. Each relay
context gets its own ``CollectorRegistry``, never the process-wide default one: tests
and the embedded demo run several relays in one process.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from relay.context import RelayContext

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""The classic text format: what every Prometheus version scrapes."""

_RECORDING_ACTIONS = ("terminated", "refused", "continued")


class RelayCollector(Collector):
    """Every castgate_* figure of one relay context, read when scraped."""

    def __init__(self, ctx: RelayContext) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("castgate_up", "The relay is running.", value=1)
        yield from self._sessions()
        yield from self._faults()
        yield from self._uploads()
        yield from self._cluster()

    def _sessions(self) -> Iterator[Metric]:
        ctx = self.ctx
        live = GaugeMetricFamily(
            "castgate_live_sessions", "Sessions open now.", labels=["protocol"]
        )
        by_proto: dict[str, int] = {"ssh": 0, "postgres": 0}
        for stream in ctx.hub.streams.values():
            proto = str(stream.meta.get("protocol", "ssh"))
            by_proto[proto] = by_proto.get(proto, 0) + 1
        for proto, n in sorted(by_proto.items()):
            live.add_metric([proto], n)
        yield live
        yield GaugeMetricFamily(
            "castgate_watchers",
            "Live watchers connected.",
            value=sum(s.watcher_count() for s in ctx.hub.streams.values()),
        )
        yield GaugeMetricFamily(
            "castgate_approvals_pending",
            "Approval requests waiting for a decision.",
            value=ctx.broker.held(),
        )
        events = CounterMetricFamily(
            "castgate_events",
            "Audit events written, by kind and outcome.",
            labels=["kind", "outcome"],
        )
        for (kind, outcome), n in sorted(ctx.audit.counters.items()):
            events.add_metric([kind, outcome], n)
        yield events

    def _faults(self) -> Iterator[Metric]:
        """Recording failures and the store spool (alerts for on-call)."""
        ctx, spool = self.ctx, self.ctx.spool
        failures = CounterMetricFamily(
            "castgate_recording_failures",
            "Sessions whose recording failed, by what was done (terminated, refused, continued).",
            labels=["action"],
        )
        for action in _RECORDING_ACTIONS:
            failures.add_metric([action], ctx.audit.recording_failures[action])
        yield failures
        yield GaugeMetricFamily(
            "castgate_store_available",
            "The audit store takes writes (0: they are spooled).",
            value=int(spool.available),
        )
        yield GaugeMetricFamily(
            "castgate_store_spool_pending",
            "Store writes waiting in the on-disk spool.",
            value=spool.pending,
        )
        for name, help_text, value in (
            ("spooled", "Store writes spooled during outages.", spool.spooled),
            ("replayed", "Spooled store writes replayed to the store.", spool.replayed),
            ("rejected", "Spooled writes the store refused (kept aside).", spool.rejected),
        ):
            yield CounterMetricFamily(f"castgate_store_{name}", help_text, value=value)

    def _uploads(self) -> Iterator[Metric]:
        up = self.ctx.shipping.uploader
        if up is None:
            return
        uploads = CounterMetricFamily(
            "castgate_uploads", "Casts shipped to object storage, by outcome.", labels=["outcome"]
        )
        uploads.add_metric(["success"], up.uploaded)
        uploads.add_metric(["failure"], up.failed)
        yield uploads
        yield CounterMetricFamily(
            "castgate_upload_bytes", "Bytes of casts confirmed in object storage.", value=up.bytes
        )
        yield GaugeMetricFamily(
            "castgate_uploads_pending", "Casts waiting for an upload (attempt).", value=up.pending
        )

    def _cluster(self) -> Iterator[Metric]:
        if self.ctx.cluster is None:
            return
        status = self.ctx.cluster.status()
        yield GaugeMetricFamily(
            "castgate_cluster_listening",
            "Listening for approval decisions of other relays.",
            value=int(status["listening"]),
        )
        yield CounterMetricFamily(
            "castgate_approval_notifications",
            "Decisions announced by LISTEN/NOTIFY.",
            value=status["notifications"],
        )
        yield CounterMetricFamily(
            "castgate_cluster_listen_reconnects",
            "LISTEN connections lost.",
            value=status["reconnects"],
        )


def relay_registry(ctx: RelayContext) -> CollectorRegistry:
    """A registry of its own for ``ctx``'s metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RelayCollector(ctx))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry's metrics in the text format (``CONTENT_TYPE``)."""
    return generate_latest(registry)
