"""Malformed SSH from a hostile client against a real relay (in front of the real sshd):
unknown channel types and global requests, giant and invalid exec commands, absurd
terminal sizes, environment floods, unknown signals, requests after EOF and close, too
many channels, data before the session starts. Each gets a refusal or a clear error,
and after each the relay still serves a normal session."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import paramiko
import pytest
from paramiko.common import cMSG_CHANNEL_DATA, cMSG_CHANNEL_EOF, cMSG_CHANNEL_REQUEST
from paramiko.message import Message

from recorder.integrity import Verdict, manifest_path, verify_cast
from replay.castfile import MAX_SIZE, CastFile
from tests.fix_relay import TOKENS, Relay, wait_for

MAX_SESSIONS = 10  # relay/ssh_relay.py MAX_SESSIONS_PER_CONNECTION


def connect(relay: Relay) -> paramiko.SSHClient:
    """A paramiko client logged in to the relay as ci-agent, for target ``web``."""
    client = paramiko.SSHClient()
    kind, blob = relay.host_key_line.split()[:2]
    client.get_host_keys().add(
        f"[127.0.0.1]:{relay.port}",
        kind,
        paramiko.PKey.from_type_string(kind, base64.b64decode(blob)),
    )
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        "127.0.0.1",
        relay.port,
        username="web",
        password=TOKENS["ci-agent"],
        look_for_keys=False,
        allow_agent=False,
        timeout=15,
    )
    return client


@pytest.fixture
def client(relay: Relay) -> Iterator[paramiko.SSHClient]:
    c = connect(relay)
    try:
        yield c
    finally:
        c.close()


def request(chan: paramiko.Channel, name: str, *fields: bytes | int, reply: bool = False) -> None:
    """A channel request built by hand: strings as bytes, uint32s as ints, so values no
    well-behaved client sends (negative sizes, invalid UTF-8) go on the wire."""
    m = Message()
    m.add_byte(cMSG_CHANNEL_REQUEST)
    m.add_int(chan.remote_chanid)
    m.add_string(name)
    m.add_boolean(reply)
    for f in fields:
        if isinstance(f, int):
            m.add_int(f)
        else:
            m.add_string(f)
    chan.transport._send_user_message(m)  # type: ignore[union-attr]


def run(chan: paramiko.Channel, timeout: float = 30) -> tuple[bytes, bytes, int]:
    """Read a channel to its end: (stdout, stderr, exit status)."""
    chan.settimeout(timeout)
    out, err = bytearray(), bytearray()
    deadline = time.monotonic() + timeout
    while not (chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready()):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"channel did not finish: {bytes(out[-200:])!r} {bytes(err[-200:])!r}"
            )
        if chan.recv_ready():
            out += chan.recv(65536)
        elif chan.recv_stderr_ready():
            err += chan.recv_stderr(65536)
        elif chan.closed and not chan.exit_status_ready():
            break
        else:
            time.sleep(0.01)
    return bytes(out), bytes(err), chan.recv_exit_status() if chan.exit_status_ready() else -1


def still_serves(relay: Relay) -> None:
    """The relay process is alive, logged no internal error, and runs a normal session."""
    assert relay.proc.poll() is None, "the relay died"
    done = relay.ssh("web", "echo still-serving")
    assert (done.returncode, done.stdout) == (0, b"still-serving\n"), done.stderr
    bad = [e for e in relay.logs if e.get("msg") in ("session.error", "pg.session_error")]
    assert not bad, bad


def test_unknown_channel_type_is_refused(relay: Relay, client: paramiko.SSHClient) -> None:
    t = client.get_transport()
    assert t is not None
    with pytest.raises(paramiko.ChannelException) as exc:
        t.open_channel("x-hostile@castgate.test")
    assert exc.value.code in (1, 3)  # administratively prohibited / unknown channel type
    # The connection itself still works.
    _, out, _ = client.exec_command("echo same-connection")
    assert out.read() == b"same-connection\n"
    still_serves(relay)


def test_unknown_global_requests_fail_without_harm(
    relay: Relay, client: paramiko.SSHClient
) -> None:
    t = client.get_transport()
    assert t is not None
    for name in ("x-hostile@castgate.test", "no-more-sessions@openssh.com", "x" * 5000):
        assert t.global_request(name, wait=True) is None  # a failure reply, not a crash
    assert t.global_request("tcpip-forward", data=("127.0.0.1", 0), wait=True) is None
    _, out, _ = client.exec_command("echo after-global")
    assert out.read() == b"after-global\n"
    # A request name that is not ASCII breaks the protocol: the connection is closed
    # with a protocol error.
    other = connect(relay)
    t2 = other.get_transport()
    assert t2 is not None
    with contextlib.suppress(paramiko.SSHException, EOFError):
        t2.global_request("\xff" * 300, wait=True)
    wait_for(lambda: not t2.is_active(), 10)
    other.close()
    still_serves(relay)


def test_a_1_mib_exec_command_ends_the_connection(relay: Relay, client: paramiko.SSHClient) -> None:
    t = client.get_transport()
    assert t is not None
    # A 100 kB command is relayed like any other ...
    _, out, _ = client.exec_command("echo " + "a" * 100_000 + " | wc -c")
    assert out.read() == b"100001\n"
    # ... a packet of more than 1 MiB breaks asyncssh's packet size limit: the relay
    # ends the connection with a protocol error instead of buffering it.
    chan = t.open_session()
    with contextlib.suppress(paramiko.SSHException, EOFError, OSError):
        request(chan, "exec", b"true " + b"a" * (1 << 20))
    wait_for(lambda: not t.is_active(), 20)
    still_serves(relay)


@pytest.mark.parametrize(
    "command",
    [b"echo \xff\xfe-bad-utf8", b"\xc3", b"echo nul\x00byte; echo hidden"],
    ids=["invalid-utf8", "truncated-utf8", "nul"],
)
def test_exec_commands_with_invalid_bytes_are_refused(
    relay: Relay, client: paramiko.SSHClient, command: bytes
) -> None:
    chan = client.get_transport().open_session()  # type: ignore[union-attr]
    with pytest.raises(paramiko.SSHException):
        chan.exec_command(command)  # the request fails: nothing runs
    # The connection, and its upstream connection to the target, still work.
    _, out, _ = client.exec_command("echo same-connection")
    assert out.read() == b"same-connection\n"
    still_serves(relay)


def test_a_nul_in_the_terminal_type_or_an_environment_value(
    relay: Relay, client: paramiko.SSHClient
) -> None:
    t = client.get_transport()
    assert t is not None
    chan = t.open_session()
    with pytest.raises(paramiko.SSHException):
        chan.get_pty(term="xterm\x00evil")
    chan = t.open_session()
    chan.set_environment_variable("LANG", "C\x00evil")
    chan.exec_command("echo lang=$LANG")
    out, _, status = run(chan)
    assert (out, status) == (b"lang=\n", 0)  # dropped, not passed to the target
    chan = t.open_session()
    chan.set_environment_variable("LANG", "C")
    chan.exec_command("echo lang=$LANG")
    assert run(chan)[0] == b"lang=C\n"  # without the NUL it is passed
    _, out2, _ = client.exec_command("echo same-connection")
    assert out2.read() == b"same-connection\n"
    still_serves(relay)


def _sizes_of(relay: Relay, marker: str) -> tuple[Path, list[tuple[int, int]]]:
    cast = next(
        p
        for p in sorted(relay.recordings().glob("*.cast"))
        if marker in p.read_text(errors="replace")
    )
    wait_for(lambda: manifest_path(cast).exists(), 20)
    c = CastFile(cast)
    sizes = [(c.header.width, c.header.height)]
    for _, ev in c.events():
        if ev.code == "r":
            cols, rows = ev.data.split("x")
            sizes.append((int(cols), int(rows)))
    return cast, sizes


def test_absurd_terminal_sizes_are_clamped(relay: Relay, client: paramiko.SSHClient) -> None:
    chan = client.get_transport().open_session()  # type: ignore[union-attr]
    # "negative" sizes: uint32 on the wire, -1 as a signed int
    request(
        chan, "pty-req", b"xterm", 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, b"", reply=True
    )
    chan.invoke_shell()
    for cols, rows in [(0, 0), (65535, 65535), (0xFFFFFFFF, 1), (1, 0xFFFFFFFF), (120, 40)]:
        request(chan, "window-change", cols, rows, 0, 0)
    chan.send(b"echo absurd-$((6*7))\r")
    buf = b""
    deadline = time.monotonic() + 20
    while b"absurd-42" not in buf and time.monotonic() < deadline:
        if chan.recv_ready():
            buf += chan.recv(65536)
        else:
            time.sleep(0.02)
    assert b"absurd-42" in buf
    # A watcher joining now gets a screen of a sane size from the live view.
    screen = asyncio.run(_first_live_event(relay))
    assert screen["type"] == "screen"
    chan.send(b"exit\r")
    run(chan)
    cast, sizes = _sizes_of(relay, "absurd-$((6*7))")
    assert all(1 <= c <= MAX_SIZE and 1 <= r <= MAX_SIZE for c, r in sizes), sizes
    assert (120, 40) in sizes
    assert verify_cast(cast).verdict is Verdict.INTACT
    # The relay builds the seek index of the closed session (a terminal model of the
    # recorded size) without running out of memory.
    wait_for(lambda: cast.with_name(cast.name + ".idx").exists(), 30)
    still_serves(relay)


async def _first_live_event(relay: Relay) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {TOKENS['alice']}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{relay.api}/api/v1/sessions?live=true", headers=headers) as r:
            rows = (await r.json())["sessions"]
        sid = next(s["id"] for s in rows if s["target"] == "web" and s["protocol"] == "ssh")
        url = relay.api.replace("http", "ws", 1) + f"/api/v1/sessions/{sid}/live"
        async with http.ws_connect(url, headers=headers) as ws:
            msg = await asyncio.wait_for(ws.receive(), 20)
            return dict(json.loads(msg.data))


def test_an_environment_flood_passes_only_allowed_variables(
    relay: Relay, client: paramiko.SSHClient
) -> None:
    chan = client.get_transport().open_session()  # type: ignore[union-attr]
    # Within limits.ssh_max_env_vars (128): a larger flood is refused whole
    # (test_size_limits.py).
    for i in range(100):
        chan.set_environment_variable(f"HOSTILE_{i}", "x" * 100)
    chan.set_environment_variable("LD_PRELOAD", "/tmp/evil.so")
    chan.set_environment_variable("LC_HOSTILE", "y" * 4000)
    chan.set_environment_variable("LANG", "C.UTF-8")
    chan.exec_command("env")
    out, _, status = run(chan)
    assert status == 0
    assert b"HOSTILE_" not in out and b"LD_PRELOAD" not in out
    assert b"LANG=C.UTF-8\n" in out and b"LC_HOSTILE=" + b"y" * 4000 in out
    still_serves(relay)


def test_unknown_signal_names_and_breaks(relay: Relay, client: paramiko.SSHClient) -> None:
    chan = client.get_transport().open_session()  # type: ignore[union-attr]
    chan.exec_command("sleep 1; echo survived")
    time.sleep(0.3)
    for name in (b"NOSUCHSIG", b"", b"\xff\xfe", b"KILL" * 1000):
        request(chan, "signal", name)
    request(chan, "break", 0xFFFFFFFF, reply=True)
    out, _, status = run(chan)
    assert out == b"survived\n" and status == 0
    still_serves(relay)


def test_requests_after_eof_and_after_close(relay: Relay) -> None:
    client = connect(relay)
    t = client.get_transport()
    assert t is not None
    chan = t.open_session()
    chan.exec_command("cat")
    chan.send(b"before-eof\n")
    chan.shutdown_write()  # EOF
    request(chan, "window-change", 100, 30, 0, 0)
    request(chan, "env", b"LANG", b"C")
    # (without asking for a reply: paramiko closes a channel whose request failed)
    request(chan, "exec", b"echo second-exec")
    out, _, status = run(chan)
    assert (out, status) == (b"before-eof\n", 0)  # the second exec was not run
    remote = chan.remote_chanid
    chan.close()
    time.sleep(0.2)
    # Requests for a channel that is gone: asyncssh ends the connection with a protocol
    # error ("Invalid channel number"), which is the clear answer to a broken peer.
    for body in (b"pty-req", b"shell", b"exec"):
        m = Message()
        m.add_byte(cMSG_CHANNEL_REQUEST)
        m.add_int(remote)
        m.add_string(body)
        m.add_boolean(False)
        m.add_string(b"xterm")
        with contextlib.suppress(paramiko.SSHException, EOFError, OSError):
            t._send_user_message(m)
    wait_for(lambda: not t.is_active(), 10)
    client.close()
    still_serves(relay)


def test_a_second_eof_or_data_after_eof_ends_the_connection(relay: Relay) -> None:
    for extra in (cMSG_CHANNEL_EOF, cMSG_CHANNEL_DATA):
        client = connect(relay)
        t = client.get_transport()
        assert t is not None
        chan = t.open_session()
        chan.exec_command("sleep 5")
        chan.shutdown_write()
        m = Message()
        m.add_byte(extra)
        m.add_int(chan.remote_chanid)
        if extra == cMSG_CHANNEL_DATA:
            m.add_string(b"data after EOF")
        t._send_user_message(m)
        wait_for(lambda t=t: not t.is_active(), 10)  # "Channel not open for sending"
        client.close()
    still_serves(relay)


def test_channels_per_connection_are_limited(
    relay: Relay, client: paramiko.SSHClient, caplog: pytest.LogCaptureFixture
) -> None:
    t = client.get_transport()
    assert t is not None
    opened = []
    for _ in range(MAX_SESSIONS):
        chan = t.open_session()
        chan.exec_command("sleep 30")
        opened.append(chan)
    with pytest.raises(paramiko.ChannelException) as exc:
        t.open_session()
    assert exc.value.code == 4  # resource shortage
    # paramiko logs the relay's reason rather than putting it in the exception.
    assert f"castgate: at most {MAX_SESSIONS} sessions per connection" in caplog.text
    # Closing one makes room for another.
    opened.pop().close()
    wait_for(lambda: _can_open(t), 15)
    for chan in opened:
        chan.close()
    still_serves(relay)


def _can_open(t: paramiko.Transport) -> bool:
    try:
        chan = t.open_session()
    except paramiko.ChannelException:
        return False
    chan.close()
    return True


def flood(chan: paramiko.Channel, wait: float) -> tuple[list[int], threading.Thread]:
    """Send up to 64 MiB on ``chan`` from a thread for ``wait`` seconds; returns the
    running count of bytes the channel took, and the thread."""
    sent = [0]

    def pump() -> None:
        chan.settimeout(10)
        with contextlib.suppress(OSError, paramiko.SSHException):
            while sent[0] < 64 << 20:
                sent[0] += chan.send(b"x" * 65536)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    thread.join(wait)
    return sent, thread


def test_data_before_the_session_starts(relay: Relay, client: paramiko.SSHClient) -> None:
    t = client.get_transport()
    assert t is not None
    chan = t.open_session()
    chan.send(b"early-bytes\n")  # before any exec/shell request
    chan.exec_command("cat")
    chan.send(b"late-bytes\n")
    chan.shutdown_write()
    out, _, status = run(chan)
    assert (out, status) == (b"early-bytes\nlate-bytes\n", 0)  # in order, none lost
    # While a command waits for approval, what the agent sends is held by SSH flow
    # control (the relay stops reading), not buffered without bound in the relay.
    held = t.open_session()
    held.exec_command("systemctl restart nothing; cat > /dev/null")
    sent, pump = flood(held, wait=3)
    assert sent[0] < 8 << 20, sent[0]  # one window (2 MiB) and change, not 64 MiB
    held.close()
    pump.join(15)
    still_serves(relay)


def test_keystrokes_behind_a_held_shell_line_are_flow_controlled(
    relay: Relay, client: paramiko.SSHClient
) -> None:
    """In a PTY shell, a line waiting for approval holds the keystrokes typed after it;
    past a megabyte of them the relay stops reading the channel, so a flood is held by
    SSH flow control, not buffered in the relay."""
    t = client.get_transport()
    assert t is not None
    chan = t.open_session()
    chan.get_pty("xterm", 80, 24)
    chan.invoke_shell()
    chan.settimeout(30)
    seen = b""
    while b"# " not in seen and b"$ " not in seen:  # the prompt: the shell reads now
        seen += chan.recv(65536)
    chan.send(b"systemctl restart nothing\r")  # held: restart-needs-approval
    while b"approval #" not in seen:
        seen += chan.recv(65536)
    sent, pump = flood(chan, wait=5)
    # The 1 MiB high mark plus one SSH window (2 MiB) and what the socket buffers hold.
    assert sent[0] < 12 << 20, sent[0]
    chan.close()
    pump.join(15)
    still_serves(relay)
