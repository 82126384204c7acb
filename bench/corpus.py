"""Deterministic terminal output for benchmarks: ordinary coloured output as shells,
ls, git, ps, compilers and JSON loggers print it, optionally with card numbers mixed in."""

from __future__ import annotations

import random

from recorder.masking import luhn_complete

CSI = "\x1b["


def _ls(r: random.Random) -> str:
    kind = r.choice(["01;34m", "01;32m", "0m", "01;36m"])
    return (
        f"{r.choice(['drwxr-xr-x', '-rw-r--r--', '-rwxr-xr-x', 'lrwxrwxrwx'])} "
        f"{r.randint(1, 40):>2} root root {r.randint(0, 9_999_999):>8} "
        f"Nov {r.randint(1, 30):>2} {r.randint(0, 23):02}:{r.randint(0, 59):02} "
        f"{CSI}{kind}{r.choice(['bin', 'lib', 'main.py', 'README.md', 'data.json'])}{CSI}0m\r\n"
    )


def _git(r: random.Random) -> str:
    sha = "".join(r.choice("0123456789abcdef") for _ in range(40))
    return (
        f"{CSI}33mcommit {sha}{CSI}m\r\nAuthor: Dev <dev@example.com>\r\n"
        f"Date:   Fri Nov {r.randint(1, 30)} {r.randint(0, 23):02}:{r.randint(0, 59):02}:"
        f"{r.randint(0, 59):02} 2026 +0000\r\n\r\n    fix: handle case {r.randint(1, 9999)}\r\n\r\n"
    )


def _ps(r: random.Random) -> str:
    return (
        f"root     {r.randint(1, 99999):>6}  {r.random() * 10:.1f}  {r.random() * 5:.1f} "
        f"{r.randint(1000, 999999):>7} {r.randint(100, 99999):>6} ?        Ss   "
        f"{r.randint(0, 23):02}:{r.randint(0, 59):02}   0:{r.randint(0, 59):02} /usr/bin/app --port {r.randint(1024, 65535)}\r\n"
    )


def _log(r: random.Random) -> str:
    level = r.choice([f"{CSI}32mINFO{CSI}0m", f"{CSI}33mWARN{CSI}0m", f"{CSI}31mERROR{CSI}0m"])
    return (
        f"2026-11-27T{r.randint(0, 23):02}:{r.randint(0, 59):02}:{r.randint(0, 59):02}."
        f"{r.randint(0, 999999):06}Z {level} request id=550e8400-e29b-41d4-a716-"
        f"{r.randint(0, 16**12):012x} ip=10.{r.randint(0, 255)}.{r.randint(0, 255)}."
        f"{r.randint(0, 255)} latency_ms={r.randint(1, 900)} bytes={r.randint(0, 10**7)}\r\n"
    )


def _cc(r: random.Random) -> str:
    return (
        f"{CSI}1msrc/module_{r.randint(1, 99)}.c:{r.randint(1, 4000)}:{r.randint(1, 80)}: "
        f"{CSI}35mwarning:{CSI}0m unused variable 'x{r.randint(1, 99)}' [-Wunused-variable]\r\n"
    )


GENERATORS = [_ls, _git, _ps, _log, _cc]


def _pan(r: random.Random) -> str:
    prefix = r.choice(["411111", "555555", "378282", "601111", "353011"])
    length = 15 if prefix == "378282" else 16
    body = prefix + "".join(r.choice("0123456789") for _ in range(length - len(prefix) - 1))
    pan = luhn_complete(body)
    style = r.randrange(4)
    if style == 1:
        return " ".join(pan[i : i + 4] for i in range(0, len(pan), 4))
    if style == 2:
        return "-".join(pan[i : i + 4] for i in range(0, len(pan), 4))
    if style == 3:
        return pan[:4] + f"{CSI}1m" + pan[4:8] + f"{CSI}0m" + pan[8:]
    return pan


def terminal_output(size: int, pan_every: int = 0, seed: int = 7) -> bytes:
    """``size`` bytes of coloured terminal output; with ``pan_every`` > 0, one card
    number roughly every ``pan_every`` bytes."""
    r = random.Random(seed)
    parts: list[str] = []
    total = 0
    next_pan = pan_every
    while total < size:
        line = r.choice(GENERATORS)(r)
        if pan_every and total >= next_pan:
            line = f"| {r.randint(1, 99999):>6} | {_pan(r)} | ok |\r\n" + line
            next_pan += pan_every
        parts.append(line)
        total += len(line)
    return "".join(parts).encode()[:size]
