"""gitpush on bytes git would never send: truncated, damaged, garbage, or another
protocol. Every case ends opaque (or pending, for a request cut short, until the client's
EOF makes it opaque), never in an exception or a complete push; and git's refusal is
framed so that a reason cannot forge a report line."""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.gitpush.fetch import FetchError, FetchResponse, fetch_request
from relay.gitpush.packscan import PackError, PackScanner
from relay.gitpush.pktline import FLUSH, PktDecoder, PktError, encode
from relay.gitpush.receive import ReceivePack, State
from relay.gitpush.report import refusal
from tests.unit.test_gitpush_push import Captured, GitWorld, hold

ZERO = "0" * 40


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Captured, bytes]]:
    """A real push (new branch, a few objects) and the client's bytes."""
    world = GitWorld(tmp_path_factory.mktemp("wire"))
    world.commit("one", {"a": b"alpha\n" * 50})
    world.commit("two", {"a": b"alpha\n" * 49 + b"beta\n", "b": b"\x00\x01binary"})
    cap = world.push("main")
    yield cap, cap.client.read_bytes()
    world.close()


def machine_for(cap: Captured) -> ReceivePack:
    m = ReceivePack()
    m.target_bytes(cap.advert)
    assert m.state is State.COMMANDS
    return m


def pack_of(raw: bytes) -> tuple[bytes, bytes]:
    """The command section and the pack of a captured request."""
    at = raw.index(b"PACK")
    return raw[:at], raw[at:]


# --- pkt-lines -------------------------------------------------------------------------


def test_pktline_round_trip_and_specials() -> None:
    dec = PktDecoder()
    dec.feed(encode(b"hello\n") + FLUSH + b"0001" + encode(b"x")[:3])
    pkts = list(dec.packets())
    assert [p.data for p in pkts] == [b"hello\n", None, None]
    assert pkts[1].is_flush and pkts[2].special == b"0001"
    assert dec.rest() == b"000"


def test_pktline_long_stream_at_once() -> None:
    """More than the decoder keeps of its past: every packet intact, in order."""
    packets = [bytes([i % 251]) * (1000 + i * 37 % 64000) for i in range(300)]
    dec = PktDecoder()
    dec.feed(b"".join(encode(p) for p in packets) + FLUSH)
    out = list(dec.packets())
    assert [p.data for p in out[:-1]] == packets and out[-1].is_flush


@pytest.mark.parametrize("head", [b"000z", b"0003", b"fff1", b"\xff\xff\xff\xff"])
def test_pktline_bad_lengths(head: bytes) -> None:
    dec = PktDecoder()
    dec.feed(head + b"x" * 10)
    with pytest.raises(PktError):
        list(dec.packets())


# --- the pack ----------------------------------------------------------------------------


def test_pack_fed_byte_by_byte_ends_exactly(pushed: tuple[Captured, bytes]) -> None:
    _, pack = pack_of(pushed[1])
    scanner = PackScanner()
    for i in range(len(pack) - 1):
        assert scanner.feed(pack[i : i + 1]) == b""
        assert not scanner.done
    assert scanner.feed(pack[-1:] + b"extra") == b"extra"
    assert scanner.done and scanner.stats.objects == scanner.count == 7


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(min_value=0, max_value=4000), max_size=12))
def test_pack_any_split_is_the_same(pushed: tuple[Captured, bytes], cuts: list[int]) -> None:
    _, pack = pack_of(pushed[1])
    points = sorted({c % (len(pack) + 1) for c in cuts} | {0, len(pack)})
    scanner = PackScanner()
    for a, b in itertools.pairwise(points):
        assert scanner.feed(pack[a:b]) == b""
    assert scanner.done and scanner.stats.size == len(pack)


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: b"PACX" + p[4:],  # magic
        lambda p: p[:4] + b"\0\0\0\x05" + p[8:],  # version
        lambda p: p[:-1] + bytes([p[-1] ^ 1]),  # checksum
        lambda p: p[:20] + bytes([p[20] ^ 0xFF]) + p[21:],  # inside the first zlib stream
    ],
    ids=["magic", "version", "checksum", "zlib"],
)
def test_damaged_pack_is_refused(pushed: tuple[Captured, bytes], damage: object) -> None:
    _, pack = pack_of(pushed[1])
    with pytest.raises(PackError):
        PackScanner().feed(damage(pack))  # type: ignore[operator]


def _one_object_pack(kind: int, declared: int, body: bytes) -> bytes:
    """A pack of one object whose header declares `declared` bytes (checksum left off:
    the scan stops before it)."""
    head = bytearray()
    c = (kind << 4) | (declared & 15)
    declared >>= 4
    while declared:
        head.append(c | 0x80)
        c = declared & 0x7F
        declared >>= 7
    head.append(c)
    return b"PACK\0\0\0\x02\0\0\0\x01" + bytes(head) + zlib.compress(body)


