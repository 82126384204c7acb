"""The SSH relay with real clients (OpenSSH ssh, paramiko, asyncssh, git) in front of a
real OpenSSH sshd."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import asyncssh
import paramiko
import pytest

from recorder.integrity import Verdict, verify_cast
from recorder.masking import luhn_complete
from recorder.signing import PUBLIC_NAME, load_public
from tests.fix_relay import TOKENS, Held, Relay, wait_for

VISA = luhn_complete("411111111111111")


def casts_with(relay: Relay, text: str) -> list[Path]:
    return [p for p in relay.recordings().glob("*.cast") if text in p.read_text()]


def verify(relay: Relay, cast: Path) -> Verdict:
    pub = load_public(relay.workdir / "data" / "keys" / PUBLIC_NAME)
    return verify_cast(cast, pub).verdict


@pytest.mark.parametrize("code", [0, 1, 42])
def test_exec_exit_status_comes_back_exactly(relay: Relay, code: int) -> None:
    res = relay.ssh("web", f"echo hello-{code}; exit {code}")
    assert res.returncode == code, res.stderr
    assert res.stdout == f"hello-{code}\n".encode()


def test_exit_signal_comes_back(relay: Relay) -> None:
    async def main() -> asyncssh.SSHCompletedProcess:
        async with asyncssh.connect(
            "127.0.0.1",
            relay.port,
            username="web",
            client_keys=[str(relay.agent_key)],
            known_hosts=relay.known_hosts_obj(),
            config=[],
        ) as conn:
            return await conn.run("kill -KILL $$", check=False)

    result = asyncio.run(main())
    assert result.exit_signal is not None and result.exit_signal[0] == "KILL"


def test_card_numbers_masked_for_agent_and_cast(relay: Relay) -> None:
    spaced = " ".join(VISA[i : i + 4] for i in range(0, 16, 4))
    res = relay.ssh("web", f"echo 'card {VISA}'; echo 'again {spaced}' >&2; echo done-pan")
    assert res.returncode == 0
    masked = f"{VISA[:6]}******{VISA[-4:]}"
    assert res.stdout == f"card {masked}\ndone-pan\n".encode()
    assert res.stderr == f"again {VISA[:4]} {VISA[4:6]}** **** {VISA[-4:]}\n".encode()
    wait_for(
        lambda: (
            casts_with(relay, "done-pan")
            and all(Path(str(c) + ".manifest.json").exists() for c in casts_with(relay, "done-pan"))
        )
    )
    (cast,) = casts_with(relay, "done-pan")
    text = cast.read_text()
    assert VISA not in text and VISA[6:12] not in text.replace(" ", "")
    assert masked in text
    assert verify(relay, cast) is Verdict.INTACT
    # The seek index is built when the session closes.
    wait_for(lambda: cast.with_name(cast.name + ".idx").exists())


def test_token_auth_with_paramiko(relay: Relay) -> None:
    client = paramiko.SSHClient()
    client.get_host_keys().add(
        f"[127.0.0.1]:{relay.port}",
        relay.host_key_line.split()[0],
        paramiko.PKey.from_type_string(
            relay.host_key_line.split()[0],
            __import__("base64").b64decode(relay.host_key_line.split()[1]),
        ),
    )
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        "127.0.0.1",
        relay.port,
        username="web",
        password=TOKENS["ci-agent"],
        look_for_keys=False,
        allow_agent=False,
    )
    try:
        _, stdout, _ = client.exec_command("echo via-paramiko; exit 7")
        assert stdout.read() == b"via-paramiko\n"
        assert stdout.channel.recv_exit_status() == 7
    finally:
        client.close()


def _asyncssh_connect(relay: Relay, **kw: object) -> asyncssh.SSHClientConnection:
    return asyncssh.connect(  # type: ignore[return-value]
        "127.0.0.1",
        relay.port,
        known_hosts=relay.known_hosts_obj(),
        config=[],
        agent_path=None,
        **kw,
    )


def test_wrong_token_and_unknown_key_are_refused_and_logged(relay: Relay, tmp_path: Path) -> None:
    async def attempt(**kw: object) -> None:
        async with _asyncssh_connect(relay, username="web", **kw):
            pass

    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(attempt(password="not-a-token", client_keys=None))
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(attempt(client_keys=[stranger], password=None))
    wait_for(
        lambda: any(
            e.get("msg") == "auth" and e.get("outcome") == "failure" and "unknown token" in str(e)
            for e in relay.logs
        )
    )
    # Audit events are written asynchronously: wait for the second one too.
    wait_for(lambda: any("unknown key" in str(e) for e in relay.logs if e.get("msg") == "auth"))
    # The relay keeps serving.
    assert relay.ssh("web", "echo still-up").stdout == b"still-up\n"


def test_identity_outside_target_groups_is_refused(relay: Relay) -> None:
    async def attempt() -> None:
        async with _asyncssh_connect(relay, username="gitsrv", password=TOKENS["alice"]) as conn:
            await conn.run("echo should-not-run")

    with pytest.raises(asyncssh.ChannelOpenError, match="not in any group of target gitsrv"):
        asyncio.run(attempt())
    # OpenSSH shows a refused channel at its default log level.
    args = [a for a in relay.ssh_args() if a != "LogLevel=ERROR"]
    args[args.index("-o", len(args) - 2) :] = []
    res = subprocess.run(
        ["ssh", *args, "nosuchtarget@127.0.0.1", "true"],
        capture_output=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 255 and b"no SSH target named" in res.stderr


def test_changed_target_host_key_is_refused(relay: Relay) -> None:
    res = relay.ssh("moved", "echo should-not-run")
    assert res.returncode == 255
    assert b"does not match the pinned host_key" in res.stderr
    assert b"should-not-run" not in res.stdout


def test_blocked_command_never_reaches_target(relay: Relay, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    res = relay.ssh("web", f"rm -rf {victim}")
    assert res.returncode == 126
    assert b"blocked by rule no-rm-rf" in res.stderr
    assert victim.exists()
    wait_for(lambda: bool(casts_with(relay, "blocked: no-rm-rf")))


def test_port_forwarding_is_refused(relay: Relay) -> None:
    async def attempt() -> None:
        async with _asyncssh_connect(
            relay, username="web", client_keys=[str(relay.agent_key)]
        ) as conn:
            await conn.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", relay.target.port)

    with pytest.raises(asyncssh.ChannelOpenError, match="port forwarding is not allowed"):
        asyncio.run(attempt())
    assert relay.ssh("web", "echo after-forward").stdout == b"after-forward\n"


def test_approval_releases_held_command(relay: Relay) -> None:
    held = Held(relay, "systemctl restart app 2>/dev/null; echo restarted")
    decided = relay.castgate("approve", str(held.approval_id()), "--token", TOKENS["alice"])
    held.finish()
    assert decided.returncode == 0, decided
    assert b"restarted" in held.out
    assert b"granted by alice" in held.err


def test_denial_returns_reason(relay: Relay) -> None:
    held = Held(relay, "systemctl restart app; echo restarted")
    aid = str(held.approval_id())
    decided = relay.castgate("deny", aid, "--reason", "not during peak", "--token", TOKENS["bob"])
    assert decided.returncode == 0, decided
    assert held.finish() == 126
    assert b"restarted" not in held.out
    assert b"denied by bob: not during peak" in held.err


def test_approver_role_is_required(relay: Relay) -> None:
    held = Held(relay, "systemctl restart self")
    aid = str(held.approval_id())
    res = relay.castgate("approve", aid, "--token", TOKENS["ci-agent"])
    assert res.returncode == 2 and "lacks the role" in res.stderr
    res = relay.castgate("deny", aid, "--reason", "cleanup", "--token", TOKENS["alice"])
    assert res.returncode == 0
    assert held.finish() == 126


def test_openssh_multiplexed_sessions_get_their_exit_status(relay: Relay, tmp_path: Path) -> None:
    control = str(tmp_path / "cm")
    mux = ["-o", f"ControlPath={control}", "-o", "ControlMaster=auto", "-o", "ControlPersist=5"]
    codes = []
    for i in range(3):
        res = subprocess.run(
            ["ssh", *relay.ssh_args(), *mux, "web@127.0.0.1", f"echo mux{i}; exit {i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # the backgrounded master keeps a pipe open
            stdin=subprocess.DEVNULL,
            timeout=30,
        )
        codes.append((res.returncode, res.stdout))
    subprocess.run(
        ["ssh", "-o", f"ControlPath={control}", "-O", "exit", "web@127.0.0.1"],
        capture_output=True,
        timeout=15,
    )
    assert codes == [(0, b"mux0\n"), (1, b"mux1\n"), (2, b"mux2\n")]
