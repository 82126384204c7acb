"""The fixture API server (tests/fix_kube.py) driven by the real kubectl and the official
Python client: what the Kubernetes relay will be tested through must itself be what
these clients accept."""

from __future__ import annotations

import base64
import fcntl
import os
import pty
import select
import struct
import subprocess
import termios
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from kubernetes import client as kclient
from kubernetes import config as kconfig
from kubernetes import stream as kstream
from kubernetes import watch as kwatch

from castgate.kubeconfig import kubeconfig
from recorder.config import parse_config
from relay.k8s import tls
from tests.fix_kube import KubeFixture, Pki, kubectl_binary, running_kube

PAN = "4111111111111111"

DEPLOY = """
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: nginx:1
        ports: [{containerPort: 80}]
"""


@pytest.fixture(scope="module")
def kubectl() -> tuple[str, tuple[int, int]]:
    return kubectl_binary()


class Kubectl:
    def __init__(self, path: str, fx: KubeFixture, home: Path) -> None:
        self.path, self.fx = path, fx
        self.env = {"PATH": os.environ["PATH"], "HOME": str(home), "KUBECONFIG": str(fx.kubeconfig)}

    def __call__(
        self,
        *args: str,
        check: bool = True,
        stdin: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [self.path, *args],
            env={**self.env, **(env or {})},
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)}: rc={res.returncode}\n{res.stdout}\n{res.stderr}"
            )
        return res

    def popen(self, *args: str, stdin: int | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [self.path, *args],
            env=self.env,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


@pytest.fixture
def k(kubectl: tuple[str, tuple[int, int]], kube_api: KubeFixture, tmp_path: Path) -> Kubectl:
    home = tmp_path / "home"
    home.mkdir()
    return Kubectl(kubectl[0], kube_api, home)


@pytest.fixture
def api(kube_api: KubeFixture) -> Iterator[kclient.ApiClient]:
    cfg = kclient.Configuration()
    kconfig.load_kube_config(config_file=str(kube_api.kubeconfig), client_configuration=cfg)
    with kclient.ApiClient(cfg) as c:
        yield c
        # ApiClient.close() leaves urllib3's kept-alive connections open.
        c.rest_client.pool_manager.clear()


def _pod(name: str, script: str, *, stdin: bool = False) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "containers": [
                {"name": "main", "image": "local", "command": ["sh", "-c", script], "stdin": stdin}
            ]
        },
    }


def _apply(k: Kubectl, obj: dict[str, object]) -> None:
    k("apply", "-f", "-", stdin=orjson.dumps(obj).decode())


def _readline_with(proc: subprocess.Popen[str], want: str) -> list[str]:
    assert proc.stdout is not None
    seen: list[str] = []
    while True:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"stream ended before {want!r}: {seen}")
        seen.append(line)
        if want in line:
            return seen


def test_discovery_get_and_version(k: Kubectl, kube_api: KubeFixture) -> None:
    out = k("version", "-o", "json").stdout
    assert orjson.loads(out)["serverVersion"]["minor"] == "33"
    assert "No resources found in default namespace." in k("get", "pods").stderr
    # kubectl asked for aggregated discovery and got it (no per-group-version fetches).
    paths = [p for _m, p, _h in kube_api.server.requests]
    accepts = [h["Accept"] for _m, p, h in kube_api.server.requests if p.startswith("/apis?")]
    assert accepts and "as=APIGroupDiscoveryList" in accepts[0]
    assert not any(p.startswith("/apis/apps/v1?") for p in paths)
    api_resources = k("api-resources", "--no-headers").stdout
    assert "deployments" in api_resources and "deploy" in api_resources


def test_legacy_discovery_fallback(
    kubectl: tuple[str, tuple[int, int]], tmp_path: Path, kube_pki: Pki
) -> None:
    with running_kube(tmp_path, kube_pki, aggregated_discovery=False) as fx:
        home = tmp_path / "home"
        home.mkdir()
        kk = Kubectl(kubectl[0], fx, home)
        _apply(
            kk,
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "c"},
                "data": {"a": "1"},
            },
        )
        assert "c " in kk("get", "configmaps").stdout
        paths = [p for _m, p, _h in fx.server.requests]
        assert any(p.startswith("/api/v1?") for p in paths)  # fetched per group-version


def test_wrong_token_is_401(k: Kubectl, kube_api: KubeFixture) -> None:
    bad = kube_api.kubeconfig.read_text().replace(kube_api.token, "wrong")
    path = kube_api.kubeconfig.with_name("bad")
    path.write_text(bad)
    res = k("get", "pods", check=False, env={"KUBECONFIG": str(path)})
    assert res.returncode == 1 and "You must be logged in to the server" in res.stderr


