"""launch/selftest.py under torchrun on 2 CPU ranks: it passes, and it catches a failure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_selftest(*extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["launch/selftest.py", "--quick", "--device", "cpu", "--timeout", "60", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def table(stdout: str) -> dict[str, list[str]]:
    """check name -> the other cells of its row (ranks, worst, max error, tolerance, s, verdict)."""
    rows = [line.strip("|").split("|") for line in stdout.splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in row] for row in rows[1:]]  # rows[0] is the header
    return {row[0]: row[1:] for row in cells}


def test_selftest_passes_on_two_ranks():
    proc = run_selftest()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = table(proc.stdout)
    kinds = {name.split()[0] for name in rows}
    assert kinds == {"flash", "ring", "layout", "model"}, rows
    assert {name.split()[1] for name in rows if name.startswith("ring")} == {
        "contiguous",
        "zigzag",
        "striped",
    }
    assert all(row[-1] == "PASS" and row[0] == "2/2 ok" for row in rows.values()), proc.stdout
    assert f"PASSED: all {len(rows)} checks on 2 ranks" in proc.stdout


def test_injected_failure_on_one_rank_fails_the_run():
    # --inject-failure: rank 1 (only) perturbs the output of the first ring check.
    proc = run_selftest("--inject-failure")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    rows = table(proc.stdout)
    failed = {name: row for name, row in rows.items() if row[-1] == "FAIL"}
    assert len(failed) == 1, proc.stdout
    ((name, row),) = failed.items()
    assert name.startswith("ring") and row[0] == "failed on 1" and row[1] == "out", proc.stdout
    assert sum(row[-1] == "PASS" for row in rows.values()) == len(rows) - 1
    assert f"FAILED: 1 of {len(rows)} checks" in proc.stdout
    assert f"[rank 1] FAIL {name}" in proc.stderr
