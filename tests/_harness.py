"""Run a test function on W gloo ranks in spawned processes, with a hard timeout.

    results = run_distributed(fn, world_size, *args, timeout=60.0, **kwargs)

`fn(rank, world_size, *args, **kwargs)` runs on every rank with the default process group (gloo,
rendezvous through a fresh file, so no ports) already initialized; the per-rank return values
come back as a list. Workers are kept in a pool per world size and reused between calls (each
spawn pays a torch import). If any rank raises, the call waits a moment for the other ranks'
errors, kills the pool and raises `DistributedTestError` carrying every failing rank's traceback.
If the ranks do not all finish within `timeout`, the pool is killed and the error names the
ranks still running. After each call the ranks meet at a barrier; a pool whose connections broke
(a test that made a transfer time out on purpose) is retired. `fn` must be a module-level
function (spawn pickles it by reference).
"""

from __future__ import annotations

import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

_GRACE_S = 2.0  # after a first failure, how long to wait for the other ranks' errors
_POOLS: dict[int, _Pool] = {}


class DistributedTestError(AssertionError):
    """A rank raised, died, or the ranks did not finish in time."""


def _worker(rank: int, world_size: int, init_file: str, jobs, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # W ranks share 2 cores
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=120),
    )
    while True:
        job = jobs.get()
        if job is None:
            break
        job_id, env, fn, args, kwargs = job
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            outcome = (True, fn(rank, world_size, *args, **kwargs))
        except BaseException:  # noqa: BLE001 - every failure goes back to the parent
            outcome = (False, traceback.format_exc())
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        try:  # a job that timed out a transfer leaves gloo pairs closed: retire the pool
            dist.barrier()
            healthy = True
        except RuntimeError:
            healthy = False
        results.put((job_id, rank, healthy, *outcome))
    dist.destroy_process_group()


class _Pool:
    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self._dir = tempfile.TemporaryDirectory(prefix="ringattn-dist-")
        init_file = os.path.join(self._dir.name, "rendezvous")
        self.results = ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(world_size)]
        self.procs = [
            ctx.Process(
                target=_worker,
                args=(rank, world_size, init_file, self.jobs[rank], self.results),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in self.procs:
            p.start()
        self._next_job = 0
        self.healthy = True

    def run(self, fn, args, kwargs, timeout: float) -> list:
        self._next_job += 1
        job_id = self._next_job
        env = {k: v for k, v in os.environ.items() if k.startswith("RINGATTN_")}
        for q in self.jobs:
            q.put((job_id, env, fn, args, kwargs))
        deadline = time.monotonic() + timeout
        done: dict[int, object] = {}
        errors: dict[int, str] = {}
        while len(done) + len(errors) < self.world_size and time.monotonic() < deadline:
            try:
                jid, rank, healthy, ok, payload = self.results.get(timeout=0.2)
            except queue.Empty:
                for rank, p in enumerate(self.procs):
                    if not p.is_alive() and rank not in done and rank not in errors:
                        errors[rank] = f"process died with exit code {p.exitcode}"
            else:
                if jid != job_id:
                    continue
                self.healthy &= healthy
                if ok:
                    done[rank] = payload
                else:
                    errors[rank] = payload
            if errors:  # give the other ranks a moment to report their own errors
                deadline = min(deadline, time.monotonic() + _GRACE_S)
        if errors or len(done) < self.world_size:
            self.kill()
            pending = sorted(set(range(self.world_size)) - set(done) - set(errors))
            parts = [f"rank {r} failed:\n{errors[r]}" for r in sorted(errors)]
            if pending:
                why = (
                    "killed after another rank failed" if errors else f"timed out after {timeout}s"
                )
                parts.append(f"ranks {pending} still running: {why}")
            raise DistributedTestError(
                f"{fn.__name__} on {self.world_size} ranks:\n" + "\n".join(parts)
            )
        if not self.healthy:
            self.kill()
        return [done[r] for r in range(self.world_size)]

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=5)
        self._dir.cleanup()
        _POOLS.pop(self.world_size, None)

    def close(self) -> None:
        for q in self.jobs:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
        self.kill()


def run_distributed(fn, world_size: int, *args, timeout: float = 60.0, **kwargs) -> list:
    """Run `fn(rank, world_size, *args, **kwargs)` on `world_size` gloo ranks; see module doc.

    Environment variables named RINGATTN_* in the calling process are set in every rank for the
    duration of the call (so tests can use monkeypatch.setenv).
    """
    pool = _POOLS.get(world_size)
    if pool is None:
        pool = _POOLS[world_size] = _Pool(world_size)
    return pool.run(fn, args, kwargs, timeout)


def shutdown_pools() -> None:
    """Stop every pool (called once at the end of the test session)."""
    for pool in list(_POOLS.values()):
        pool.close()
