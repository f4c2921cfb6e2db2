"""The multi-rank launcher the ZeRO-3 jobs run on: what a dead rank reports, when a job runs again,
and that a timeout leaves no rank behind (real torchrun, trivial rank scripts)."""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

import pytest

from gemma4_bridge.testing.zero3_job import failure_report, launch_cpu_ranks

RANK = """
import os, sys, time
rank = int(os.environ["RANK"])
print(f"rank {rank} says hello", flush=True)
marker = sys.argv[2] + f".{rank}"
mode = sys.argv[1]
if rank == 1 and mode == "abort-once" and not os.path.exists(marker):
    open(marker, "w").close()
    print("rank 1 about to abort", file=sys.stderr, flush=True)
    os.abort()
if rank == 1 and mode == "error":
    raise RuntimeError("rank 1 failed its check")
if mode == "hang":
    open(marker, "w").write(str(os.getpid()))
    time.sleep(600)
"""


@pytest.fixture
def rank_script(tmp_path: Path) -> Path:
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    return script


def test_a_rank_killed_by_a_signal_is_reported_and_run_again(rank_script: Path, tmp_path: Path) -> None:
    with pytest.warns(RuntimeWarning, match="SIGABRT") as warned:
        proc = launch_cpu_ranks([str(rank_script), "abort-once", str(tmp_path / "m")], world_size=2)
    assert proc.returncode == 0, failure_report(proc)
    first = str(warned[0].message)
    assert "[rank 1] rank 1 about to abort" in first and "[rank 0] rank 0 says hello" in first
    assert "[rank 1] rank 1 says hello" in proc.stdout


def test_a_python_error_fails_at_once_with_the_rank_s_traceback(rank_script: Path, tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        proc = launch_cpu_ranks([str(rank_script), "error", str(tmp_path / "m")], world_size=2)
    assert not [w for w in seen if issubclass(w.category, RuntimeWarning)], "a Python error must not be run again"
    assert proc.returncode != 0
    report = failure_report(proc)
    assert "[rank 1] RuntimeError: rank 1 failed its check" in report and "exitcode" in report


def test_a_timeout_leaves_no_rank_behind(rank_script: Path, tmp_path: Path) -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        launch_cpu_ranks([str(rank_script), "hang", str(tmp_path / "m")], world_size=2, timeout_s=10)
    pids = [int((tmp_path / f"m.{rank}").read_text()) for rank in (0, 1)]
    assert not [pid for pid in pids if _alive(pid)], "a rank outlived its job"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
