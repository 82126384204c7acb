"""SSH rules match the parsed command (issue 15, class 6): with the real OpenSSH client
through the relay to the real sshd target, every way of writing a blocked command is
refused and the victim file stays; an approval rule and an opaque command are held;
ordinary commands run byte for byte."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fix_relay import TOKENS, Held, Relay, start_relay, wait_for
from tests.fix_sshd import SshTarget

VARIANTS = [
    "true; rm -rf {v}",
    "sh -c 'rm -rf {v}'",
    "$(rm -rf {v})",
    "echo `rm -rf {v}`",
    "env rm -rf {v}",
    "rm -fr {v}",
    "rm -r -f {v}",
    "/bin/rm -rf {v}",
    "r\\m -rf {v}",
    "'rm' -rf {v}",
    "nice -n 1 timeout 5 rm -rf {v}",
    "bash -c \"sh -c 'rm -rf {v}'\"",
    "echo | xargs rm -rf {v}",
    "find / -maxdepth 0 -exec rm -rf {v} \\;",
    "cd / && (rm -rf {v})",
    "rm {v} -rf",
]


def _casts_with(relay: Relay, text: str) -> list[Path]:
    return [p for p in relay.recordings().glob("*.cast") if text in p.read_text()]


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "file").write_text("keep me\n")
    return victim


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_spelling_of_a_blocked_command_is_refused(
    relay: Relay, tmp_path: Path, variant: str
) -> None:
    victim = _victim(tmp_path)
    command = variant.format(v=victim)
    res = relay.ssh("web", command)
    assert res.returncode == 126, (command, res)
    assert b"blocked by rule no-rm-rf" in res.stderr
    assert (victim / "file").read_text() == "keep me\n"
    # The cast holds the command and the block.
    wait_for(
        lambda: any("blocked: no-rm-rf" in c.read_text() for c in _casts_with(relay, str(victim)))
    )


def test_positive_controls_run_byte_for_byte(relay: Relay, tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "f").write_text("x")
    # rm without both -r and -f is not what the rule names.
    res = relay.ssh("web", f"rm -r {scratch} && echo removed")
    assert (res.returncode, res.stdout) == (0, b"removed\n"), res
    assert not scratch.exists()
    res = relay.ssh("web", "printf 'a\\001\\377b\\n'; sh -c 'echo inner'; exit 3")
    assert res.returncode == 3, res
    assert res.stdout == b"a\x01\xffb\ninner\n"
    res = relay.ssh("web", "bash -c 'exit 7'")
    assert res.returncode == 7
    res = relay.ssh("web", "echo rm -rf /victim | tr a-z A-Z")
    assert (res.returncode, res.stdout) == (0, b"RM -RF /VICTIM\n")
    res = relay.ssh("web", "for i in 1 2; do echo $((i * 2)); done; ls / >/dev/null; echo $?")
    assert (res.returncode, res.stdout) == (0, b"2\n4\n0\n")


def test_approval_rule_found_inside_a_list_creates_a_request(relay: Relay) -> None:
    held = Held(relay, "true && sh -c 'systemctl restart app'; echo restarted")
    aid = str(held.approval_id())
    assert b"rule restart-needs-approval" in held.err
    decided = relay.castgate("deny", aid, "--reason", "no", "--token", TOKENS["bob"])
    assert decided.returncode == 0, decided
    assert held.finish() == 126
    assert b"restarted" not in held.out


def test_a_word_known_only_at_run_time_is_held(relay: Relay, tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    held = Held(relay, f"o=-rf; rm $o {victim}")
    aid = str(held.approval_id())
    assert b"rule castgate:opaque" in held.err
    relay.castgate("deny", aid, "--reason", "no", "--token", TOKENS["alice"])
    assert held.finish() == 126
    assert (victim / "file").exists()


def test_an_opaque_command_is_held_for_approval(relay: Relay) -> None:
    held = Held(relay, "eval 'echo opaque-ran'")
    aid = str(held.approval_id())
    assert b"rule castgate:opaque" in held.err
    relay.castgate("deny", aid, "--reason", "no", "--token", TOKENS["alice"])
    assert held.finish() == 126
    assert b"opaque-ran" not in held.out
    # Approved, it runs as written.
    held = Held(relay, "eval 'echo opaque-ran'")
    decided = relay.castgate("approve", str(held.approval_id()), "--token", TOKENS["alice"])
    assert decided.returncode == 0, decided
    assert held.finish() == 0
    assert held.out == b"opaque-ran\n"


def test_text_piped_into_a_shell_is_held(relay: Relay, tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    held = Held(relay, f"echo cm0gLXJmIHt2fQ== | base64 -d | sed 's#{{v}}#{victim}#' | sh")
    aid = str(held.approval_id())
    relay.castgate("deny", aid, "--reason", "no", "--token", TOKENS["alice"])
    assert held.finish() == 126
    assert (victim / "file").exists()


PCI = """
[[targets]]
name = "pci"
kind = "ssh"
address = "{host}:{port}"
user = "{user}"
key_file = "{key}"
host_key = "{host_key}"
groups = ["agents"]
default = "block"
[[rules]]
name = "pci-ls"
targets = ["pci"]
argv = ["ls"]
action = "allow"
[[rules]]
name = "pci-echo"
targets = ["pci"]
command = '^echo [a-z0-9 -]*$'
action = "allow"
"""


@pytest.fixture(scope="module")
def pci_relay(sshd_target: SshTarget, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    t = sshd_target
    extra = PCI.format(
        host=t.host, port=t.port, user=t.user, key=t.client_key, host_key=t.host_key_line
    )
    r = start_relay(tmp_path_factory.mktemp("pci-relay"), t, extra=extra)
    try:
        yield r
    finally:
        r.stop()


def test_allowlist_mode_runs_only_what_an_allow_rule_names(
    pci_relay: Relay, tmp_path: Path
) -> None:
    victim = _victim(tmp_path)
    res = pci_relay.ssh("pci", f"ls {victim}")
    assert (res.returncode, res.stdout) == (0, b"file\n")
    res = pci_relay.ssh("pci", "echo allowed words; ls -d /")
    assert (res.returncode, res.stdout) == (0, b"allowed words\n/\n")
    for command in (
        f"cat {victim}/file",
        f"ls {victim}; cat {victim}/file",
        f"ls $(cat {victim}/file)",
        f"echo $(rm -r {victim})",
        f"sudo ls {victim}",
    ):
        res = pci_relay.ssh("pci", command)
        assert res.returncode == 126, (command, res)
        assert b"blocked by rule castgate:default" in res.stderr
        assert b"keep me" not in res.stdout
    assert (victim / "file").exists()
