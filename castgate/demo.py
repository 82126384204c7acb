"""``castgate demo``: the embedded default, end to end, in a temporary directory.

Until the relay lands this shows the recorder: ``init``, a recorded agent that prints
card numbers, the masked cast as ``asciinema cat`` would print it, ``verify`` on the
sealed cast and on a tampered copy.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from castgate.initdir import init_dir
from castgate.rec import record_command
from castgate.runtime import load_runtime
from recorder.integrity import chain_path, manifest_path, verify_cast
from recorder.signing import load_public


def cast_output(path: Path) -> str:
    """The concatenated ``o`` events of a cast (what ``asciinema cat`` prints)."""
    out = []
    with path.open(encoding="utf-8") as fh:
        next(fh)
        for line in fh:
            ev = json.loads(line)
            if ev[1] == "o":
                out.append(ev[2])
    return "".join(out)


def run_demo(workdir: Path | None = None) -> int:
    """Run the demo; returns the process exit status."""
    base = workdir or Path(tempfile.mkdtemp(prefix="castgate-demo-"))
    say = sys.stdout.write
    say(f"castgate demo in {base}\n\n== castgate init\n")
    res = init_dir(base)
    say(f"config {res.config_path}\nsigning public key {res.public_key}\n")
    rt = load_runtime(str(res.config_path))
    cast = rt.config.recordings_dir / "demo-agent.cast"
    say("\n== castgate rec: the demo agent prints card numbers (what the agent sees)\n")
    sys.stdout.flush()
    status = record_command(rt, cast, [sys.executable, "-m", "castgate.demo_agent"])
    say(f"\n[agent exited with status {status}]\n")
    say(f"\n== the recording, as 'asciinema cat {cast.name}' prints it\n")
    say(cast_output(cast).replace("\r\n", "\n"))
    pub = load_public(res.public_key)
    say("\n== castgate verify\n")
    report = verify_cast(cast, pub)
    say(report.line() + "\n")
    tampered = base / "tampered.cast"
    shutil.copy(cast, tampered)
    shutil.copy(chain_path(cast), chain_path(tampered))
    shutil.copy(manifest_path(cast), manifest_path(tampered))
    # An insider edits the transcript: "declined" becomes "approved".
    tampered.write_bytes(tampered.read_bytes().replace(b"declined", b"approved", 1))
    say('\n== castgate verify on a copy where "declined" was edited to "approved"\n')
    say(verify_cast(tampered, pub).line() + "\n")
    store = rt.store
    if store is not None:
        session = store.list_sessions(limit=1)[0]
        say(
            f"\n== audit store: session {session['id']} identity={session['identity']} "
            f"status={session['status']} masked={session['masking_counts']}\n"
        )
    rt.close()
    say(f"\nFiles are in {base}; play the cast with: asciinema play {cast}\n")
    return 0 if report.verdict.exit_code == 0 and status == 0 else 1
