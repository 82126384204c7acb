"""Recordings in S3-compatible storage: real relays upload to a real moto server, and
play, export, evidence, verify and the API read casts back from it when the local files
are gone (issue 8)."""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import pty
import struct
import subprocess
import termios
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from recorder.config import S3Config, load_config
from recorder.objectstore import (
    ObjectStore,
    ObjectStoreError,
    cast_files,
    digest_file,
    write_marker,
)
from recorder.signing import PUBLIC_NAME
from recorder.store import Store
from relay.uploader import Uploader
from tests.fix_cluster import start_deployment
from tests.fix_relay import CASTGATE, TOKENS, Relay, Streamer, launch, start_relay, wait_for
from tests.fix_s3 import CREDENTIALS, S3Server
from tests.fix_sshd import SshTarget

SIDECARS = (".cast", ".cast.chain", ".cast.idx", ".cast.manifest.json")


@pytest.fixture
def creds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The S3 credentials in this process's environment (castgate client commands
    inherit them)."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)


def api(relay: Relay, path: str) -> tuple[int, bytes]:
    req = urllib.request.Request(
        relay.api + path, headers={"Authorization": f"Bearer {TOKENS['alice']}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def run_session(relay: Relay, text: str) -> str:
    """One SSH exec session through the relay; returns its session id."""
    done = relay.ssh("web", f"echo {text}")
    assert done.returncode == 0, done.stderr
    status, body = api(relay, "/api/v1/sessions?limit=1")
    assert status == 200
    return str(json.loads(body)["sessions"][0]["id"])


def upload_events(relay: Relay, outcome: str) -> list[dict[str, object]]:
    return [
        e for e in relay.logs if e.get("msg") == "recording.upload" and e.get("outcome") == outcome
    ]


def s3_relay(workdir: Path, sshd: SshTarget, s3: S3Server, bucket: str, **s3_keys: object) -> Relay:
    return start_relay(workdir, sshd, extra=s3.section(bucket, **s3_keys), env=CREDENTIALS)


def b64sha(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def test_relay_uploads_every_file_with_checksums_and_retention(
    sshd_target: SshTarget, s3_server: S3Server, tmp_path: Path
) -> None:
    bucket = s3_server.bucket(lock=True)
    relay = s3_relay(
        tmp_path / "relay",
        sshd_target,
        s3_server,
        bucket,
        object_lock_mode="COMPLIANCE",
        retention_days=365,
    )
    try:
        sid = run_session(relay, "hello-s3")
        marker = relay.recordings() / f"{sid}.cast.uploaded"
        wait_for(marker.exists, 30)
        client = s3_server.client()
        note = json.loads(marker.read_text())
        assert sorted(note["files"]) == sorted(f"{sid}{s}" for s in SIDECARS)
        for suffix in SIDECARS:
            local = (relay.recordings() / f"{sid}{suffix}").read_bytes()
            head = client.head_object(
                Bucket=bucket, Key=f"rec/{sid}{suffix}", ChecksumMode="ENABLED"
            )
            body = client.get_object(Bucket=bucket, Key=f"rec/{sid}{suffix}")["Body"].read()
            assert body == local
            assert head["ChecksumSHA256"] == b64sha(local)
            assert head["Metadata"]["sha256"] == hashlib.sha256(local).hexdigest()
            assert note["files"][f"{sid}{suffix}"]["sha256"] == hashlib.sha256(local).hexdigest()
            # PCI DSS 10.5.1: a year of retention, locked from the upload.
            assert head["ObjectLockMode"] == "COMPLIANCE"
            until = head["ObjectLockRetainUntilDate"]
            assert timedelta(days=364) < until - datetime.now(UTC) <= timedelta(days=365)
        # keep_local defaults to true: the local copies stay.
        assert all((relay.recordings() / f"{sid}{s}").exists() for s in SIDECARS)
        # A locked object cannot be deleted before its retention ends.
        version = client.head_object(Bucket=bucket, Key=f"rec/{sid}.cast")["VersionId"]
        with pytest.raises(client.exceptions.ClientError):
            client.delete_object(Bucket=bucket, Key=f"rec/{sid}.cast", VersionId=version)
        ok = upload_events(relay, "success")
        assert (
            ok and ok[0]["session"] == sid and ok[0]["resource"] == f"s3://{bucket}/rec/{sid}.cast"
        )
        status, metrics = api(relay, "/metrics")
        assert status == 200
        assert b'castgate_uploads_total{outcome="success"} 1' in metrics
        assert b'castgate_events_total{kind="recording.upload",outcome="success"} 1' in metrics
        status, record = api(relay, f"/api/v1/sessions/{sid}")
        kinds = {(e["kind"], e["outcome"]) for e in json.loads(record)["events"]}
        assert ("recording.upload", "success") in kinds
    finally:
        relay.stop()


def test_local_files_stay_until_the_upload_is_confirmed_then_reads_come_from_s3(
    sshd_target: SshTarget, s3_server: S3Server, tmp_path: Path, creds: None
) -> None:
    bucket = s3_server.bucket_name()  # not created yet: every upload fails
    relay = s3_relay(
        tmp_path / "relay",
        sshd_target,
        s3_server,
        bucket,
        keep_local=False,
        retry_initial="200ms",
        retry_max="1s",
    )
    try:
        sid = run_session(relay, "kept-until-confirmed")
        wait_for(lambda: len(upload_events(relay, "failure")) >= 2, 30)
        failure = upload_events(relay, "failure")[0]
        assert "NoSuchBucket" in str(failure["error"]) and failure["session"] == sid
        files = [relay.recordings() / f"{sid}{s}" for s in SIDECARS]
        assert all(f.exists() for f in files)
        assert not (relay.recordings() / f"{sid}.cast.uploaded").exists()
        local = {f.name: f.read_bytes() for f in files}

        s3_server.bucket(name=bucket)  # the store comes back: the next retry succeeds
        wait_for(lambda: not any(f.exists() for f in files), 30)
        assert (relay.recordings() / f"{sid}.cast.uploaded").exists()
        # The event's log line reaches us through the relay's stderr, after the files go.
        wait_for(lambda: bool(upload_events(relay, "success")), 10)
        assert upload_events(relay, "success")[0]["local_deleted"] is True
        client = s3_server.client()
        for name, data in local.items():
            assert client.get_object(Bucket=bucket, Key=f"rec/{name}")["Body"].read() == data

        # The API serves the cast from the bucket.
        status, body = api(relay, f"/api/v1/sessions/{sid}/cast")
        assert status == 200 and body == local[f"{sid}.cast"]

        # export, verify, evidence and play by session id, with no local file.
        export = relay.castgate("export", sid, "--format", "txt")
        assert export.returncode == 0, export.stderr
        assert "kept-until-confirmed" in export.stdout
        verify = relay.castgate("verify", sid)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert "INTACT" in verify.stdout
        bundle = tmp_path / "bundle"
        evidence = relay.castgate("evidence", "--session", sid, "-o", str(bundle))
        assert evidence.returncode == 0, evidence.stderr
        copied = bundle / "sessions" / sid / f"{sid}.cast"
        assert copied.read_bytes() == local[f"{sid}.cast"]
        record = json.loads((bundle / "sessions" / sid / "audit-record.json").read_text())
        assert record["fields"]["recording"]["value"]["verdict"] == "intact"
        checked = subprocess.run(
            [CASTGATE, "verify", str(bundle)], capture_output=True, text=True, timeout=60
        )
        assert checked.returncode == 0, checked.stdout
        play_in_pty(relay, sid, "kept-until-confirmed")
    finally:
        relay.stop()


def play_in_pty(relay: Relay, sid: str, text: str) -> None:
    """``castgate play SESSION`` on a terminal (a pty) until the cast ends; the frames it
    drew must show ``text``."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen(
        [CASTGATE, "play", sid, "-c", str(relay.config), "--speed", "50"],
        stdin=slave,
        stdout=slave,
        stderr=subprocess.PIPE,
    )
    os.close(slave)
    drawn = bytearray()
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the player closed the terminal
                break
            if not chunk:
                break
            drawn += chunk
        assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else b""
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    assert text.encode() in drawn


def test_casts_left_by_a_stopped_relay_are_uploaded_at_restart(
    sshd_target: SshTarget, s3_server: S3Server, tmp_path: Path
) -> None:
    bucket = s3_server.bucket_name()
    relay = s3_relay(
        tmp_path / "relay", sshd_target, s3_server, bucket, retry_initial="200ms", retry_max="1s"
    )
    try:
        sid = run_session(relay, "left-behind")
        wait_for(lambda: upload_events(relay, "failure"), 30)
        assert relay.stop() == 0
        assert not (relay.recordings() / f"{sid}.cast.uploaded").exists()
        s3_server.bucket(name=bucket)
        launch(relay, CREDENTIALS)
        wait_for((relay.recordings() / f"{sid}.cast.uploaded").exists, 30)
        assert any(e.get("msg") == "upload.queued_at_start" for e in relay.logs)
        head = s3_server.client().head_object(
            Bucket=bucket, Key=f"rec/{sid}.cast", ChecksumMode="ENABLED"
        )
        assert head["ChecksumSHA256"] == b64sha((relay.recordings() / f"{sid}.cast").read_bytes())
    finally:
        relay.stop()


def test_a_cast_recorded_on_relay_b_replays_via_relay_a_after_b_stopped(
    sshd_target: SshTarget, s3_server: S3Server, tmp_path: Path, pg_url: str, creds: None
) -> None:
    bucket = s3_server.bucket()
    section = s3_server.section(bucket, keep_local=False)
    # The relays inherit the S3 credentials from this process's environment (creds).
    deployment = start_deployment(tmp_path, sshd_target, pg_url, ("a", "b"), extra=section)
    relay_a, relay_b = deployment["a"], deployment["b"]
    try:
        sid = run_session(relay_b, "recorded-on-b")
        wait_for((relay_b.recordings() / f"{sid}.cast.uploaded").exists, 30)
        assert relay_b.stop() == 0
        assert not (relay_b.recordings() / f"{sid}.cast").exists()
        status, body = api(relay_a, f"/api/v1/sessions/{sid}/cast")
        assert status == 200 and b"recorded-on-b" in body
        export = relay_a.castgate("export", sid, "--format", "txt")
        assert export.returncode == 0, export.stderr
        assert "recorded-on-b" in export.stdout
        # Each relay signs with its own key: A's config alone does not vouch for B's...
        verify = relay_a.castgate("verify", sid)
        assert verify.returncode == 1 and "INTACT" not in verify.stdout, verify.stdout
        # ...until B's public key is among A's cluster.trusted_keys (or pinned).
        b_key = relay_b.workdir / "data" / "keys" / PUBLIC_NAME
        verify = relay_a.castgate("verify", sid, "--key", str(b_key))
        assert verify.returncode == 0 and "INTACT" in verify.stdout, verify.stdout
        text = relay_a.config.read_text()
        relay_a.config.write_text(
            text.replace(
                "[cluster]\n", f"[cluster]\ntrusted_keys = [{json.dumps(str(b_key))}]\n", 1
            )
        )
        verify = relay_a.castgate("verify", sid)
        assert verify.returncode == 0 and "INTACT" in verify.stdout, verify.stdout
        play_in_pty(relay_a, sid, "recorded-on-b")
    finally:
        deployment.stop()


# -- the object store module against the same server ------------------------------------


def store_for(s3: S3Server, bucket: str, **kw: Any) -> ObjectStore:
    cfg = S3Config.model_validate(
        {
            "bucket": bucket,
            "prefix": "unit/",
            "endpoint_url": s3.endpoint,
            "region": "us-east-1",
            "access_key_id_env": "CASTGATE_TEST_S3_KEY",
            "secret_access_key_env": "CASTGATE_TEST_S3_SECRET",
        }
    )
    return ObjectStore(cfg, **kw)


def sealed_cast(folder: Path, sid: str = "s1", size: int = 2000) -> Path:
    """Stand-in files of a sealed cast (contents do not matter to the object store)."""
    cast = folder / f"{sid}.cast"
    cast.write_bytes(b'{"version": 2}\n' + b"x" * size)
    (folder / f"{sid}.cast.chain").write_bytes(b"c" * 16)
    (folder / f"{sid}.cast.manifest.json").write_text(f'{{"session_id": "{sid}"}}\n')
    return cast


def test_upload_order_puts_the_manifest_last(
    s3_server: S3Server, tmp_path: Path, creds: None
) -> None:
    store = store_for(s3_server, s3_server.bucket())
    keys: list[str] = []
    store._client.meta.events.register(
        "provide-client-params.s3.PutObject", lambda params, **_: keys.append(params["Key"])
    )
    cast = sealed_cast(tmp_path)
    (tmp_path / "s1.cast.idx").write_bytes(b"i" * 10)
    files = store.upload_cast(cast)
    assert keys == [
        "unit/s1.cast",
        "unit/s1.cast.chain",
        "unit/s1.cast.idx",
        "unit/s1.cast.manifest.json",
    ]
    assert set(files) == {"s1.cast", "s1.cast.chain", "s1.cast.idx", "s1.cast.manifest.json"}
    # Unchanged files are not sent again (a HEAD confirms them).
    keys.clear()
    store.upload_cast(cast)
    assert keys == []


def test_multipart_upload_is_confirmed_by_the_composite_checksum(
    s3_server: S3Server, tmp_path: Path, creds: None
) -> None:
    bucket = s3_server.bucket()
    store = store_for(s3_server, bucket, multipart_threshold=5 << 20, part_size=5 << 20)
    big = tmp_path / "big.cast"
    big.write_bytes(bytes(range(256)) * (11 << 12))  # 11 MiB: three parts
    digest = store.put_file(big)
    assert len(digest.parts) == 3
    assert store.matches("big.cast", digest)
    fetched = tmp_path / "back" / "big.cast"
    assert store.get_file("big.cast", fetched)
    assert fetched.read_bytes() == big.read_bytes()


def test_a_changed_object_is_not_confirmed_and_a_corrupt_download_is_refused(
    s3_server: S3Server, tmp_path: Path, creds: None
) -> None:
    bucket = s3_server.bucket()
    store = store_for(s3_server, bucket)
    cast = sealed_cast(tmp_path)
    store.upload_cast(cast)
    client = s3_server.client()
    # Someone replaces the object with other bytes under the old metadata.
    client.put_object(
        Bucket=bucket, Key="unit/s1.cast", Body=b"forged", Metadata={"sha256": "0" * 64}
    )
    assert not store.matches("s1.cast", digest_file(cast))
    with pytest.raises(ObjectStoreError, match="fail their SHA-256"):
        store.get_file("s1.cast", tmp_path / "back" / "s1.cast")
    assert not (tmp_path / "back" / "s1.cast").exists()
    assert store.fetch_cast("missing.cast", tmp_path / "back") is None


def test_missing_credentials_variable_is_a_clear_error(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CASTGATE_TEST_S3_KEY", raising=False)
    with pytest.raises(ObjectStoreError, match="CASTGATE_TEST_S3_KEY"):
        store_for(s3_server, "any-bucket")


def test_uploader_ships_what_it_finds_at_start_and_finishes_deletions(
    s3_server: S3Server, tmp_path: Path, creds: None
) -> None:
    bucket = s3_server.bucket()
    toml = f'data_dir = "data"\n{s3_server.section(bucket, keep_local=False)}'
    (tmp_path / "castgate.toml").write_text(toml)
    cfg = load_config(tmp_path / "castgate.toml")
    cfg.recordings_dir.mkdir(parents=True)
    cast = sealed_cast(cfg.recordings_dir)
    # Uploaded by an earlier run that stopped before deleting: the note is there.
    earlier = sealed_cast(cfg.recordings_dir, "s0")
    store = ObjectStore(cfg.s3)  # type: ignore[arg-type]
    write_marker(earlier, store, store.upload_cast(earlier))
    unsealed = cfg.recordings_dir / "s2.cast"  # no manifest: not ready to ship
    unsealed.write_bytes(b'{"version": 2}\n')

    events: list[tuple[str, str, str | None]] = []
    uploader = Uploader(
        cfg, store, lambda kind, outcome, _r, _d, sid: events.append((kind, outcome, sid))
    )
    uploader.start()
    try:
        wait_for(lambda: events, 30)
    finally:
        uploader.stop()
    assert events == [("recording.upload", "success", "s1")]
    assert cast_files(cast) == [] and cast_files(earlier) == []
    assert unsealed.exists()
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {f"rec/s{i}.cast{s}" for i in (0, 1) for s in ("", ".chain", ".manifest.json")}


def test_a_sigkilled_relay_uploads_its_recovered_casts_at_restart(
    sshd_target: SshTarget, s3_server: S3Server, tmp_path: Path, creds: None
) -> None:
    """Issue 8's crash case end to end: a relay shipping to S3 is killed mid-session;
    at restart crash recovery seals the cast up to its last fsync, the start scan
    uploads it, and once the local copy is gone verify reads it from S3 and finds it
    truncated but authentic."""
    bucket = s3_server.bucket()
    relay = s3_relay(tmp_path / "relay", sshd_target, s3_server, bucket, keep_local=False)
    try:
        streamer = Streamer(relay, "crash-s3")
        try:
            wait_for(lambda: streamer.ticks > 20, 30)
            status, body = api(relay, "/api/v1/sessions?live=true")
            assert status == 200
            (sid,) = [s["id"] for s in json.loads(body)["sessions"]]
            with Store.open(load_config(relay.config).store_url()) as store:
                wait_for(lambda: store.latest_checkpoint(sid) is not None, 20)
            seen = streamer.ticks
            wait_for(lambda: streamer.ticks > seen + 10, 20)
            relay.proc.kill()  # SIGKILL: nothing flushed, sealed or uploaded
            relay.proc.wait(10)
        finally:
            streamer.finish()
        assert not (relay.recordings() / f"{sid}.cast.manifest.json").exists()
        launch(relay, CREDENTIALS)
        wait_for((relay.recordings() / f"{sid}.cast.uploaded").exists, 30)
        wait_for(lambda: not (relay.recordings() / f"{sid}.cast").exists(), 30)
        keys = [
            o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
        ]
        assert f"rec/{sid}.cast" in keys and f"rec/{sid}.cast.manifest.json" in keys
        verify = relay.castgate("verify", sid)
        assert verify.returncode == 1, verify.stdout + verify.stderr  # truncated: exit 1
        assert "TRUNCATED-AUTHENTIC" in verify.stdout, verify.stdout
        export = relay.castgate("export", sid, "--format", "txt")
        assert export.returncode == 0 and "tick-crash-s3" in export.stdout, export.stderr
    finally:
        relay.stop()
