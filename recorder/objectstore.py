"""Recordings in S3-compatible object storage (boto3): upload with checksums, confirm,
and fetch back into a local cache.

A sealed cast is a set of files next to each other: ``NAME.cast``, ``NAME.cast.chain``,
``NAME.cast.idx`` (when built) and ``NAME.cast.manifest.json``. Each becomes the object
``PREFIX + file name``. The manifest goes last, so a manifest in the bucket means the
files before it are there too.

Every upload carries the file's SHA-256 (``ChecksumSHA256``, which S3 checks on
arrival; per part for multipart uploads) and, as user metadata, the SHA-256 of the whole
file. A file counts as stored only after a HEAD shows the same size and checksum;
downloads are hashed and compared before they are used. Blocking calls only: the relay
runs them in a worker thread.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recorder.config import Config, S3Config
from recorder.errors import CastgateError
from recorder.integrity import chain_path, manifest_path

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

INDEX_SUFFIX = ".idx"  # replay/seekindex.py names the index the same way
UPLOADED_SUFFIX = ".uploaded"
META_SHA256 = "sha256"
MULTIPART_THRESHOLD = 64 << 20
PART_SIZE = 16 << 20
_CHUNK = 1 << 20


class ObjectStoreError(CastgateError):
    """The object store refused or could not be reached (one line, with the reason)."""


def index_file(cast: Path) -> Path:
    """Path of a cast's seek index sidecar."""
    return cast.with_name(cast.name + INDEX_SUFFIX)


def uploaded_marker(cast: Path) -> Path:
    """Local note that every file of ``cast`` is confirmed in the bucket."""
    return cast.with_name(cast.name + UPLOADED_SUFFIX)


def cast_files(cast: Path) -> list[Path]:
    """The files of a sealed cast that exist, in upload order (manifest last)."""
    files = [cast, chain_path(cast), index_file(cast), manifest_path(cast)]
    return [f for f in files if f.is_file()]


def cache_dir(cfg: Config) -> Path:
    """Where casts fetched from the bucket are kept (under the data directory)."""
    return cfg.data_path / "cache" / "s3"


@dataclass(frozen=True)
class FileDigest:
    """Size and SHA-256 of a local file, computed in one read."""

    path: Path
    size: int
    sha256: bytes
    parts: tuple[bytes, ...]
    """SHA-256 of each ``PART_SIZE`` part, for multipart uploads (empty below the
    threshold)."""

    @property
    def sha256_hex(self) -> str:
        """Hex SHA-256 of the whole file."""
        return self.sha256.hex()

    def md5_hex(self) -> str:
        """Hex MD5 of the file, read again: only servers without flexible checksums
        need it (their single-part ETag)."""
        md5 = hashlib.md5(usedforsecurity=False)
        with self.path.open("rb") as fh:
            while block := fh.read(_CHUNK):
                md5.update(block)
        return md5.hexdigest()

    @property
    def s3_checksum(self) -> str:
        """The ``ChecksumSHA256`` S3 reports for this file uploaded by ``put_file``:
        the digest itself, or for multipart the digest of the part digests with ``-N``."""
        if not self.parts:
            return _b64(self.sha256)
        return f"{_b64(hashlib.sha256(b''.join(self.parts)).digest())}-{len(self.parts)}"


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def digest_file(
    path: Path, threshold: int = MULTIPART_THRESHOLD, part: int = PART_SIZE
) -> FileDigest:
    """Hash a file once: its SHA-256, and part digests when it is large enough for a
    multipart upload."""
    whole = hashlib.sha256()
    parts: list[bytes] = []
    size = path.stat().st_size
    multipart = size > threshold
    with path.open("rb") as fh:
        while True:
            block = fh.read(part if multipart else _CHUNK)
            if not block:
                break
            whole.update(block)
            if multipart:
                parts.append(hashlib.sha256(block).digest())
    return FileDigest(path, size, whole.digest(), tuple(parts))


