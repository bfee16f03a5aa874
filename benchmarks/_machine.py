"""Shared by the benchmark scripts (run them as scripts): a quiet-machine gate and rewriting marked blocks of docs.

Timings on a 2-core machine are only honest when nothing else runs: :func:`settle` waits for the machine to be quiet
and records ``os.getloadavg()``; the scripts refuse to write numbers into the docs when it was not.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from vision_attn._io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]


def cpu_busy(seconds: float = 5.0) -> float:
    """Fraction of all CPU time that was busy over ``seconds`` (from ``/proc/stat``; 0.0 where it is missing)."""

    def read() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    if not Path("/proc/stat").exists():
        return 0.0
    total0, idle0 = read()
    time.sleep(seconds)
    total1, idle1 = read()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def settle(max_load: float, timeout: float) -> dict[str, Any]:
    """Wait until the machine is quiet — 1-minute load average below ``max_load`` and under 15 % CPU use over 5 s —
    or ``timeout`` seconds passed; returns ``{'loadavg', 'cpu_busy', 'quiet'}`` of that moment."""
    start = time.perf_counter()
    while True:
        busy = cpu_busy()
        load = os.getloadavg()
        quiet = load[0] < max_load and busy < 0.15
        if quiet or time.perf_counter() - start > timeout:
            return {"loadavg": [round(v, 2) for v in load], "cpu_busy": round(busy, 3), "quiet": quiet}
        time.sleep(5)


def write_block(name: str, text: str, files: list[Path]) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in each of ``files``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    for path in files:
        content = path.read_text()
        if not block.search(content):
            raise RuntimeError(f"{path} has no {start} ... {end} block to update")
        atomic_write_text(path, block.sub(lambda _: f"{start}\n{text}\n{end}", content))
        print(f"updated {path}")


def docs_allowed(quiet: bool, allow_load: bool, busy_when: str) -> bool:
    """Whether numbers may go into the docs: the machine was ``quiet`` (or ``allow_load`` overrides); else say on
    stderr that it was busy ``busy_when`` and return False."""
    if quiet or allow_load:
        return True
    print(f"not writing docs: the machine was busy {busy_when}; rerun on an idle machine", file=sys.stderr)
    return False


def publish(name: str, text: str, files: list[Path], load: dict[str, Any], allow_load: bool = False) -> int:
    """Write ``text`` into the ``name`` blocks of ``files`` if the machine was quiet (``load`` from :func:`settle`)
    or ``allow_load``; else say why not. Returns the exit code (0 written, 1 refused)."""
    if not docs_allowed(load["quiet"], allow_load, f"({load})"):
        return 1
    write_block(name, text, files)
    return 0
