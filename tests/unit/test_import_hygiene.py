"""relay/, recorder/ and replay/ import without textual or the console (DESIGN.md's
dependency direction); import-linter checks the finer contracts in CI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize("package", ["recorder", "relay", "replay", "castgate.cli"])
def test_core_packages_import_without_textual(package: str) -> None:
    code = (
        "import importlib, json, pkgutil, sys\n"
        f"pkg = importlib.import_module({package!r})\n"
        "for m in pkgutil.walk_packages(getattr(pkg, '__path__', []), pkg.__name__ + '.'):\n"
        "    if '.migrations' not in m.name:\n"
        "        importlib.import_module(m.name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded = json.loads(out)
    assert not [m for m in loaded if m == "textual" or m.startswith("textual.")]
    if package != "castgate.cli":
        assert not [m for m in loaded if m == "console" or m.startswith("console.")]


def test_recorder_depends_on_nothing_of_ours() -> None:
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import recorder\n"
        "for m in pkgutil.walk_packages(recorder.__path__, 'recorder.'):\n"
        "    if '.migrations' not in m.name:\n"
        "        importlib.import_module(m.name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    ours = {"relay", "replay", "console", "castgate"}
    assert not [m for m in json.loads(out) if m.split(".")[0] in ours]
