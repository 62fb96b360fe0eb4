"""Rank 0's engine thread: the one thread that steps the scheduler and so issues every collective.

torch.distributed needs each rank to issue the same collectives in the same order, so once serving
starts only this thread talks to the other ranks (including the final "stop"). HTTP handlers on the
event loop only queue sequences (``Scheduler.add``) and read their events.

Idle, the thread blocks on the scheduler's condition variable: no busy loop. The workers meanwhile
block in a broadcast, and a broadcast gives up after the collective timeout (``--timeout``), which
would kill an idle server's workers. So after ``heartbeat_s`` without a step, rank 0 sends an empty
step: it keeps the workers inside their timeout, costs two tiny broadcasts, and finds a dead worker
even when no request is running (the launcher's watchdog usually finds it first).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from tpinfer.engine.scheduler import Scheduler

log = logging.getLogger(__name__)


def heartbeat_interval(collective_timeout_s: float) -> float:
    """Well inside the collective timeout, and rare enough to cost nothing."""
    return max(0.5, min(10.0, collective_timeout_s / 4))


class EngineThread:
    def __init__(self, scheduler: Scheduler, on_fatal: Callable[[str], None], stop_ranks: Callable[[], None],
                 heartbeat_s: float, name: str = "tpinfer-engine") -> None:
        self.scheduler = scheduler
        self.on_fatal = on_fatal  # a step failed (a collective error or timeout): fail everything, exit
        self.stop_ranks = stop_ranks  # on a clean stop: tell the workers to leave, and wait for them
        self.heartbeat_s = heartbeat_s
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Leave the loop after the current step, stop the workers; True when that finished in ``timeout``."""
        self._stopping = True
        self.scheduler.interrupt()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        scheduler = self.scheduler
        last_step = time.monotonic()
        try:
            while not self._stopping:
                if scheduler.step():
                    last_step = time.monotonic()
                    continue
                idle = time.monotonic() - last_step
                if not scheduler.wait_for_work(max(0.0, self.heartbeat_s - idle)) and not self._stopping:
                    if time.monotonic() - last_step >= self.heartbeat_s:
                        scheduler.heartbeat()
                        last_step = time.monotonic()
        except Exception as exc:  # a collective failed: the ranks are out of step, nothing can continue
            log.exception("engine step failed")
            self.on_fatal(f"{type(exc).__name__}: {exc}")
            return
        try:
            scheduler.finish_in_flight()
            self.stop_ranks()
        except Exception:
            log.exception("stopping the workers failed")
