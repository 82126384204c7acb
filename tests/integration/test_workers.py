"""``listen.workers = 2``: two relay processes behind the same SSH, PostgreSQL and API
ports (SO_REUSEPORT), working as two nodes of one deployment on the default SQLite
store: connections land on both, an approval decided through whichever worker the API
request reaches releases the command the other holds, a live watch reaches the session
on either, and SIGTERM to the supervisor stops both with every cast sealed."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psycopg
import pytest

from recorder.config import load_config
from recorder.integrity import Verdict, verify_cast
from recorder.signing import SigningKey
from recorder.store import Store
from tests.fix_cluster import api
from tests.fix_pg_relay import APP_PASSWORD, PG_TARGETS, _prepare_app_db
from tests.fix_postgres import PostgresServer
from tests.fix_relay import TOKENS, Held, Relay, start_relay, wait_for
from tests.fix_sshd import SshTarget


@pytest.fixture(scope="module")
def workers(
    sshd_target: SshTarget,
    postgres_server: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Relay]:
    _prepare_app_db(postgres_server)
    relay = start_relay(
        tmp_path_factory.mktemp("workers"),
        sshd_target,
        extra=PG_TARGETS.format(port=postgres_server.port),
        env={"APPDB_PASSWORD": APP_PASSWORD},
        listen_extra="workers = 2",
    )
    # Both workers announce themselves; the fixture returned after the first.
    wait_for(lambda: sum(e.get("msg") == "relay.listening" for e in relay.logs) == 2, 30)
    try:
        yield relay
    finally:
        relay.stop()


def sessions(relay: Relay) -> list[dict[str, object]]:
    with Store.open(load_config(relay.config).store_url()) as store:
        return store.list_sessions()


def test_connections_are_spread_over_both_workers(workers: Relay) -> None:
    for i in range(16):
        done = workers.ssh("web", f"echo spread-{i}")
        assert done.returncode == 0 and done.stdout == f"spread-{i}\n".encode()
    with psycopg.connect(workers.pg_dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    nodes = {s["node"] for s in sessions(workers) if str(s.get("title") or "").find("spread-") >= 0}
    # 16 connections from different source ports: all on one worker has odds 2**-15.
    assert len(nodes) == 2 and all(str(n).endswith(("-w0", "-w1")) for n in nodes), nodes
    with Store.open(load_config(workers.config).store_url()) as store:
        alive = [n for n in store.list_nodes() if n["stopped_at"] is None]
    assert sorted(str(n["id"])[-3:] for n in alive) == ["-w0", "-w1"]


def test_an_approval_reaches_the_worker_holding_the_command(workers: Relay) -> None:
    for _ in range(3):  # the API request lands on either worker: try it a few times
        held = Held(workers, "systemctl restart app; echo released")
        aid = held.approval_id()
        res = api(workers, f"/api/v1/approvals/{aid}/approve", body={"reason": "ok"})
        assert res["status"] == "approved", res
        assert held.finish() == 0
        assert b"released" in held.out


def test_a_live_watch_reaches_the_session_on_either_worker(workers: Relay) -> None:
    async def watch(sid: str) -> list[dict[str, object]]:
        url = f"ws://127.0.0.1:{workers.api_port}/api/v1/sessions/{sid}/live"
        headers = {"Authorization": f"Bearer {TOKENS['alice']}"}
        events: list[dict[str, object]] = []
        async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=headers) as ws:
            async for msg in ws:
                events.append(json.loads(msg.data))
                # Live output after the first screen: the stream flows from the worker
                # that owns the session, whichever worker took the watcher.
                if events[-1].get("type") in ("o", "end") and len(events) > 1:
                    break
        return events

    for n in range(3):  # the watcher's API connection lands on either worker
        # The session ticks until the test ends it, so it is live whenever the watcher
        # comes (on a loaded machine a fixed number of ticks was over before).
        loop = "i=0; while :; do echo tick-$i; i=$((i+1)); sleep 0.3; done"
        agent = subprocess.Popen(
            ["ssh", *workers.ssh_args(), "web@127.0.0.1", f": watched-{n}; {loop}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            live: list[str] = []

            def found(live: list[str] = live, n: int = n) -> bool:
                rows = api(workers, "/api/v1/sessions?live=true")["sessions"]
                live[:] = [r["id"] for r in rows if f"watched-{n};" in (r["title"] or "")]
                return bool(live)

            wait_for(found, 20)
            events = asyncio.run(watch(live[0]))
            assert events[0]["type"] == "screen"
            assert events[-1]["type"] == "o" and "tick-" in str(events[-1]["data"])
        finally:
            agent.kill()
            agent.wait(30)


def test_sigterm_stops_both_workers_and_seals_every_cast(workers: Relay, tmp_path: Path) -> None:
    children = subprocess.run(
        ["pgrep", "-P", str(workers.proc.pid)], capture_output=True, text=True
    ).stdout.split()
    assert len(children) == 2, children
    assert workers.stop() == 0
    for pid in children:
        assert not Path(f"/proc/{pid}").exists()
    key = SigningKey.load_or_create(load_config(workers.config).keys_dir).public
    casts = sorted(workers.recordings().glob("*.cast"))
    assert casts
    for cast in casts:
        assert verify_cast(cast, key).verdict is Verdict.INTACT, cast
