"""Where a git pack ends, found by reading it as it streams: the header's object count,
each object's header and zlib stream, then the trailing checksum, which is verified.

receive-pack has no length for the pack: it ends when its last object and checksum
have arrived, so a relay that holds a push must parse it this far. The inflated data
is counted and dropped (memory stays bounded by the chunk size, whatever the pack
declares), and an object that inflates past its declared size stops the scan: that
is a decompression bomb or garbage, never a pack git wrote.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, field

OBJ_COMMIT, OBJ_TREE, OBJ_BLOB, OBJ_TAG, OBJ_OFS_DELTA, OBJ_REF_DELTA = 1, 2, 3, 4, 6, 7
TYPE_NAMES = {1: "commit", 2: "tree", 3: "blob", 4: "tag", 6: "ofs-delta", 7: "ref-delta"}
_INFLATE_CHUNK = 256 * 1024
_INFLATE_SLICE = 16 * 1024
_HEADER = struct.Struct("!4sII")
# Larger than any header git writes (type/size varint, then an offset varint or a base id).
_MAX_OBJ_HEADER = 10 + 10 + 32


class PackError(Exception):
    """Not a pack, a damaged one, or one past the limits."""


@dataclass
class PackStats:
    """What the scan saw: object count by type and the size of the pack."""

    objects: int = 0
    size: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    ref_delta_bases: int = 0


class PackScanner:
    """Fed the bytes of a pack, says when it is complete. `feed` returns the bytes that
    follow the pack's end in that chunk (normally none)."""

    def __init__(self, *, hash_len: int = 20, max_objects: int = 50_000_000) -> None:
        if hash_len not in (20, 32):
            raise ValueError("hash_len is 20 (SHA-1) or 32 (SHA-256)")
        self._hash_len = hash_len
        self._max_objects = max_objects
        self._check = hashlib.sha1() if hash_len == 20 else hashlib.sha256()  # noqa: S324
        self._buf = bytearray()
        self._state = "header"
        self._count = 0
        self._left = 0
        self._z: zlib._Decompress | None = None
        self._declared = 0
        self._inflated = 0
        self.stats = PackStats()
        self.done = False

    @property
    def count(self) -> int:
        """The object count from the pack header (0 before it arrived)."""
        return self._count

    def feed(self, data: bytes | memoryview) -> bytes:
        view = memoryview(data)
        pos = 0
        while pos < len(view) and not self.done:
            if self._state == "inflate":
                # A bounded slice: zlib copies what follows the stream's end into
                # unused_data, so handing it the rest of a large chunk for each of many
                # small objects would be quadratic.
                pos += self._inflate(view[pos : pos + _INFLATE_SLICE])
            elif self._state == "object":
                pos = self._object(view, pos)
            else:
                # Fixed-size fields: gather into the buffer, parse when complete.
                size = _HEADER.size if self._state == "header" else self._hash_len
                take = min(len(view) - pos, size - len(self._buf))
                self._buf += view[pos : pos + take]
                pos += take
                if len(self._buf) == size:
                    self._fixed()
        self.stats.size += pos
        return bytes(view[pos:])

    def _fixed(self) -> None:
        if self._state == "header":
            magic, version, count = _HEADER.unpack(self._buf)
            if magic != b"PACK" or version not in (2, 3):
                raise PackError("not a git pack (bad header)")
            if count > self._max_objects:
                raise PackError(f"pack declares {count} objects, over the limit")
            self._check.update(self._buf)
            self._buf.clear()
            self._count = self._left = count
            self._state = "object" if count else "trailer"
            return
        if bytes(self._buf) != self._check.digest():
            raise PackError("damaged pack (checksum mismatch)")
        self._buf.clear()
        self.done = True

    def _object(self, view: memoryview, pos: int) -> int:
        """Parse an object header at `pos` (or finish one begun in the previous chunk);
        returns the new position."""
        if self._buf:
            take = min(len(view) - pos, _MAX_OBJ_HEADER - len(self._buf))
            self._buf += view[pos : pos + take]
            head: bytes | memoryview = bytes(self._buf)
            pos += take
            carried = len(self._buf)
        else:
            head = view[pos : pos + _MAX_OBJ_HEADER]
            carried = 0
        length = self._object_header(head)
        if length is None:
            if len(head) >= _MAX_OBJ_HEADER:
                raise PackError("damaged pack (object header too long)")
            if not carried:
                self._buf += head
                pos += len(head)
            return pos
        self._check.update(head[:length])
        # Bytes gathered past the header are still in this chunk: go back to them.
        pos = pos - carried + length if carried else pos + length
        self._buf.clear()
        self._z = zlib.decompressobj()
        self._inflated = 0
        self._state = "inflate"
        return pos

    def _object_header(self, b: bytes | memoryview) -> int | None:
        """The length of the object header at the start of `b`, or None if incomplete."""
        if not b:
            return None
        c = b[0]
        kind = (c >> 4) & 7
        size = c & 15
        shift = 4
        i = 1
        while c & 0x80:
            if i >= len(b):
                return None
            if shift > 60:
                raise PackError("damaged pack (object size too long)")
            c = b[i]
            size |= (c & 0x7F) << shift
            shift += 7
            i += 1
        if kind not in TYPE_NAMES:
            raise PackError(f"damaged pack (object type {kind})")
        if kind == OBJ_OFS_DELTA:
            while True:
                if i >= len(b):
                    return None
                c = b[i]
                i += 1
                if not c & 0x80:
                    break
                if i > 20:
                    raise PackError("damaged pack (delta offset too long)")
        elif kind == OBJ_REF_DELTA:
            if len(b) < i + self._hash_len:
                return None
            i += self._hash_len
            self.stats.ref_delta_bases += 1
        self._declared = size
        name = TYPE_NAMES[kind]
        self.stats.by_type[name] = self.stats.by_type.get(name, 0) + 1
        return i

    def _inflate(self, view: memoryview) -> int:
        z = self._z
        assert z is not None
        try:
            out = z.decompress(view, _INFLATE_CHUNK)
            self._inflated += len(out)
            while z.unconsumed_tail and not z.eof and self._inflated <= self._declared:
                out = z.decompress(z.unconsumed_tail, _INFLATE_CHUNK)
                self._inflated += len(out)
        except zlib.error as exc:
            raise PackError(f"damaged pack (zlib: {exc})") from None
        if self._inflated > self._declared:
            raise PackError("damaged pack (object larger than declared)")
        if not z.eof:
            self._check.update(view)
            return len(view)
        used = len(view) - len(z.unused_data)
        if self._inflated != self._declared:
            raise PackError("damaged pack (object smaller than declared)")
        self._check.update(view[:used])
        self._z = None
        self.stats.objects += 1
        self._left -= 1
        self._state = "object" if self._left else "trailer"
        return used
