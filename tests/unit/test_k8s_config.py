"""Kubernetes target, listener and kubeconfig: validation with one-line errors, the
generated certificate, the printed kubeconfig."""

from __future__ import annotations

import ipaddress
import os
import subprocess
from pathlib import Path

import orjson
import pytest
from cryptography import x509

from castgate.cli import main
from castgate.kubeconfig import kubeconfig
from recorder.config import ConfigError, parse_config
from relay.k8s import tls

TARGET = """
[[targets]]
name = "prod-k8s"
kind = "kubernetes"
address = "https://10.0.0.7:6443"
ca_file = "keys/prod-k8s-ca.pem"
token_env = "PROD_K8S_TOKEN"
groups = ["agents"]
"""


def test_design_example_parses() -> None:
    cfg = parse_config("[listen]\nkubernetes = '127.0.0.1:6443'\n" + TARGET)
    t = cfg.targets[0]
    assert (t.kind, t.token_env, t.secrets, t.allow_port_forward, t.allow_proxy) == (
        "kubernetes",
        "PROD_K8S_TOKEN",
        "redact",
        False,
        False,
    )
    assert cfg.listen.kubernetes == "127.0.0.1:6443"
    assert parse_config("").listen.kubernetes is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("https://10.0.0.7:6443", "10.0.0.7:6443"), "https URL"),
        (("https://10.0.0.7:6443", "https://10.0.0.7:6443/path"), "https URL"),
        (('token_env = "PROD_K8S_TOKEN"', ""), "exactly one credential"),
        (
            (
                'token_env = "PROD_K8S_TOKEN"',
                'token_env = "A"\nclient_cert = "c"\nclient_key = "k"',
            ),
            "exactly one credential",
        ),
        (('token_env = "PROD_K8S_TOKEN"', 'client_cert = "c"'), "go together"),
        (
            ('kind = "kubernetes"', 'kind = "ssh"'),
            "ca_file is for kind = 'kubernetes' targets only",
        ),
        (('groups = ["agents"]', 'secrets = "show"'), "secrets"),
    ],
)
def test_target_errors(change: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(TARGET.replace(*change), Path("/etc/castgate/castgate.toml"))
    text = str(err.value)
    assert text.startswith("/etc/castgate/castgate.toml: targets[0] (prod-k8s)")
    assert message in text and "\n" not in text


def test_listener_cert_pair() -> None:
    with pytest.raises(ConfigError, match="go together"):
        parse_config("[listen]\nkubernetes_tls_cert = 'c.pem'\n")


def _cfg(tmp_path: Path, listen: str = "127.0.0.1:6443") -> Path:
    path = tmp_path / "castgate.toml"
    path.write_text(f"[listen]\nkubernetes = '{listen}'\n" + TARGET)
    return path


def test_generated_certificate_names_the_listener(tmp_path: Path) -> None:
    cfg = parse_config(_cfg(tmp_path, "10.1.2.3:6443").read_text(), tmp_path / "castgate.toml")
    cert_path, key_path = tls.cert_paths(cfg)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ips = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.1.2.3") in ips.get_values_for_type(x509.IPAddress)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert key_path.stat().st_mode & 0o077 == 0
    # Generated once: the relay and `castgate kubeconfig` agree on it.
    assert tls.cert_paths(cfg)[0].read_bytes() == cert_path.read_bytes()
    tls.server_context(cfg)


def test_kubeconfig_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _cfg(tmp_path)
    assert main(["kubeconfig", "-c", str(path), "--target", "prod-k8s", "-n", "web"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    cluster = doc["clusters"][0]["cluster"]
    assert cluster["server"] == "https://127.0.0.1:6443/k8s/prod-k8s"
    cert = (tmp_path / "data" / "keys" / tls.CERT_NAME).read_bytes()
    import base64

    assert base64.b64decode(cluster["certificate-authority-data"]) == cert
    assert doc["contexts"][0]["context"]["namespace"] == "web"
    user = doc["users"][0]["user"]
    assert "token" not in user and user["exec"]["args"][-1] == "CASTGATE_TOKEN"
    # The exec plugin prints the ExecCredential kubectl reads, from the variable.
    env = {"PATH": os.environ["PATH"], "CASTGATE_TOKEN": "tok.en-1"}
    out = subprocess.run(
        [user["exec"]["command"], *user["exec"]["args"]], env=env, capture_output=True, check=True
    )
    assert orjson.loads(out.stdout)["status"]["token"] == "tok.en-1"
    unset = subprocess.run(
        [user["exec"]["command"], *user["exec"]["args"]],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
    )
    assert unset.returncode == 1 and b"set CASTGATE_TOKEN" in unset.stderr


def test_kubeconfig_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _cfg(tmp_path, "0.0.0.0:6443")
    assert main(["kubeconfig", "-c", str(path), "--target", "prod-k8s"]) == 2
    assert "--server" in capsys.readouterr().err
    cfg = parse_config(path.read_text(), path)
    assert (
        kubeconfig(cfg, "prod-k8s", server="https://relay.example:6443").count(
            "relay.example:6443/k8s/prod-k8s"
        )
        == 1
    )
    with pytest.raises(ConfigError, match="no kubernetes target named 'web'"):
        kubeconfig(cfg, "web", server="https://relay.example:6443")
    with pytest.raises(ConfigError, match="--server"):
        kubeconfig(cfg, "prod-k8s", server="http://relay:1")
    with pytest.raises(ConfigError, match="token-env"):
        kubeconfig(cfg, "prod-k8s", server="https://r:1", token_env="A;rm")
    with pytest.raises(ConfigError, match=r"listen\.kubernetes is not set"):
        kubeconfig(parse_config(TARGET), "prod-k8s")