def test_object_inflating_past_its_declared_size_stops_the_scan() -> None:
    # A bomb: 64 MB of zeros compress to 64 KB and declare 10 bytes.
    bomb = _one_object_pack(3, 10, bytes(64 * 1024 * 1024))
    with pytest.raises(PackError, match="larger than declared"):
        PackScanner().feed(bomb)
    with pytest.raises(PackError, match="smaller than declared"):
        PackScanner().feed(_one_object_pack(3, 100, b"short"))
    with pytest.raises(PackError, match="object type 5"):
        PackScanner().feed(_one_object_pack(5, 1, b"x"))


def test_absurd_object_count_is_refused() -> None:
    with pytest.raises(PackError, match="over the limit"):
        PackScanner(max_objects=10).feed(b"PACK\0\0\0\x02\0\0\0\x0b")


# --- the request ---------------------------------------------------------------------------


def test_truncated_request_is_pending_then_opaque_at_eof(pushed: tuple[Captured, bytes]) -> None:
    cap, raw = pushed
    for cut in (3, 60, raw.index(b"PACK") + 5, len(raw) - 1):
        m = machine_for(cap)
        m.client_bytes(raw[:cut])
        assert m.state not in (State.COMPLETE, State.OPAQUE), cut
        m.client_eof()
        assert m.opaque and "ended early" in m.opaque_reason


def test_data_after_the_pack_is_opaque(pushed: tuple[Captured, bytes]) -> None:
    cap, raw = pushed
    m = machine_for(cap)
    m.client_bytes(raw + b"0000")
    assert m.opaque and "after the end of the pack" in m.opaque_reason
    m = machine_for(cap)
    m.client_bytes(raw)
    assert m.complete
    m.client_bytes(b"x")
    assert m.opaque


def _first_command(cap: Captured, raw: bytes) -> bytes:
    dec = PktDecoder()
    dec.feed(raw)
    first = dec.next()
    assert first is not None and first.data is not None
    return first.data


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda c: c.replace(b"refs/heads/main", b"refs/heads/m ain"), "not a ref update"),
        (lambda c: c.replace(b"refs/heads/main", b"refs/heads/\x1bmain"), "bad ref name"),
        (lambda c: b"g" + c[1:], "not an object id"),
        (
            lambda c: c.replace(b"side-band-64k", b"side-band-64k push-cert-nonce=x"),
            "did not offer",
        ),
        (lambda c: b"push-cert\0" + c.split(b"\0")[1], "signed push"),
    ],
    ids=["space", "control", "oid", "capability", "push-cert"],
)
def test_commands_git_would_not_send_are_opaque(
    pushed: tuple[Captured, bytes], edit: object, reason: str
) -> None:
    cap, raw = pushed
    first = _first_command(cap, raw)
    changed = encode(edit(first)) + raw[len(first) + 4 :]  # type: ignore[operator]
    m = machine_for(cap)
    m.client_bytes(changed)
    assert m.opaque and reason in m.opaque_reason, m.opaque_reason


def test_protocol_v2_packets_and_early_client_bytes_are_opaque(
    pushed: tuple[Captured, bytes],
) -> None:
    cap, _ = pushed
    m = machine_for(cap)
    m.client_bytes(encode(b"command=ls-refs\n") + b"0001")
    assert m.opaque
    early = ReceivePack()
    early.client_bytes(b"0000")
    assert early.opaque and "before the target's advertisement" in early.opaque_reason
    v2 = ReceivePack()
    v2.target_bytes(encode(b"version 2\n") + encode(b"agent=git/2.39\n") + FLUSH)
    assert v2.opaque and "v2" in v2.opaque_reason


def test_limits(pushed: tuple[Captured, bytes]) -> None:
    cap, raw = pushed
    m = ReceivePack(max_request=100)
    m.target_bytes(cap.advert)
    m.client_bytes(raw)
    assert m.opaque and "larger than 100 bytes" in m.opaque_reason
    many = b"".join(encode(f"{ZERO} {'1' * 40} refs/heads/b{i}\n".encode()) for i in range(4))
    m = ReceivePack(max_commands=3)
    m.target_bytes(cap.advert)
    m.client_bytes(many)
    assert m.opaque and "more than 3" in m.opaque_reason


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=64))
def test_garbage_never_raises_nor_completes(
    pushed: tuple[Captured, bytes], data: bytes, chunk: int
) -> None:
    cap, _ = pushed
    m = machine_for(cap)
    for i in range(0, len(data), chunk):
        m.client_bytes(data[i : i + chunk])
    m.client_eof()
    assert m.opaque or (m.complete and not m.request.commands)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(min_value=0), st.integers(min_value=1, max_value=255))
