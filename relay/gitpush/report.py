"""git's own report-status answer, for refusing a held push the way a pre-receive hook
does: `unpack ok`, then `ng <ref> <reason>` for every ref, so `git push` prints
`! [remote rejected] main -> main (<reason>)` and exits non-zero.

report-status and report-status-v2 are the same for refusals (v2 only adds `option`
lines after an `ok`). With side-band-64k the report travels in band 1 and a message in
band 2 shows as `remote: ...`; receive-pack ends a side-band answer with a flush.

The target's receive-pack, which has sent its advertisement and waits for commands,
gets `TARGET_CANCEL` (an empty command list: it exits 0 and says nothing); cutting its
channel instead makes it print "fatal: the remote end hung up unexpectedly" on stderr,
which the relay forwards.
"""

from __future__ import annotations

import re

from relay.gitpush.advert import raw_name
from relay.gitpush.pktline import FLUSH, MAX_DATA, encode
from relay.gitpush.receive import PushRequest

# What the target gets when the push is refused: no commands, so nothing happens.
TARGET_CANCEL = FLUSH
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]+")
_MAX_REASON = 400
_SIDEBAND_64K = MAX_DATA - 1
# The old side-band caps a packet at 1000 bytes, header included.
_SIDEBAND_1K = 1000 - 5


def clean_reason(reason: str) -> str:
    """One line, no control characters (they would end or forge report lines)."""
    text = _UNPRINTABLE.sub(" ", reason).strip() or "denied"
    return text[:_MAX_REASON]


def _sideband(band: int, payload: bytes, size: int) -> bytes:
    out = bytearray()
    for i in range(0, len(payload), size):
        out += encode(bytes([band]) + payload[i : i + size])
    return bytes(out)


def refusal(request: PushRequest, reason: str, *, message: str | None = None) -> bytes:
    """The bytes to send the client instead of the target's answer.

    Args:
        request: the complete held push.
        reason: why, shown by `git push` beside each ref.
        message: shown as `remote: ...` when side-band is on (defaults to the reason).

    Returns:
        The answer; empty when the client asked for no report (it then sees only that
        the remote end hung up, which also fails the push).
    """
    caps = request.caps
    why = clean_reason(reason).encode()
    report = bytearray()
    if "report-status" in caps or "report-status-v2" in caps:
        report += encode(b"unpack ok\n")
        for cmd in request.commands:
            report += encode(b"ng " + raw_name(cmd.ref) + b" " + why + b"\n")
        report += FLUSH
    if "side-band-64k" not in caps and "side-band" not in caps:
        return bytes(report)
    size = _SIDEBAND_64K if "side-band-64k" in caps else _SIDEBAND_1K
    note = clean_reason(message if message is not None else reason)
    out = bytearray(_sideband(2, f"castgate: {note}\n".encode(), size))
    out += _sideband(1, bytes(report), size)
    out += FLUSH
    return bytes(out)