def test_apply_get_describe_delete(k: Kubectl) -> None:
    assert "deployment.apps/web created" in k("apply", "-f", "-", stdin=DEPLOY).stdout
    changed = DEPLOY.replace("replicas: 2", "replicas: 3").replace("nginx:1", "nginx:2")
    assert "deployment.apps/web configured" in k("apply", "-f", "-", stdin=changed).stdout
    jp = "{.spec.replicas} {.spec.template.spec.containers[0].image} {.spec.template.spec.containers[0].ports[0].containerPort}"
    # The strategic merge patch kept the container's other fields (merged by name).
    assert k("get", "deploy", "web", "-o", f"jsonpath={jp}").stdout == "3 nginx:2 80"
    table = k("get", "deployments").stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
    assert table[1].split()[:4] == ["web", "3/3", "3", "3"]
    described = k("describe", "deployment", "web").stdout
    assert "Replicas:" in described and "nginx:2" in described
    assert "serverside-applied" in k("apply", "--server-side", "-f", "-", stdin=DEPLOY).stdout
    assert k("get", "deploy", "web", "-o", f"jsonpath={jp}").stdout == "2 nginx:1 80"
    assert 'deployment.apps "web" deleted' in k("delete", "deployment", "web").stdout
    missing = k("get", "deployment", "web", check=False)
    assert missing.returncode == 1 and 'deployments.apps "web" not found' in missing.stderr


def test_secrets_and_describe(k: Kubectl) -> None:
    # kubectl's imperative `create` sends protobuf bodies, which the fixture (like a
    # server without protobuf) refuses with a 415 Status; kubectl does not retry in JSON.
    made = k("create", "secret", "generic", "db", f"--from-literal=card={PAN}", check=False)
    assert made.returncode == 1 and "unknown format" in made.stderr
    manifest = k(
        "create",
        "secret",
        "generic",
        "db",
        f"--from-literal=card={PAN}",
        "--from-literal=password=hunter2",
        "--dry-run=client",
        "-o",
        "json",
    ).stdout
    k("apply", "-f", "-", stdin=manifest)
    data = orjson.loads(k("get", "secret", "db", "-o", "json").stdout)["data"]
    assert base64.b64decode(data["card"]).decode() == PAN
    assert "card:" in k("describe", "secret", "db").stdout
    assert k("get", "secrets", "--no-headers").stdout.split()[:3] == ["db", "Opaque", "2"]


def test_logs_follow_streams_from_the_process(
    k: Kubectl, kube_api: KubeFixture, tmp_path: Path
) -> None:
    _apply(k, _pod("api", f"echo first {PAN}; while [ ! -e go ]; do sleep 0.05; done; echo second"))
    with k.popen("logs", "-f", "api") as proc:
        assert _readline_with(proc, "first")[-1] == f"first {PAN}\n"
        # Only now does the process go on: the second line can only come by streaming.
        (tmp_path / "pod-default-api" / "go").touch()
        assert _readline_with(proc, "second")[-1] == "second\n"
        assert proc.wait(timeout=60) == 0
    assert k("logs", "api").stdout == f"first {PAN}\nsecond\n"


def test_watch(k: Kubectl, api: kclient.ApiClient) -> None:
    with k.popen("get", "configmaps", "--watch", "--no-headers") as proc:
        core = kclient.CoreV1Api(api)
        # Created until kubectl's watch sees one: its list may run before or after.
        n = 0
        assert proc.stdout is not None
        core.create_namespaced_config_map(
            "default", {"metadata": {"name": f"w{n}"}, "data": {"a": "b"}}
        )
        line = proc.stdout.readline()
        assert line.split()[0] == "w0"
        core.create_namespaced_config_map("default", {"metadata": {"name": "w1"}})
        assert proc.stdout.readline().split()[0] == "w1"
        proc.kill()


def test_exec_channels_and_exit_code(
    k: Kubectl, kubectl: tuple[str, tuple[int, int]], kube_api: KubeFixture
) -> None:
    if kubectl[1] < (1, 30):
        pytest.skip("kubectl < 1.30 uses SPDY for exec")
    _apply(k, _pod("box", "sleep 600"))
    res = k("exec", "box", "--", "sh", "-c", f"echo out {PAN}; echo err >&2; exit 3", check=False)
    assert (res.returncode, res.stdout, res.stderr) == (
        3,
        f"out {PAN}\n",
        "err\ncommand terminated with exit code 3\n",
    )
    assert k("exec", "-i", "box", "--", "cat", stdin="via stdin\n").stdout == "via stdin\n"
    upgrades = [h for _m, p, h in kube_api.server.requests if "/exec?" in p]
    assert upgrades and all(h["Upgrade"].lower() == "websocket" for h in upgrades)
    assert all(h["Sec-WebSocket-Protocol"].startswith("v5.channel.k8s.io") for h in upgrades)


