"""Starting the rank processes ourselves: the calling process is rank 0, workers are spawned.

Failure handling, so nothing hangs:
- a worker reports its exception to rank 0 through a queue, then exits non-zero;
- rank 0 watches every worker; when one dies, rank 0 logs that rank's error and, if its own
  collective has not failed by itself within a grace period, ends the job (exit code 1);
- a worker whose parent (rank 0) is gone exits at once;
- collectives have the spec's timeout.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable

from tpinfer.engine.runtime import EngineSpec, RankEngine, load_engine
from tpinfer.parallel.context import ParallelContext

log = logging.getLogger(__name__)

GRACE_S = 10.0


class RankFailure(RuntimeError):
    """Another rank failed; the message carries that rank's error."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launcher:
    """Rank 0 in this process plus ``tp x pp x dp - 1`` spawned workers, all on this host."""

    def __init__(self, spec: EngineSpec, on_failure: Callable[[str], None] | None = None) -> None:
        self.spec = spec
        # Called from the watchdog thread with the failure message when a worker dies (must not block).
        self.on_failure = on_failure
        self.world_size = spec.mesh.world_size
        self.processes: list[mp.Process] = []
        self.failure: str | None = None
        self._closing = False
        self._errors = None

    def start(self, progress: bool = True) -> RankEngine:
        if self.world_size == 1:
            return load_engine(self.spec, ParallelContext.single(), progress)
        port = free_port()
        context = mp.get_context("spawn")
        self._errors = context.SimpleQueue()
        init_method = f"tcp://127.0.0.1:{port}"
        for rank in range(1, self.world_size):
            process = context.Process(
                target=_worker_main,
                args=(self.spec.to_dict(), rank, self.world_size, init_method, self._errors, os.getpid()),
                name=f"tpinfer-rank{rank}",
                daemon=True,
            )
            process.start()
            self.processes.append(process)
        threading.Thread(target=self._watch, name="tpinfer-watch", daemon=True).start()
        try:
            ctx = ParallelContext.initialize(
                0, self.world_size, 0, self.world_size, init_method, self.spec.timeout_s, self.spec.all_reduce,
                self.spec.mesh)
            return load_engine(self.spec, ctx, progress)
        except Exception as exc:
            self.raise_failure(exc)
            raise

    def raise_failure(self, exc: BaseException) -> None:
        """Re-raise a collective error as the failing worker's own error when there is one."""
        start = time.monotonic()
        while self.failure is None and time.monotonic() < start + 3.0 and self.processes:
            # A peer killed a moment ago can still look alive when its socket has already closed: give it half a
            # second to show up as dead before taking the error for this rank's own.
            if all(p.is_alive() for p in self.processes) and time.monotonic() > start + 0.5:
                break
            time.sleep(0.05)
        if self.failure is not None:
            self.shutdown(force=True)
            raise RankFailure(self.failure) from exc

    def _watch(self) -> None:
        sentinels = {p.sentinel: p for p in self.processes}
        while sentinels and not self._closing:
            for sentinel in multiprocessing.connection.wait(list(sentinels), timeout=0.5):
                process = sentinels.pop(sentinel)
                process.join(1)  # the exit code can lag the sentinel by a moment
                if self._closing or process.exitcode == 0:
                    continue
                process = self._root_cause(process)
                self.failure = self._read_error(process)
                log.error("%s", self.failure)
                threading.Timer(GRACE_S, self._end_job).start()
                if self.on_failure is not None:
                    self.on_failure(self.failure)
                return

    def _root_cause(self, first: mp.Process) -> mp.Process:
        """The worker that failed first in cause, not only in time: when one dies, its peers' collectives fail a
        moment later ("connection closed by peer") and they exit too; a worker killed by a signal, or one that
        exited without reporting an error, is the cause."""
        time.sleep(0.3)
        dead = [p for p in self.processes if p.exitcode not in (None, 0)]
        killed = [p for p in dead if p.exitcode is not None and p.exitcode < 0]
        return killed[0] if killed else first

    def _read_error(self, process: mp.Process) -> str:
        rank = int(process.name.removeprefix("tpinfer-rank"))
        reported = {}
        while self._errors is not None and not self._errors.empty():
            err_rank, text = self._errors.get()
            reported.setdefault(err_rank, text)
        if rank in reported:
            return f"rank {rank} failed: {reported[rank]}"
        return f"rank {rank} exited with code {process.exitcode}"

    def _end_job(self) -> None:
        if self._closing:
            return
        print(f"tpinfer: {self.failure}; stopping every rank", file=sys.stderr, flush=True)
        self.shutdown(force=True)
        os._exit(1)

    def shutdown(self, engine: RankEngine | None = None, force: bool = False) -> None:
        if self._closing:
            return
        self._closing = True
        if engine is not None and not force and self.failure is None:
            try:
                engine.stop_workers()
            except Exception:  # a dead worker: fall through to terminate
                force = True
        deadline = time.monotonic() + (1.0 if force else 10.0)
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
        if engine is not None:
            engine.ctx.close()


def _worker_main(spec: dict, rank: int, world_size: int, init_method: str, errors, parent_pid: int) -> None:
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    logging.basicConfig(level=logging.WARNING, format=f"rank {rank} %(levelname)s %(name)s: %(message)s")
    try:
        spec_obj = EngineSpec(**spec)
        ctx = ParallelContext.initialize(
            rank, world_size, rank, world_size, init_method, spec_obj.timeout_s, spec_obj.all_reduce, spec_obj.mesh)
        engine = load_engine(spec_obj, ctx)
        engine.serve_forever()
        ctx.close()
    except BaseException as exc:  # report, then leave: rank 0 turns this into the user's error
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        errors.put((rank, text))
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def _exit_with_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(0.5)
