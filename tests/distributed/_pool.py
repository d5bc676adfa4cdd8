"""A pool of gloo worker processes that run test tasks together, with a deadline on every task.

Spawning P processes costs seconds (each imports torch), so each pool is started once and runs many
tasks: every task is a function ``module:name`` that all ranks call with the same arguments.  A
task that does not finish on every rank within its deadline is a hang: the pool kills its workers
(the processes it started, by handle) and the test fails with the ranks that did not answer, so a
deadlock fails CI quickly instead of stalling it.  The process group also carries a timeout as a
last resort.
"""
from __future__ import annotations

import datetime
import importlib
import os
import queue
import tempfile
import time
import traceback

import torch.multiprocessing as mp

STARTUP_TIMEOUT_S = 180.0
TASK_TIMEOUT_S = 120.0
PG_TIMEOUT_S = 90.0


class WorkerHang(AssertionError):
    """Some ranks did not finish a task within its deadline (a deadlock, or a crashed peer)."""


class WorkerError(AssertionError):
    """A task raised on some rank; the message carries every failing rank's traceback."""


def _worker_main(rank, world_size, init_file, task_q, result_q):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # several ranks share two cores
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    except BaseException:
        result_q.put(("init", rank, False, traceback.format_exc()))
        return
    result_q.put(("init", rank, True, None))
    while True:
        item = task_q.get()
        if item is None:
            break
        task_id, target, args, kwargs = item
        try:
            mod_name, fn_name = target.split(":")
            fn = getattr(importlib.import_module(mod_name), fn_name)
            result_q.put((task_id, rank, True, fn(*args, **kwargs)))
        except BaseException:
            result_q.put((task_id, rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class DistPool:
    def __init__(self, world_size: int):
        self.world_size = world_size
        self._ctx = mp.get_context("spawn")
        fd, self._init_file = tempfile.mkstemp(prefix="fastclip_dist_")
        os.close(fd)
        os.unlink(self._init_file)  # the file store creates it
        self._task_qs = [self._ctx.Queue() for _ in range(world_size)]
        self._result_q = self._ctx.Queue()
        self._procs = [self._ctx.Process(target=_worker_main, daemon=True,
                                         args=(r, world_size, self._init_file, self._task_qs[r], self._result_q))
                       for r in range(world_size)]
        for p in self._procs:
            p.start()
        self._next_id = 0
        self.broken = False
        self._collect("init", STARTUP_TIMEOUT_S)

    def run(self, target: str, *args, timeout: float = TASK_TIMEOUT_S, **kwargs) -> list:
        """Run ``target`` ("module:function") on every rank; returns the per-rank results, rank order."""
        if self.broken:
            raise RuntimeError("this pool was killed after a hang; start a new one")
        task_id = self._next_id
        self._next_id += 1
        for q in self._task_qs:
            q.put((task_id, target, args, kwargs))
        return self._collect(task_id, timeout)

    def _collect(self, task_id, timeout: float) -> list:
        deadline = time.monotonic() + timeout
        results, errors = {}, {}
        while len(results) + len(errors) < self.world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [r for r in range(self.world_size) if r not in results and r not in errors]
                self.kill()
                detail = "".join(f"\n--- rank {r} raised:\n{tb}" for r, tb in sorted(errors.items()))
                raise WorkerHang(f"task {task_id}: ranks {missing} did not finish within {timeout:.0f} s "
                                 f"(a hang); the workers were killed{detail}")
            try:
                tid, rank, ok, payload = self._result_q.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                if dead:
                    self.kill()
                    raise WorkerHang(f"task {task_id}: worker ranks {dead} died")
                continue
            if tid != task_id:  # a late answer of an earlier task; cannot happen unless a task was abandoned
                continue
            (results if ok else errors)[rank] = payload
        if errors:
            raise WorkerError("".join(f"\n--- rank {r}:\n{tb}" for r, tb in sorted(errors.items())))
        return [results[r] for r in range(self.world_size)]

    def kill(self) -> None:
        self.broken = True
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(timeout=10)

    def close(self) -> None:
        if not self.broken:
            for q in self._task_qs:
                q.put(None)
            for p in self._procs:
                p.join(timeout=20)
        self.kill()
        if os.path.exists(self._init_file):
            os.unlink(self._init_file)
