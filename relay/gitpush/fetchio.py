"""The one piece of gitpush that does I/O: run `fetch` over an async byte channel (the
stdin/stdout of `git-upload-pack '<path>'` on the relay's own target connection, or of a
local `git upload-pack` process) and put the pack into a dulwich store."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from dulwich.object_store import DiskObjectStore
from dulwich.objects import ObjectID

from relay.gitpush.advert import AdvertError, Advertisement, AdvertParser
from relay.gitpush.fetch import FetchError, FetchResponse, fetch_request, wants_for
from relay.gitpush.pktline import PktError

_READ = 256 * 1024


class ByteReader(Protocol):
    async def read(self, n: int = -1, /) -> bytes: ...


class ByteWriter(Protocol):
    def write(self, data: bytes, /) -> None: ...

    async def drain(self) -> None: ...


@dataclass(frozen=True)
class FetchResult:
    advertisement: Advertisement
    wants: list[str]
    pack_bytes: int


async def fetch_into(
    reader: ByteReader,
    writer: ByteWriter,
    store: DiskObjectStore,
    *,
    haves: Iterable[str] = (),
    spool_dir: str | None = None,
) -> FetchResult:
    """Fetch into `store` every object of the target's refs that `store` lacks.

    Raises:
        FetchError: the exchange failed (the push is then described as unreadable).
    """
    parser = AdvertParser()
    while not parser.done:
        data = await reader.read(_READ)
        if not data:
            raise FetchError("upload-pack ended before its advertisement")
        try:
            parser.feed(data)
        except (AdvertError, PktError) as exc:
            raise FetchError(str(exc)) from None
    advert = parser.advert
    wants = [oid for oid in wants_for(advert) if ObjectID(oid.encode("ascii")) not in store]
    writer.write(fetch_request(advert, wants, list(haves)))
    await writer.drain()
    if not wants:
        return FetchResult(advert, wants, 0)
    response = FetchResponse(advert, spool_dir=spool_dir)
    leftover = parser.rest()
    if leftover:
        response.feed(leftover)
    while not response.done:
        data = await reader.read(_READ)
        if not data:
            raise FetchError("upload-pack ended before the end of its pack")
        response.feed(data)
    try:
        pack_reader = response.pack.reader()
        store.add_thin_pack(pack_reader.read_all, pack_reader.read)
    except Exception as exc:  # dulwich's many kinds of a damaged pack
        raise FetchError(f"fetched pack not readable: {type(exc).__name__}: {exc}") from None
    finally:
        size = response.pack.size
        response.pack.close()
    return FetchResult(advert, wants, size)