def test_one_flipped_byte_is_noticed(pushed: tuple[Captured, bytes], where: int, flip: int) -> None:
    """Any single damaged byte of a real request: opaque, or (a byte of a commit id or
    capability) a still well-formed push whose hash differs from the original's."""
    cap, raw = pushed
    original = hold(cap).request.sha256
    i = where % len(raw)
    bad = raw[:i] + bytes([raw[i] ^ flip]) + raw[i + 1 :]
    m = machine_for(cap)
    m.client_bytes(bad)
    m.client_eof()
    assert m.opaque or m.request.sha256 != original


# --- the refusal ---------------------------------------------------------------------------


def _decode(data: bytes) -> list[bytes | None]:
    dec = PktDecoder()
    dec.feed(data)
    out = [p.data for p in dec.packets()]
    assert dec.rest() == b""
    return out


def test_refusal_without_sideband(pushed: tuple[Captured, bytes]) -> None:
    cap, _raw = pushed
    m = hold(cap)
    m.request.capabilities = ("report-status",)
    assert _decode(refusal(m.request, "no")) == [b"unpack ok\n", b"ng refs/heads/main no\n", None]
    m.request.capabilities = ()
    assert refusal(m.request, "no") == b""


def test_refusal_in_sideband_cannot_be_forged(pushed: tuple[Captured, bytes]) -> None:
    cap, _ = pushed
    m = hold(cap)
    assert "side-band-64k" in m.request.caps
    out = _decode(refusal(m.request, "nope\n0017ok refs/heads/main\n"))
    assert out[-1] is None
    bands = [p for p in out[:-1] if p is not None]
    assert bands[0] == b"\x02castgate: nope 0017ok refs/heads/main\n"
    inner = _decode(b"".join(p[1:] for p in bands if p[:1] == b"\x01"))
    assert inner == [b"unpack ok\n", b"ng refs/heads/main nope 0017ok refs/heads/main\n", None]


def test_refusal_in_old_sideband_uses_small_packets(pushed: tuple[Captured, bytes]) -> None:
    cap, _ = pushed
    m = hold(cap)
    m.request.capabilities = ("report-status", "side-band")
    m.request.commands = m.request.commands * 10  # a report of over 1000 bytes
    out = refusal(m.request, "x" * 390)
    packets = _decode(out)
    assert all(p is None or len(p) <= 996 for p in packets)
    inner = _decode(b"".join(p[1:] for p in packets if p is not None and p[:1] == b"\x01"))
    assert inner.count(b"ng refs/heads/main " + b"x" * 390 + b"\n") == 10


# --- the fetch answer ----------------------------------------------------------------------


def test_fetch_request_shape(pushed: tuple[Captured, bytes]) -> None:
    cap, _ = pushed
    m = machine_for(cap)
    adv = m.request.advertisement
    assert fetch_request(adv, []) == FLUSH
    out = _decode(fetch_request(adv, ["a" * 40, "b" * 40], ["c" * 40]))
    assert out[0] is not None and out[0].startswith(
        b"want " + b"a" * 40 + b" ofs-delta side-band-64k"
    )
    assert out[1:] == [b"want " + b"b" * 40 + b"\n", None, b"have " + b"c" * 40 + b"\n", b"done\n"]


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (encode(b"ERR access denied\n"), "target: access denied"),
        (encode(b"NAK\n") + encode(b"\x03upload-pack: out of memory\n"), "out of memory"),
        (encode(b"hello\n"), "expected ACK/NAK"),
        (encode(b"NAK\n") + FLUSH, "before the end of its pack"),
        (encode(b"NAK\n") + encode(b"\x09x"), "unknown side-band"),
    ],
)
def test_fetch_answers_that_fail(pushed: tuple[Captured, bytes], answer: bytes, match: str) -> None:
    cap, _ = pushed
    adv = machine_for(cap).request.advertisement
    with pytest.raises(FetchError, match=match):
        FetchResponse(adv).feed(answer)


def test_fetch_answer_with_the_real_pack(pushed: tuple[Captured, bytes], tmp_path: Path) -> None:
    cap, raw = pushed
    adv = machine_for(cap).request.advertisement
    _, pack = pack_of(raw)
    resp = FetchResponse(adv, spool_dir=str(tmp_path))
    answer = encode(b"NAK\n") + b"".join(
        encode(b"\x01" + pack[i : i + 100]) for i in range(0, len(pack), 100)
    )
    resp.feed(answer)
    assert not resp.done
    resp.feed(FLUSH)
    assert resp.done and b"".join(resp.pack.chunks()) == pack
    with pytest.raises(FetchError):
        resp.feed(b"0000")
