"""Interactive shells, Git over SSH, OIDC tokens and shutdown through the SSH relay."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import asyncssh
import pytest

from recorder.integrity import Verdict, manifest_path, verify_cast
from recorder.masking import luhn_complete
from recorder.signing import PUBLIC_NAME, load_public
from tests.fix_relay import TOKENS, Relay, mint_jwt, start_relay, wait_for
from tests.fix_sshd import SshTarget

VISA = luhn_complete("411111111111111")


def sealed_casts(relay: Relay, text: str) -> list[Path]:
    return [
        p
        for p in relay.recordings().glob("*.cast")
        if text in p.read_text() and manifest_path(p).exists()
    ]


def events(cast: Path) -> list[list[object]]:
    return [json.loads(line) for line in cast.read_text().splitlines()[1:]]


class Shell:
    """An interactive PTY shell through the relay, driven like a person at a keyboard."""

    def __init__(self, relay: Relay, **auth: object) -> None:
        self.relay = relay
        self.auth = auth or {"client_keys": [str(relay.agent_key)]}
        self.out = ""

    async def __aenter__(self) -> Shell:
        self.conn = await asyncssh.connect(
            "127.0.0.1",
            self.relay.port,
            username="web",
            known_hosts=self.relay.known_hosts_obj(),
            config=[],
            agent_path=None,
            **self.auth,  # type: ignore[arg-type]
        )
        self.proc = await self.conn.create_process(
            term_type="xterm", term_size=(80, 24), env={"LANG": "C.UTF-8"}
        )
        self._reader = asyncio.ensure_future(self._read())
        # Type at the first prompt, not into the login banner: keys typed ahead of it
        # make the relay read the banner as the echoed line (an unparsable, opaque one).
        deadline = time.monotonic() + 10
        while not self.out.rstrip(" ").endswith(("#", "$")) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await self.send("export PS1='c''g> ' HISTFILE=/dev/null\r")
        await self.expect("cg> ")
        return self

    async def _read(self) -> None:
        while True:
            data = await self.proc.stdout.read(4096)
            if not data:
                return
            self.out += data

    async def send(self, keys: str) -> None:
        self.proc.stdin.write(keys)
        await asyncio.sleep(0.05)

    async def expect(self, text: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.out:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in {self.out[-500:]!r}")
            await asyncio.sleep(0.02)

    async def __aexit__(self, *exc: object) -> None:
        self.proc.stdin.write("exit\r")
        with pytest.raises(Exception):  # noqa: B017 - either way the shell ends
            await asyncio.wait_for(self.proc.wait(), 5)
            raise RuntimeError("closed")
        self._reader.cancel()
        self.conn.close()


def test_shell_runs_masks_and_records(relay: Relay) -> None:
    async def main() -> None:
        async with Shell(relay) as sh:
            await sh.send(f"echo shell-card {VISA}\r")
            await sh.expect("shell-card 411111******1111")
            await sh.send("stty size\r")
            await sh.expect("24 80")
            sh.proc.change_terminal_size(100, 30)
            await asyncio.sleep(0.2)
            await sh.send("stty size\r")
            await sh.expect("30 100")

    asyncio.run(main())
    wait_for(lambda: bool(sealed_casts(relay, "shell-card")))
    (cast,) = sealed_casts(relay, "shell-card")
    text = cast.read_text()
    assert VISA not in text
    evs = events(cast)
    assert ["r", "100x30"] in [e[1:] for e in evs]
    assert any(e[1] == "i" and "stty size" in str(e[2]) for e in evs)
    inputs = [str(e[2]) for e in evs if e[1] == "i"]
    assert f"echo shell-card {VISA[:6]}******{VISA[-4:]}\n" in inputs


def test_shell_line_policy_sees_through_editing_and_history(relay: Relay, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()

    async def main() -> None:
        async with Shell(relay) as sh:
            # Typed with a mistake fixed by backspace: the echoed line is what counts.
            await sh.send(f"xx\x7f\x7frm -rf {victim}\r")
            await sh.expect("blocked by rule no-rm-rf")
            assert victim.exists()
            # Allowed, then recalled from history and edited into the blocked command.
            await sh.send(f"echo rm -rf {victim}; echo done-1\r")
            await sh.expect("\r\ndone-1\r\n")
            await sh.send("\x1b[A")
            await asyncio.sleep(0.2)
            await sh.send("\x01")
            await sh.send("\x1b[3~" * 5)
            await asyncio.sleep(0.2)
            before = sh.out.count("blocked by rule no-rm-rf")
            await sh.send("\r")
            deadline = time.monotonic() + 5
            while sh.out.count("blocked by rule no-rm-rf") == before:
                assert time.monotonic() < deadline, sh.out[-400:]
                await asyncio.sleep(0.05)
            assert victim.exists()
            await sh.send("echo still-usable\r")
            await sh.expect("\rstill-usable\r\n")

    asyncio.run(main())
    assert victim.exists()


def test_git_clone_and_push_need_approval(
    relay: Relay, git_bare_repo: Path, tmp_path: Path
) -> None:
    ssh_cmd = " ".join(["ssh", *relay.ssh_args()])
    env = {
        **os.environ,
        "GIT_SSH_COMMAND": ssh_cmd,
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "agent",
        "GIT_AUTHOR_EMAIL": "agent@example.com",
        "GIT_COMMITTER_NAME": "agent",
        "GIT_COMMITTER_EMAIL": "agent@example.com",
    }
    url = f"ssh://gitsrv@127.0.0.1:{relay.port}{git_bare_repo}"
    work = tmp_path / "work"
    res = subprocess.run(
        ["git", "clone", "-q", url, str(work)], env=env, capture_output=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert (work / "README").exists() or any(work.iterdir())
    blob = os.urandom(300_000)  # binary content with plenty of digit bytes in the pack
    (work / "blob.bin").write_bytes(blob)
    subprocess.run(["git", "-C", str(work), "add", "."], env=env, check=True)
    subprocess.run(["git", "-C", str(work), "commit", "-qm", "agent change"], env=env, check=True)
    push = subprocess.Popen(
        ["git", "-C", str(work), "push", "-q", "origin", "HEAD"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert push.stderr is not None
    err = push.stderr
    seen: list[bytes] = []
    t = threading.Thread(target=lambda: seen.extend(iter(lambda: err.read1(4096), b"")))
    t.start()
    wait_for(lambda: b"required" in b"".join(seen), 30)
    m = re.search(rb"approval #(\d+) required \(rule push-needs-approval\)", b"".join(seen))
    assert m is not None, b"".join(seen)
    res2 = relay.castgate("approve", m.group(1).decode(), "--token", TOKENS["alice"])
    assert res2.returncode == 0, res2.stderr
    assert push.wait(60) == 0, b"".join(seen)
    t.join(10)
    assert push.stdout is not None
    push.stdout.close()
    err.close()
    # The pushed blob arrived byte for byte.
    check = subprocess.run(
        ["git", "--git-dir", str(git_bare_repo), "show", "HEAD:blob.bin"],
        capture_output=True,
        env=env,
        timeout=30,
    )
    assert check.stdout == blob
    wait_for(lambda: bool(sealed_casts(relay, "git-receive-pack")))
    (cast,) = sealed_casts(relay, "git-receive-pack")
    evs = events(cast)
    output = [str(e[2]) for e in evs if e[1] == "o"]
    assert all(x.startswith("castgate: approval #") for x in output), "pack data recorded"
    markers = [str(e[2]) for e in evs if e[1] == "m"]
    assert any("binary stream, not recorded" in x for x in markers)
    assert any("granted by alice" in x for x in markers)
    assert any(x.startswith("end: exit 0") and "bytes from agent" in x for x in markers)


def _jwt_attempt(relay: Relay, token: str) -> bytes:
    async def main() -> bytes:
        async with asyncssh.connect(
            "127.0.0.1",
            relay.port,
            username="web",
            password=token,
            known_hosts=relay.known_hosts_obj(),
            config=[],
            agent_path=None,
            client_keys=None,
        ) as conn:
            res = await conn.run("echo oidc-ok", check=False)
            return bytes(str(res.stdout), "utf-8")

    return asyncio.run(main())


def test_oidc_jwt_accepted_and_bad_ones_refused(relay: Relay) -> None:
    assert _jwt_attempt(relay, mint_jwt(relay)) == b"oidc-ok\n"
    bad = {
        "expired": mint_jwt(relay, exp=int(time.time()) - 600),
        "wrong audience": mint_jwt(relay, aud="someone-else"),
        "wrong issuer": mint_jwt(relay, iss="https://evil.test"),
    }
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    payload = mint_jwt(relay).split(".")[1]
    bad["alg none"] = f"{header}.{payload}."
    for token in bad.values():
        with pytest.raises(asyncssh.PermissionDenied):
            _jwt_attempt(relay, token)

    def reasons() -> str:
        return " ".join(str(e.get("reason")) for e in relay.logs if e.get("msg") == "auth")

    # Audit events are written asynchronously.
    wait_for(
        lambda: all(r in reasons() for r in ("token expired", "wrong audience", "wrong issuer"))
    )


def test_sigterm_ends_sessions_and_seals_casts(sshd_target: SshTarget, tmp_path: Path) -> None:
    relay = start_relay(tmp_path / "r", sshd_target)
    try:
        client = subprocess.Popen(
            ["ssh", *relay.ssh_args(), "web@127.0.0.1", "echo long-running; sleep 60"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert client.stdout is not None
        assert client.stdout.readline() == b"long-running\n"
        assert relay.stop() == 0
        client.wait(20)
        client.stdout.close()
    finally:
        relay.stop()
    (cast,) = list(relay.recordings().glob("*.cast"))
    pub = load_public(relay.workdir / "data" / "keys" / PUBLIC_NAME)
    assert verify_cast(cast, pub).verdict is Verdict.INTACT
    manifest = json.loads(manifest_path(cast).read_text())
    assert manifest["end_reason"] == "relay shutdown"


def test_input_typed_without_echo_is_never_kept(relay: Relay) -> None:
    secret = "hunter2-not-for-the-cast"

    async def main() -> None:
        async with Shell(relay) as sh:
            await sh.send("read -s -p 'Password: ' pw; echo got-${#pw}-chars\r")
            await sh.expect("Password: ")
            await asyncio.sleep(0.2)
            await sh.send(secret + "\r")
            await sh.expect(f"got-{len(secret)}-chars")
            await sh.send("echo after-secret\r")
            await sh.expect("\rafter-secret\r\n")

    asyncio.run(main())
    wait_for(lambda: bool(sealed_casts(relay, "after-secret")))
    (cast,) = sealed_casts(relay, "after-secret")
    text = cast.read_text()
    assert secret not in text
    assert "input hidden (terminal echo off)" in text
    from recorder.config import load_config
    from recorder.store import Store

    store = Store.open(load_config(relay.config).store_url())
    try:
        session = json.loads(cast.read_text().splitlines()[0])["castgate"]["session"]
        texts = [c["text"] for c in store.list_commands(session)]
    finally:
        store.close()
    assert all(secret not in t for t in texts)
    assert "(input hidden: terminal echo off)" in texts
