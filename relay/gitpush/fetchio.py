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

    @property
    def tips(self) -> list[str]:
        """What the store now has: the `haves` of the next fetch into it (the target's
        tips move, so the store's own objects cannot be found from the next advertisement)."""
        return wants_for(self.advertisement)


async def fetch_into(
    reader: ByteReader,
    writer: ByteWriter,
    store: DiskObjectStore,
    *,
    haves: Iterable[str] = (),
    spool_dir: str | None = None,
) -> FetchResult:
    """Fetch into `store` every object of the target's refs that `store` lacks; the
    advertised tips it has, and `haves` (the `tips` of the last fetch into it), tell
    upload-pack what to leave out.

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
    tips = wants_for(advert)
    wants = [oid for oid in tips if ObjectID(oid.encode("ascii")) not in store]
    # Tips the store already has are haves: a store kept between pushes then costs only
    # what changed on the target since, not a clone each time.
    known = [oid for oid in tips if oid not in wants]
    writer.write(fetch_request(advert, wants, [*known, *haves]))
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