def test_spdy_is_refused_with_a_clear_error(
    k: Kubectl, kubectl: tuple[str, tuple[int, int]]
) -> None:
    _apply(k, _pod("box", "sleep 600"))
    # kubectl falls back to SPDY only when told to (or when the WebSocket upgrade fails).
    res = k(
        "exec", "box", "--", "true", check=False, env={"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": "false"}
    )
    assert res.returncode == 1 and "SPDY is not supported by this server" in res.stderr


def test_port_forward_is_refused(k: Kubectl) -> None:
    _apply(k, _pod("box", "sleep 600"))
    res = k("port-forward", "box", "18080:80", check=False)
    assert res.returncode == 1 and "error upgrading connection" in res.stderr


def _pty_run(
    argv: list[str], env: dict[str, str], script: list[tuple[str, bytes]], size: tuple[int, int]
) -> bytes:
    """Run ``argv`` on a PTY of ``size`` (rows, cols); for each (wait_for, send) step,
    read until ``wait_for`` has appeared, then type ``send``; return all output."""
    pid, fd = pty.fork()
    if pid == 0:  # child
        os.execve(argv[0], argv, env)  # noqa: S606 - kubectl itself, no shell wanted
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
    out = b""
    try:
        for wait_for, send in script:
            while wait_for.encode() not in out:
                select.select([fd], [], [])
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"EOF before {wait_for!r}: {out!r}")
                out += chunk
            if send:
                os.write(fd, send)
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, out
    return out


def test_exec_it_in_a_pty(k: Kubectl, kubectl: tuple[str, tuple[int, int]]) -> None:
    if kubectl[1] < (1, 30):
        pytest.skip("kubectl < 1.30 uses SPDY for exec")
    _apply(k, _pod("box", "sleep 600"))
    out = _pty_run(
        [k.path, "exec", "-it", "box", "--", "sh"],
        k.env,
        [("$ ", b"stty size; tty; echo card " + PAN.encode() + b"\r"), ("card " + PAN, b"exit\r")],
        size=(30, 100),
    )
    # The PTY's size reached the shell through the resize channel; it has a terminal.
    assert b"30 100" in out and b"/dev/pts/" in out


def test_attach(k: Kubectl) -> None:
    _apply(k, _pod("echoer", 'while read l; do echo "got $l"; done', stdin=True))
    with k.popen("attach", "-i", "echoer", stdin=subprocess.PIPE) as proc:
        assert proc.stdin is not None
        proc.stdin.write("hello\n")
        proc.stdin.flush()
        assert _readline_with(proc, "got hello")[-1] == "got hello\n"
        proc.kill()


def test_python_client(api: kclient.ApiClient, kube_api: KubeFixture) -> None:
    core, apps = kclient.CoreV1Api(api), kclient.AppsV1Api(api)
    core.create_namespaced_secret("default", {"metadata": {"name": "s"}, "stringData": {"k": "v"}})
    assert core.read_namespaced_secret("s", "default").metadata.name == "s"
    assert [s.metadata.name for s in core.list_namespaced_secret("default").items] == ["s"]
    apps.create_namespaced_deployment(
        "default",
        orjson.loads(
            orjson.dumps(
                {
                    "metadata": {"name": "d"},
                    "spec": {
                        "replicas": 1,
                        "selector": {"matchLabels": {"a": "b"}},
                        "template": {
                            "metadata": {"labels": {"a": "b"}},
                            "spec": {"containers": [{"name": "c", "image": "i"}]},
                        },
                    },
                }
            )
        ),
    )
    apps.patch_namespaced_deployment("d", "default", {"spec": {"replicas": 4}})
    assert apps.read_namespaced_deployment("d", "default").spec.replicas == 4
    w = kwatch.Watch()
    events = []
    for event in w.stream(core.list_namespaced_secret, "default", timeout_seconds=30):
        events.append((event["type"], event["object"].metadata.name))
        if len(events) == 1:
            core.delete_namespaced_secret("s", "default")
        if len(events) == 2:
            w.stop()
    assert events == [("ADDED", "s"), ("DELETED", "s")]
    try:
        core.read_namespaced_secret("s", "default")
    except kclient.ApiException as exc:
        assert exc.status == 404 and orjson.loads(exc.body)["reason"] == "NotFound"
    else:
        raise AssertionError("deleted secret still readable")
    # exec through the client's own WebSocket code (it offers v5, then v4).
    core.create_namespaced_pod("default", _pod("box", "sleep 600"))
    out = kstream.stream(
        core.connect_get_namespaced_pod_exec,
        "box",
        "default",
        command=["sh", "-c", "echo out; echo err >&2"],
        stderr=True,
        stdin=False,
        stdout=True,
        tty=False,
        _preload_content=False,
    )
    try:
        out.run_forever(timeout=60)
        assert out.read_stdout() == "out\n" and out.read_stderr() == "err\n"
        assert out.returncode == 0
    finally:
        out.close()
        # websocket-client's close() leaves the socket open when the server closed first.
        out.sock.shutdown()
    protos = [h["Sec-WebSocket-Protocol"] for _m, p, h in kube_api.server.requests if "/exec?" in p]
    assert protos and protos[-1].replace(" ", "") == "v5.channel.k8s.io,v4.channel.k8s.io"


