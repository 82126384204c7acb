"""The bytes of a held request, kept exactly as they arrived: in memory up to a limit,
then in an anonymous temporary file, so a large push does not grow the relay's memory.
The SHA-256 is taken as the bytes arrive: the value an approval binds to.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from typing import IO

DEFAULT_MEMORY_LIMIT = 4 * 1024 * 1024
_CHUNK = 256 * 1024


class HeldBytes:
    """Append-only bytes with a running SHA-256; spooled to disk past `memory_limit`."""

    def __init__(
        self, *, memory_limit: int = DEFAULT_MEMORY_LIMIT, spool_dir: str | None = None
    ) -> None:
        self._limit = memory_limit
        self._dir = spool_dir
        self._mem = bytearray()
        self._file: IO[bytes] | None = None
        self._sha = hashlib.sha256()
        self.size = 0

    @property
    def spooled(self) -> bool:
        """Whether the bytes went to disk."""
        return self._file is not None

    def append(self, data: bytes | memoryview) -> None:
        if not data:
            return
        self._sha.update(data)
        self.size += len(data)
        if self._file is None and len(self._mem) + len(data) <= self._limit:
            self._mem += data
            return
        if self._file is None:
            # Owned by this object until close(), not a with block.
            self._file = tempfile.TemporaryFile(prefix="castgate-push-", dir=self._dir)  # noqa: SIM115
            self._file.write(self._mem)
            self._mem = bytearray()
        self._file.seek(0, 2)
        self._file.write(data)

    def sha256(self) -> str:
        """Hex SHA-256 of every byte appended so far."""
        return self._sha.hexdigest()

    def chunks(self, start: int = 0, size: int = _CHUNK) -> Iterator[bytes]:
        """The bytes from `start` to the end, in chunks (the file is re-read, never
        loaded whole)."""
        if self._file is None:
            for i in range(start, len(self._mem), size):
                yield bytes(self._mem[i : i + size])
            return
        self._file.flush()
        pos = start
        while pos < self.size:
            self._file.seek(pos)
            data = self._file.read(min(size, self.size - pos))
            if not data:
                return
            pos += len(data)
            yield data

    def reader(self, start: int = 0) -> HeldReader:
        """A file-like reader from `start` (what dulwich's pack readers take)."""
        return HeldReader(self, start)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._mem = bytearray()

    def _read_at(self, pos: int, n: int) -> bytes:
        if self._file is None:
            return bytes(self._mem[pos : pos + n])
        self._file.flush()
        self._file.seek(pos)
        return self._file.read(max(0, min(n, self.size - pos)))


class HeldReader:
    """Sequential reads over held bytes from an offset."""

    def __init__(self, held: HeldBytes, start: int) -> None:
        self._held = held
        self._pos = start

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self._held.size - self._pos
        data = self._held._read_at(self._pos, n)
        self._pos += len(data)
        return data

    def read_all(self, n: int) -> bytes:
        """Exactly `n` bytes, or fewer only at the end."""
        return self.read(n)
