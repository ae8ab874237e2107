"""The process pool of the benchmark drivers (benchmarks/suite.py, benchmarks/frontier.py): each run is its own
process, at most ``jobs`` at once; a finished one is recorded as soon as it ends, so a killed driver loses only its
running runs (and those resume from their checkpoints)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

Item = Any


def launch(cmd: list[str], log_path: Path, cwd: Path, threads: int | None) -> tuple[subprocess.Popen, Any]:
    """``cmd`` as a child process writing to ``log_path`` (appended), one OpenMP pool of ``threads`` when given."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "a")  # noqa: SIM115 (closed by run_pool when the run ends)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd), log


def ended_run(runs: Path, run: str, returncode: int) -> dict[str, Any] | None:
    """The metrics of a run that ended, or None (and one FAILED line naming its log) when it did not finish."""
    metrics_path = runs / run / "metrics.json"
    if returncode != 0 or not metrics_path.is_file():
        print(f"    FAILED {run} (exit {returncode}): see {runs / run}.log", flush=True)
        return None
    return json.loads(metrics_path.read_text())


def start_limit(max_runs: int | None, deadline_s: float | None) -> Callable[[int], bool]:
    """``run_pool``'s ``may_start``: no new run past ``max_runs`` started or ``deadline_s`` seconds from now."""
    deadline = time.time() + max(deadline_s, 0.0) if deadline_s is not None else None
    return lambda started: not ((max_runs is not None and started >= max_runs)
                                or (deadline is not None and time.time() >= deadline))


def run_pool(ready: Callable[[], Iterable[tuple[str, Item]]],
             start: Callable[[str, Item], tuple[subprocess.Popen, Any] | None],
             finish: Callable[[str, Item, int, float], bool], *, jobs: int, poll_s: Callable[[], float],
             may_start: Callable[[int], bool] = lambda started: True) -> tuple[int, set[str]]:
    """Run what ``ready()`` lists (``(key, item)`` pairs, asked again after every finished run), ``jobs`` at a time.

    ``start(key, item)`` launches a run and returns ``(process, log file)``, or None when it needed no process (a
    result recorded without running). ``finish(key, item, returncode, seconds)`` records an ended run and says
    whether it succeeded; a failed key is not started again by this call. ``may_start(started)`` can stop new starts
    (a deadline, --max-runs). Returns (runs started, failed keys). On any exit the running children are terminated.
    """
    running: dict[str, tuple[subprocess.Popen, Any, Item, float]] = {}
    failed: set[str] = set()
    started = 0
    skipped: set[str] = set()  # keys whose start needed no process (recorded at once): not started again
    try:
        while True:
            progressed = False
            for key, item in ready():
                if len(running) >= jobs or not may_start(started):
                    break
                if key in running or key in failed or key in skipped:
                    continue
                launched = start(key, item)
                if launched is None:
                    skipped.add(key)
                    progressed = True  # what it recorded may open new runs: read ready() again
                    continue
                running[key] = (*launched, item, time.time())
                started += 1
            if not running:
                if progressed:
                    continue
                break
            time.sleep(poll_s())
            for key, (proc, log, item, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[key]
                if not finish(key, item, proc.returncode, time.time() - t0):
                    failed.add(key)
    finally:
        for proc, *_ in running.values():  # interrupted: the children stop too; their checkpoints resume them
            proc.terminate()
    return started, failed
