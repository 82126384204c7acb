"""A scripted stand-in for a coding agent that prints cardholder data.

The test card numbers are built at run time (prefix + Luhn check digit) so no card
number appears as a literal in the source tree.
"""

from __future__ import annotations

import sys
import time

from recorder.masking import luhn_complete

BOLD, DIM, RED, GREEN, RESET = "\x1b[1m", "\x1b[2m", "\x1b[31m", "\x1b[32m", "\x1b[0m"


def main() -> None:
    """Print a coloured ``SELECT``-like table with test PANs, track data and a key."""
    visa = luhn_complete("411111111111111")
    mc = luhn_complete("555555555555444")
    amex = luhn_complete("37828224631000")
    rows = [
        ("1001", "alice", visa, "ok"),
        ("1002", "bob", f"{mc[:4]} {mc[4:8]} {mc[8:12]} {mc[12:]}", "ok"),
        ("1003", "carol", f"{amex[:4]}-{amex[4:10]}-{amex[10:]}", "declined"),
    ]
    out = sys.stdout
    out.write(f"{BOLD}$ psql -c 'select id, name, pan, status from cards'{RESET}\r\n")  # noqa: S608
    out.write(f"{BOLD}{'id':>5} | {'name':<6} | {'pan':<20} | status{RESET}\r\n")
    for rid, name, pan, status in rows:
        colour = GREEN if status == "ok" else RED
        # Colour changes between the digits must not hide the number.
        coloured_pan = pan[:4] + DIM + pan[4:8] + RESET + pan[8:]
        out.write(f"{rid:>5} | {name:<6} | {coloured_pan:<{20 + len(DIM + RESET)}} | ")
        out.write(f"{colour}{status}{RESET}\r\n")
        out.flush()
        time.sleep(0.05)
    out.write(f"track 2 from a card reader log: ;{visa}=25121010000000000000?\r\n")
    out.write("deploy key: " + "sk_" + "live_" + "a1B2c3D4e5F6g7H8i9J0k1L2" + "\r\n")
    # Typed out slowly, one digit at a time in two bursts: the stream masker holds
    # back a possible card number across chunks.
    out.write("pan split across writes: ")
    out.flush()
    out.write(visa[:7])
    out.flush()
    time.sleep(0.005)
    out.write(visa[7:] + "\r\n")
    out.write("(3 rows)\r\n")
    out.flush()


if __name__ == "__main__":
    main()