def test_exec_v4_channel_protocol(kube_api: KubeFixture, kube_pki: Pki, tmp_path: Path) -> None:
    """A client that offers only v4 (kubectl before 1.30's WebSocket code, older client
    libraries) gets v4: no close channel, the exit status on channel 3."""
    import websocket

    from relay.k8s import channel as ch

    kube_api.server.call(kube_api.server.start_pod("box", ["sleep", "600"]))
    ca = tmp_path / "ca.pem"
    ca.write_bytes(kube_pki.ca_pem)
    url = kube_api.url.replace("https://", "wss://") + (
        "/api/v1/namespaces/default/pods/box/exec?command=sh&command=-c&command=echo+v4%3B+exit+2&stdout=true&stderr=true"
    )
    ws = websocket.create_connection(
        url,
        subprotocols=[ch.V4],
        sslopt={"ca_certs": str(ca)},
        header=[f"Authorization: Bearer {kube_api.token}"],
    )
    frames: list[ch.Frame] = []
    try:
        proto = ws.getsubprotocol()
        while True:
            opcode, data = ws.recv_data()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                break
            frames.append(ch.decode(data, ch.V4))
    finally:
        ws.shutdown()
    assert proto == ch.V4
    assert b"".join(f.data for f in frames if f.channel is ch.Channel.STDOUT) == b"v4\n"
    status = [f for f in frames if f.channel is ch.Channel.ERROR]
    assert len(status) == 1 and ch.parse_status(status[0].data).exit_code == 2


def test_castgate_kubeconfig_reaches_a_server_with_the_relay_certificate(
    kubectl: tuple[str, tuple[int, int]], tmp_path: Path, kube_pki: Pki
) -> None:
    """The kubeconfig `castgate kubeconfig` prints works with real kubectl: the server URL
    with its /k8s/NAME prefix, the listener certificate as CA data, the token from the
    environment through the exec plugin. (The fixture stands where the relay will.)"""
    path = tmp_path / "castgate.toml"
    path.write_text(
        "[listen]\nkubernetes = '127.0.0.1:6443'\n"
        "[[targets]]\nname = 'prod-k8s'\nkind = 'kubernetes'\naddress = 'https://10.0.0.7:6443'\n"
        "token_env = 'X'\ngroups = ['agents']\n"
    )
    cfg = parse_config(path.read_text(), path)
    with running_kube(
        tmp_path, kube_pki, prefix="/k8s/prod-k8s", ssl_context=tls.server_context(cfg)
    ) as fx:
        server = fx.url.removesuffix("/k8s/prod-k8s")
        kc = tmp_path / "relay.kubeconfig"
        kc.write_text(kubeconfig(cfg, "prod-k8s", server=server))
        env = {
            "PATH": os.environ["PATH"],
            "HOME": str(tmp_path),
            "KUBECONFIG": str(kc),
            "CASTGATE_TOKEN": fx.token,
        }
        res = subprocess.run(
            [kubectl[0], "get", "pods"], env=env, capture_output=True, text=True, timeout=120
        )
        assert res.returncode == 0, res.stderr
        assert all(p.startswith("/k8s/prod-k8s/") for _m, p, _h in fx.server.requests)
        env["CASTGATE_TOKEN"] = "wrong"
        res = subprocess.run(
            [kubectl[0], "get", "pods"], env=env, capture_output=True, text=True, timeout=120
        )
        assert res.returncode == 1 and "You must be logged in to the server" in res.stderr