def _same_checksum(reported: str | None, expected: str) -> bool:
    # AWS writes a multipart composite as "b64-N"; some servers leave out the "-N".
    if reported is None:
        return False
    return reported == expected or reported == expected.split("-", 1)[0]


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
    return type(exc).__name__


class ObjectStore:
    """One bucket and prefix, with the client built from ``[s3]``.

    Args:
        cfg: the ``[s3]`` section.
        multipart_threshold: files larger than this go up in parts of ``part_size``.
    """

    def __init__(
        self,
        cfg: S3Config,
        *,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = PART_SIZE,
    ) -> None:
        self.cfg = cfg
        self.bucket = cfg.bucket
        self.prefix = cfg.prefix
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self._client = _client(cfg)
        self._lock = threading.Lock()

    def key(self, name: str) -> str:
        """Object key of a file name."""
        return self.prefix + name

    def url(self, name: str) -> str:
        """``s3://bucket/key`` of a file name, for audit records and logs."""
        return f"s3://{self.bucket}/{self.key(name)}"

    def _lock_args(self) -> dict[str, Any]:
        if self.cfg.object_lock_mode is None or self.cfg.retention_days is None:
            return {}
        until = datetime.now(UTC) + timedelta(days=self.cfg.retention_days)
        return {"ObjectLockMode": self.cfg.object_lock_mode, "ObjectLockRetainUntilDate": until}

    def head(self, name: str) -> dict[str, Any] | None:
        """The object's HEAD (with its checksum), or None when it does not exist."""
        try:
            return dict(
                self._client.head_object(
                    Bucket=self.bucket, Key=self.key(name), ChecksumMode="ENABLED"
                )
            )
        except Exception as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise ObjectStoreError(f"{self.url(name)}: HEAD failed: {_reason(exc)}") from None

    def matches(self, name: str, digest: FileDigest) -> bool:
        """True when the stored object has the local file's size and checksum."""
        head = self.head(name)
        if head is None or int(head.get("ContentLength", -1)) != digest.size:
            return False
        checksum = head.get("ChecksumSHA256")
        if checksum is not None:
            return _same_checksum(str(checksum), digest.s3_checksum)
        # Servers without flexible checksums: a single-part ETag is the MD5 (SSE-KMS
        # aside), and the whole-file SHA-256 travels as metadata.
        etag = str(head.get("ETag", "")).strip('"')
        if "-" not in etag and etag:
            return etag == digest.md5_hex()
        return dict(head.get("Metadata") or {}).get(META_SHA256) == digest.sha256_hex

    def put_file(self, path: Path, digest: FileDigest | None = None) -> FileDigest:
        """Upload one file under its name and confirm it with a HEAD; returns its
        digest. Raises ObjectStoreError."""
        digest = digest or digest_file(path, self.multipart_threshold, self.part_size)
        name = path.name
        extra: dict[str, Any] = {"Metadata": {META_SHA256: digest.sha256_hex}, **self._lock_args()}
        try:
            if digest.parts:
                self._put_multipart(path, digest, extra)
            else:
                with path.open("rb") as fh:
                    self._client.put_object(
                        Bucket=self.bucket,
                        Key=self.key(name),
                        Body=fh,
                        ContentLength=digest.size,
                        ChecksumAlgorithm="SHA256",
                        ChecksumSHA256=_b64(digest.sha256),
                        **extra,
                    )
        except ObjectStoreError:
            raise
        except OSError as exc:
            raise ObjectStoreError(f"{path}: cannot read: {exc.strerror}") from None
        except Exception as exc:
            raise ObjectStoreError(f"{self.url(name)}: upload failed: {_reason(exc)}") from None
        if not self.matches(name, digest):
            raise ObjectStoreError(
                f"{self.url(name)}: the stored object does not match the local file "
                "(size or SHA-256 differ)"
            )
        return digest

    def _put_multipart(self, path: Path, digest: FileDigest, extra: dict[str, Any]) -> None:
        key = self.key(path.name)
        upload = self._client.create_multipart_upload(
            Bucket=self.bucket, Key=key, ChecksumAlgorithm="SHA256", **extra
        )
        upload_id = upload["UploadId"]
        parts: list[dict[str, Any]] = []
        try:
            with path.open("rb") as fh:
                for number, part_digest in enumerate(digest.parts, 1):
                    # S3 checks each part against the digest taken before: a file
                    # changed since then is refused (BadDigest), not stored.
                    block = fh.read(self.part_size)
                    answer = self._client.upload_part(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=block,
                        ChecksumAlgorithm="SHA256",
                        ChecksumSHA256=_b64(part_digest),
                    )
                    parts.append(
                        {
                            "PartNumber": number,
                            "ETag": answer["ETag"],
                            "ChecksumSHA256": _b64(part_digest),
                        }
                    )
            self._client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
            )
        except BaseException:
            with contextlib.suppress(Exception):
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise

    def get_file(self, name: str, dest: Path) -> bool:
        """Download ``name`` to ``dest`` (atomically, mode 0600) and check its SHA-256
        against what the bucket recorded; False when there is no such object."""
        try:
            answer = self._client.get_object(
                Bucket=self.bucket, Key=self.key(name), ChecksumMode="ENABLED"
            )
        except Exception as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise ObjectStoreError(f"{self.url(name)}: download failed: {_reason(exc)}") from None
        expected = dict(answer.get("Metadata") or {}).get(META_SHA256)
        reported = answer.get("ChecksumSHA256")
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.part")
        whole = hashlib.sha256()
        size = 0
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                for block in _iter_body(answer["Body"]):
                    whole.update(block)
                    size += len(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            if expected is not None and whole.hexdigest() != expected:
                raise ObjectStoreError(f"{self.url(name)}: downloaded bytes fail their SHA-256")
            single = reported is not None and "-" not in str(reported)
            if expected is None and single and str(reported) != _b64(whole.digest()):
                raise ObjectStoreError(f"{self.url(name)}: downloaded bytes fail their checksum")
            if size != int(answer.get("ContentLength", size)):
                raise ObjectStoreError(f"{self.url(name)}: download ended early")
            tmp.replace(dest)
        except ObjectStoreError:
            raise
        except OSError as exc:
            raise ObjectStoreError(f"{dest}: cannot write: {exc.strerror}") from None
        except Exception as exc:
            raise ObjectStoreError(f"{self.url(name)}: download failed: {_reason(exc)}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def upload_cast(self, cast: Path, *, skip_stored: bool = True) -> dict[str, dict[str, Any]]:
        """Upload every file of a sealed cast, manifest last; returns per file name its
        size and SHA-256. With ``skip_stored`` a HEAD first skips files the bucket
        already holds unchanged (retries, restarts). Raises ObjectStoreError on the
        first file that cannot be stored and confirmed."""
        done: dict[str, dict[str, Any]] = {}
        for path in cast_files(cast):
            digest = digest_file(path, self.multipart_threshold, self.part_size)
            if not skip_stored or not self.matches(path.name, digest):
                self.put_file(path, digest)
            done[path.name] = {"size": digest.size, "sha256": digest.sha256_hex}
        return done

    def fetch_cast(self, name: str, dest_dir: Path) -> Path | None:
        """Download a cast and its sidecars into ``dest_dir``; the cast's path, or
        None when the bucket has no such cast. The manifest is fetched first: without
        it the upload was never completed."""
        cast = dest_dir / name
        with self._lock:
            if not self.get_file(manifest_path(cast).name, manifest_path(cast)):
                return None
            for path in (chain_path(cast), index_file(cast), cast):
                # The index is optional (built only for casts small enough at seal time).
                if not self.get_file(path.name, path) and path != index_file(cast):
                    return None
        return cast


def _iter_body(body: Any) -> Iterator[bytes]:
    try:
        while block := body.read(_CHUNK):
            yield block
    finally:
        with contextlib.suppress(Exception):
            body.close()


def _reason(exc: Exception) -> str:
    code = _error_code(exc)
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        message = response.get("Error", {}).get("Message")
        if message:
            return f"{code}: {message}"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{code}: {text}" if text and text != code else code


def _client(cfg: S3Config) -> S3Client:
    import boto3
    from botocore.config import Config as BotoConfig

    creds: dict[str, str] = {}
    for arg, env in (
        ("aws_access_key_id", cfg.access_key_id_env),
        ("aws_secret_access_key", cfg.secret_access_key_env),
        ("aws_session_token", cfg.session_token_env),
    ):
        if env is None:
            continue
        value = os.environ.get(env)
        if not value:
            raise ObjectStoreError(
                f"s3: environment variable {env} (named in the config) is not set"
            )
        creds[arg] = value
    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=cfg.endpoint_url,
        region_name=cfg.region or session.region_name or "us-east-1",
        config=BotoConfig(
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            s3={"addressing_style": cfg.addressing_style},
            # We send our own SHA-256; no extra CRC32 some S3-compatible servers reject.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
        aws_access_key_id=creds.get("aws_access_key_id"),
        aws_secret_access_key=creds.get("aws_secret_access_key"),
        aws_session_token=creds.get("aws_session_token"),
    )


_stores: dict[int, ObjectStore] = {}
_stores_lock = threading.Lock()


def object_store(cfg: Config) -> ObjectStore | None:
    """The object store of a config (one client per config object), or None without
    an ``[s3]`` section."""
    if cfg.s3 is None:
        return None
    with _stores_lock:
        store = _stores.get(id(cfg))
        if store is None or store.cfg is not cfg.s3:
            store = _stores[id(cfg)] = ObjectStore(cfg.s3)
        return store


def read_marker(cast: Path) -> dict[str, Any] | None:
    """The upload note of a cast, or None when it was not (completely) uploaded."""
    try:
        data = json.loads(uploaded_marker(cast).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(cast: Path, store: ObjectStore, files: dict[str, dict[str, Any]]) -> None:
    """Note (atomically) that every file of ``cast`` is confirmed in the bucket."""
    body = {
        "bucket": store.bucket,
        "prefix": store.prefix,
        "files": files,
        "uploaded_at": datetime.now(UTC).isoformat(),
    }
    marker = uploaded_marker(cast)
    tmp = marker.with_name(f".{marker.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(body, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(marker)


def locate_cast(cfg: Config, cast: Path) -> Path:
    """The readable copy of a cast: the local file when it is there, else a copy
    fetched from the bucket into ``cache_dir`` (reused once fetched). Returns ``cast``
    itself when neither exists; raises ObjectStoreError when the bucket cannot be
    read."""
    if cast.is_file():
        return cast
    store = object_store(cfg)
    if store is None:
        return cast
    cached = cache_dir(cfg) / cast.name
    if cached.is_file() and manifest_path(cached).is_file():
        os.utime(cached)  # recently used: the last to be evicted
        return cached
    fetched = store.fetch_cast(cast.name, cache_dir(cfg))
    if fetched is not None and cfg.s3 is not None:
        evict_cache(cache_dir(cfg), int(cfg.s3.cache_max_mb * 1024 * 1024), keep=fetched)
    return fetched if fetched is not None else cast


def evict_cache(directory: Path, limit: int, keep: Path) -> list[str]:
    """Remove the least recently used casts (with their sidecars) from the S3 read cache
    until it holds at most ``limit`` bytes; ``keep`` (the cast being read) stays.
    Returns the names of the casts removed."""
    groups: dict[str, list[Path]] = {}
    for f in directory.iterdir() if directory.is_dir() else ():
        if f.is_file():
            base = f.name.split(".cast", 1)[0] + ".cast"
            groups.setdefault(base, []).append(f)

    def size(files: list[Path]) -> int:
        return sum(f.stat().st_size for f in files if f.exists())

    total = sum(size(files) for files in groups.values())
    removed: list[str] = []
    by_age = sorted(
        (name for name in groups if name != keep.name),
        key=lambda name: max(f.stat().st_mtime for f in groups[name]),
    )
    for name in by_age:
        if total <= limit:
            break
        total -= size(groups[name])
        for f in groups[name]:
            f.unlink(missing_ok=True)
        removed.append(name)
    return removed
