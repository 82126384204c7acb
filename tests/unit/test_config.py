"""The configuration file: the shipped example stays valid, errors name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from recorder.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_example_config_is_valid() -> None:
    cfg = load_config(ROOT / "assets" / "castgate.example.toml")
    assert [t.name for t in cfg.targets] == ["web", "gitsrv", "cde-app", "appdb"]
    assert next(t for t in cfg.targets if t.name == "cde-app").default == "block"
    push = next(r for r in cfg.rules if r.name == "push-needs-approval")
    assert push.timeout == 600.0 and push.approvers == ["sre"]
    assert cfg.security.auth_lockout == 300.0
    assert cfg.store_url().startswith("sqlite:////")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[masking]\nstyle = 'bin8'\n", "masking.style"),
        ("[[targets]]\nname = 'x'\nkind = 'ssh'\n", "targets[0] (x).address"),
        ("[[rules]]\nname = 'r'\naction = 'allow'\ncommand = '('\n", "rules[0] (r).command"),
        ("[[rules]]\nname = 'r'\naction = 'approve'\ntimeout = 'soon'\n", "rules[0] (r).timeout"),
        ("[listen]\nssh = '1'\nsshh = '2'\n", "listen.sshh: unknown key"),
        ("data_dir = \n", "not valid TOML"),
        ("[[targets]]\nname='castgate'\nkind='ssh'\naddress='a:1'\n", "reserved"),
    ],
)
def test_errors_name_the_file_and_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, Path("/etc/castgate/castgate.toml"))
    assert str(err.value).startswith("/etc/castgate/castgate.toml: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)
