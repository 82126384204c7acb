"""Several relays sharing one PostgreSQL store (issue 8): three real ``castgate relay``
processes (a, b, c) with separate data directories, one real PostgreSQL store and the
real sshd target; agents use the real OpenSSH client.

- a decision made through any relay's API or CLI releases a command held on another,
  announced by LISTEN/NOTIFY; a decision nobody announced is found by the poll; the
  LISTEN connection comes back after the server drops it;
- a session held by b is watched through a (WebSocket, ``castgate watch``, operator
  SSH ``watch``), proxied with the peer secret, which is checked and never logged;
- b killed with SIGKILL: the survivors mark its sessions and approvals interrupted
  (exactly one of them), and b comes back; a clean stop marks a relay stopped.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from typing import Any

import aiohttp
import psycopg

from tests.fix_cluster import PEER_TOKEN, Deployment, api, metric, node_name
from tests.fix_relay import CASTGATE, TOKENS, Held, Relay, wait_for

VISA = "4111111111111111"
HELD = "systemctl restart app 2>/dev/null; echo started"


def _live_on(relay: Relay, node: str, marker: str) -> str:
    """The id of the live session of ``node`` whose title holds ``marker``, as listed
    by ``relay``."""
    found: list[str] = []

    def listed() -> bool:
        rows = api(relay, "/api/v1/sessions?live=true")["sessions"]
        found[:] = [r["id"] for r in rows if r["node"] == node and marker in (r["title"] or "")]
        return bool(found)

    wait_for(listed, 20)
    return found[0]


class Agent:
    """``ssh web@relay 'echo ...; cat'``: a session that lives until its stdin closes."""

    def __init__(self, relay: Relay, marker: str) -> None:
        self.proc = subprocess.Popen(
            ["ssh", *relay.ssh_args(), "web@127.0.0.1", f"echo {marker} card {VISA}; cat"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.out = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(4096):  # type: ignore[attr-defined]
            self.out += chunk

    def close(self) -> None:
        """Kill it if still running, and close its pipes."""
        _close(self.proc, self._reader)

    def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def end(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(30)


class Output:
    """A subprocess whose stdout is collected in the background."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        self.out = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(4096):  # type: ignore[attr-defined]
            self.out += chunk

    def finish(self) -> tuple[int, bytes]:
        code = self.proc.wait(30)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read()
        self.close()
        return code, err

    def close(self) -> None:
        """Kill it if still running, and close its pipes."""
        _close(self.proc, self._reader)


def _close(proc: subprocess.Popen[bytes], reader: threading.Thread) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)
    reader.join(10)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def _raw_get(relay: Relay, path: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(relay.api + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# --- registry ---------------------------------------------------------------------------


def test_every_relay_registers_and_any_lists_all_sessions(deployment: Deployment) -> None:
    store = deployment.store()
    try:
        nodes = {n["id"]: n for n in store.list_nodes()}
    finally:
        store.close()
    for name, relay in deployment.relays.items():
        node = nodes[node_name(name)]
        assert node["api_url"] == relay.api and node["stopped_at"] is None
        assert node["version"] and node["heartbeat_at"] >= node["started_at"]

    res = deployment["b"].ssh("web", "echo ran-on-b")
    assert res.returncode == 0 and b"ran-on-b" in res.stdout
    rows = api(deployment["a"], "/api/v1/sessions")["sessions"]
    on_b = [r for r in rows if "ran-on-b" in (r["title"] or "")]
    assert [(r["node"], r["live_here"]) for r in on_b] == [(node_name("b"), False)]
    listed = subprocess.run(
        [CASTGATE, "sessions", "--json", "-c", str(deployment["c"].config)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "CASTGATE_TOKEN": TOKENS["alice"]},
    )
    assert listed.returncode == 0, listed.stderr
    assert any(
        r["node"] == node_name("b") and "ran-on-b" in (r["title"] or "")
        for r in json.loads(listed.stdout)
    )
    # The plain listing names the relay of each session once there are several.
    assert deployment["a"].ssh("web", "echo ran-on-a").returncode == 0
    plain = subprocess.run(
        [CASTGATE, "sessions", "-c", str(deployment["c"].config)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "CASTGATE_TOKEN": TOKENS["alice"]},
    )
    assert plain.returncode == 0, plain.stderr
    line = next(x for x in plain.stdout.splitlines() if on_b[0]["id"] in x)
    assert f"on {node_name('b')}" in line, line


# --- approvals across relays ------------------------------------------------------------


def test_approval_on_a_releases_the_command_held_on_b(deployment: Deployment) -> None:
    a, b = deployment["a"], deployment["b"]
    before = metric(b, "castgate_approval_notifications_total")
    held = Held(b, HELD)
    aid = held.approval_id()
    row = api(a, f"/api/v1/approvals/{aid}/approve", body={"reason": "go"})
    assert row["status"] == "approved"
    assert held.finish() == 0 and b"started" in held.out
    assert b"granted by alice" in held.err
    # b heard of it through LISTEN/NOTIFY (not only its poll).
    assert metric(b, "castgate_approval_notifications_total") > before


def test_a_decision_nobody_announced_is_found_by_the_poll(deployment: Deployment) -> None:
    held = Held(deployment["b"], HELD)
    aid = held.approval_id()
    store = deployment.store()
    try:
        # Straight into the store: no NOTIFY is sent.
        store.add_decision(aid, approver="alice", decision="approve", reason="poll")
    finally:
        store.close()
    assert held.finish() == 0 and b"started" in held.out


def test_listener_reconnects_and_a_cli_decision_on_c_reaches_b(
    deployment: Deployment, cluster_db: str
) -> None:
    b, c = deployment["b"], deployment["c"]
    drops = metric(b, "castgate_cluster_listen_reconnects_total")
    with psycopg.connect(cluster_db) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'castgate-listen' AND datname = current_database()"
        )
    wait_for(lambda: metric(b, "castgate_cluster_listen_reconnects_total") > drops, 30)
    wait_for(lambda: metric(b, "castgate_cluster_listening") == 1, 30)
    before = metric(b, "castgate_approval_notifications_total")
    held = Held(b, HELD)
    aid = held.approval_id()
    res = subprocess.run(
        [CASTGATE, "approve", str(aid), "-c", str(c.config)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "CASTGATE_TOKEN": TOKENS["bob"]},
    )
    assert res.returncode == 0, res.stderr
    assert held.finish() == 0 and b"started" in held.out
    assert metric(b, "castgate_approval_notifications_total") > before


# --- live watch through another relay ------------------------------------------------------


async def _ws_watch(a: Relay, sid: str, agent: Agent) -> list[dict[str, Any]]:
    url = a.api.replace("http", "ws", 1) + f"/api/v1/sessions/{sid}/live"
    got: list[dict[str, Any]] = []
    headers = {"Authorization": f"Bearer {TOKENS['alice']}"}
    async with aiohttp.ClientSession() as http, http.ws_connect(url, headers=headers) as ws:
        first = await asyncio.wait_for(ws.receive_json(), 30)
        got.append(first)
        agent.send(b"hello-through-a\n")
        while not any("hello-through-a" in str(e.get("data")) for e in got[1:]):
            got.append(await asyncio.wait_for(ws.receive_json(), 30))
    return got


def test_watch_through_a_a_session_held_by_b(deployment: Deployment) -> None:
    a, b = deployment["a"], deployment["b"]
    agent = Agent(b, "watch-me")
    wait_for(lambda: b"watch-me" in agent.out, 20)
    sid = _live_on(a, node_name("b"), "watch-me")
    cli = Output([CASTGATE, "watch", sid, "-c", str(a.config)], {"CASTGATE_TOKEN": TOKENS["alice"]})
    assert a.operator_key is not None
    operator = Output(
        ["ssh", "-tt", *a.ssh_args(a.operator_key), "castgate@127.0.0.1", "watch", sid]
    )
    try:
        events = asyncio.run(_ws_watch(a, sid, agent))
        # The screen is avt's dump, which writes runs of a character compactly (REP).
        assert events[0]["type"] == "screen" and "watch-me card 411111*" in events[0]["data"]
        wait_for(lambda: b"hello-through-a" in cli.out and b"hello-through-a" in operator.out, 30)
        assert agent.end() == 0
        code, err = cli.finish()
        assert code == 0, err
        assert b"hello-through-a" in cli.out and b"session ended" in cli.out
        wait_for(lambda: b"session ended" in operator.out, 30)
        operator.finish()
    finally:
        for each in (agent, cli, operator):
            each.close()
    seen = b"".join([cli.out, operator.out, json.dumps(events).encode()])
    assert VISA.encode() not in seen
    store = deployment.store()
    try:
        watches = store.list_events(kind="recording.watch", session_id=sid)
    finally:
        store.close()
    assert sorted(e["detail"]["via"] for e in watches) == ["api", "api", "ssh"]
    assert {e["detail"]["node"] for e in watches} == {node_name("b")}
    assert {e["actor"] for e in watches} == {"alice"}


def test_peer_route_wants_the_secret_and_it_is_never_logged(deployment: Deployment) -> None:
    b = deployment["b"]
    path = "/internal/v1/sessions/nope/live"
    assert _raw_get(b, path, {})[0] == 401
    assert _raw_get(b, path, {"X-Castgate-Peer-Token": PEER_TOKEN[:-1] + "x"})[0] == 401
    # With the secret, past authentication: the session is simply not live there.
    assert _raw_get(b, path, {"X-Castgate-Peer-Token": PEER_TOKEN})[0] == 404
    # A user token is not a peer secret.
    assert _raw_get(b, path, {"X-Castgate-Peer-Token": TOKENS["alice"]})[0] == 401
    wait_for(lambda: any(e.get("msg") == "auth" and e.get("resource") == "peer" for e in b.logs))
    for relay in deployment.relays.values():
        assert PEER_TOKEN not in json.dumps(relay.logs)
    code, body = _raw_get(
        deployment["a"],
        "/api/v1/sessions/nope/live",
        {"Authorization": f"Bearer {TOKENS['alice']}"},
    )
    assert (code, body["error"]) == (404, "no session nope")


# --- lost and stopped relays ----------------------------------------------------------------


def test_relay_stalled_past_the_timeout_ends_its_sessions_and_rejoins(
    deployment: Deployment,
) -> None:
    b = deployment["b"]
    agent = Agent(b, "frozen")
    wait_for(lambda: b"frozen" in agent.out, 20)
    sid = _live_on(deployment["a"], node_name("b"), "frozen")
    store = deployment.store()
    try:
        b.proc.send_signal(signal.SIGSTOP)  # a stall: the process lives, but says nothing
        try:

            def reaped() -> bool:
                node = store.get_node(node_name("b"))
                return node is not None and node["stopped_at"] is not None

            wait_for(reaped, 60, 0.2)
        finally:
            b.proc.send_signal(signal.SIGCONT)
        session = store.get_session(sid)
        assert session is not None and session["status"] == "interrupted"
        # Back, b learns it was declared lost, ends the session the store says is over
        # (the agent's ssh ends), and registers again.
        wait_for(lambda: any(e.get("msg") == "cluster.declared_lost" for e in b.logs), 30)
        agent.proc.wait(30)

        def rejoined() -> bool:
            node = store.get_node(node_name("b"))
            return node is not None and node["stopped_at"] is None

        wait_for(rejoined, 30, 0.2)
        assert store.list_events(kind="node.rejoin")
        ended = store.get_session(sid)
        assert ended is not None and ended["status"] == "interrupted"
        wait_for(lambda: store.get_manifest(sid) is not None, 30)
    finally:
        store.close()
        agent.close()
    res = b.ssh("web", "echo still-serving")
    assert res.returncode == 0 and b"still-serving" in res.stdout


def test_sigkilled_relay_is_reaped_by_the_others(deployment: Deployment) -> None:
    b = deployment["b"]
    agent = Agent(b, "doomed")
    wait_for(lambda: b"doomed" in agent.out, 20)
    sid = _live_on(deployment["a"], node_name("b"), "doomed")
    held = Held(b, HELD)
    aid = held.approval_id()
    store = deployment.store()
    try:
        earlier = len(store.list_events(kind="node.lost"))
    finally:
        store.close()
    b.proc.send_signal(signal.SIGKILL)
    b.proc.wait(10)
    try:
        store = deployment.store()
        try:

            def reaped() -> bool:
                node = store.get_node(node_name("b"))
                return node is not None and node["stopped_at"] is not None

            wait_for(reaped, 60, 0.2)
            session = store.get_session(sid)
            approval = store.get_approval(aid)
            lost = store.list_events(kind="node.lost")
            nodes = {n["id"]: n for n in store.list_nodes()}
        finally:
            store.close()
        assert session is not None and session["status"] == "interrupted"
        assert approval is not None
        assert (approval["status"], approval["reason"]) == (
            "interrupted",
            f"relay {node_name('b')} lost",
        )
        # a and c both scan; exactly one of them claimed b.
        [event] = lost[earlier:]
        assert event["resource"] == f"node:{node_name('b')}"
        assert event["origin"] in (node_name("a"), node_name("c"))
        assert event["detail"]["sessions"] >= 2 and event["detail"]["approvals"] == 1
        for name in ("a", "c"):
            assert nodes[node_name(name)]["stopped_at"] is None
            assert not any(e.get("msg") == "cluster.declared_lost" for e in deployment[name].logs)
        assert held.finish() != 0
        agent.proc.wait(30)
    finally:
        agent.close()
        if held.proc.poll() is None:
            held.proc.kill()
            held.finish()
        deployment.relaunch("b")
    store = deployment.store()
    try:
        back = store.get_node(node_name("b"))
    finally:
        store.close()
    assert back is not None and back["stopped_at"] is None
    res = deployment["b"].ssh("web", "echo back-again")
    assert res.returncode == 0 and b"back-again" in res.stdout


def test_clean_stop_marks_the_relay_stopped(deployment: Deployment) -> None:
    assert deployment["c"].stop() == 0
    store = deployment.store()
    try:
        node = store.get_node(node_name("c"))
    finally:
        store.close()
    assert node is not None and node["stopped_at"] is not None
    deployment.relaunch("c")
    store = deployment.store()
    try:
        node = store.get_node(node_name("c"))
    finally:
        store.close()
    assert node is not None and node["stopped_at"] is None
