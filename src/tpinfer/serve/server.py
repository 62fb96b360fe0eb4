"""``tpinfer serve``: start the ranks, serve HTTP on rank 0, and end cleanly whatever happens.

Lifecycle of rank 0's process:
1. validate the model and bind the port (fail fast, before loading anything);
2. start the ranks (``Launcher``; or join torchrun's job) and load this rank's share;
3. run the engine thread (``EngineThread``) and uvicorn on the main thread's event loop;
4. first SIGTERM/SIGINT: drain. /health and new requests answer 503, open requests get up to
   ``shutdown_timeout_s`` to finish, then the rest fail; the workers are told to stop; exit 0.
   A second signal skips the wait;
5. a rank fails (the watchdog sees a worker die, or a collective raises or times out): every open
   request fails (streams end with an error event), /health answers 503, the workers are killed,
   and the process exits 1 without waiting for the engine thread, which may be stuck in a
   collective with the dead rank (there is no way to interrupt one from Python).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import resource_tracker
from pathlib import Path

import uvicorn

from tpinfer.engine.launcher import Launcher
from tpinfer.engine.runtime import EngineSpec, RankEngine, freeze_startup_heap, layout_label, load_engine
from tpinfer.engine.scheduler import MAX_NUM_BATCHED_TOKENS, Router, Scheduler
from tpinfer.models.family import CAUSAL_LM
from tpinfer.parallel.context import ParallelContext
from tpinfer.serve.app import AppSettings, ServerState, build_app
from tpinfer.serve.engine_loop import EngineThread, heartbeat_interval
from tpinfer.serve.metrics import Metrics
from tpinfer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FINAL_WRITES_S = 5.0  # after the drain, how long uvicorn waits for responses to finish their last bytes


@dataclass
class ServeConfig:
    model: str
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    moe_parallel: str = "tensor"
    dtype: str = "auto"
    tp_plan: str | dict[str, str] = "auto"
    quantization: str | None = None
    quantize_lm_head: bool | str = False
    max_model_len: int | None = None
    all_reduce: str = "auto"
    timeout_s: float = 120.0
    host: str = "127.0.0.1"
    port: int = 8000
    max_num_seqs: int = 16
    max_queue: int = 64
    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS
    prefix_caching: bool = True
    api_key: str | None = None
    served_model_name: str | None = None
    shutdown_timeout_s: float = 30.0
    max_body_bytes: int = 1 << 20


class _Uvicorn(uvicorn.Server):
    """uvicorn with tpinfer's signal handling: the first SIGTERM/SIGINT drains, a second stops at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState, grace_s: float) -> None:
        super().__init__(config)
        self.state, self.grace_s = state, grace_s
        self._drain: asyncio.Task | None = None
        self._deadline = 0.0

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # uvicorn's hook, entered inside serve() on its event loop
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self._drain is None:
            log.info("%s: draining (new requests get 503; up to %.0f s for open ones)", name, self.grace_s)
            self._deadline = time.monotonic() + self.grace_s
            self._drain = asyncio.ensure_future(self._drain_then_exit())
        else:
            log.info("%s again: failing open requests now", name)
            self._deadline = 0.0

    async def _drain_then_exit(self) -> None:
        self.state.drain()
        while self.state.busy and time.monotonic() < self._deadline and self.state.failure is None:
            await asyncio.sleep(0.05)
        if self.state.busy:
            self.state.fail_open_requests("the server is shutting down")
        self.should_exit = True


def serve(config: ServeConfig) -> int:
    """Serve until SIGTERM/SIGINT (returns 0); a rank failure ends the process with exit code 1."""
    spec = EngineSpec(model=config.model, tensor_parallel_size=config.tensor_parallel_size,
                      pipeline_parallel_size=config.pipeline_parallel_size,
                      data_parallel_size=config.data_parallel_size, moe_parallel=config.moe_parallel,
                      dtype=config.dtype,
                      tp_plan=config.tp_plan, quantization=config.quantization,
                      quantize_lm_head=config.quantize_lm_head, max_model_len=config.max_model_len,
                      max_batch_size=config.max_num_seqs, all_reduce=config.all_reduce, timeout_s=config.timeout_s)
    torchrun = "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if torchrun:
        world, copies = int(os.environ["WORLD_SIZE"]), config.pipeline_parallel_size * config.data_parallel_size
        if world % copies:
            raise ValueError(f"--pipeline-parallel-size {config.pipeline_parallel_size} x --data-parallel-size "
                             f"{config.data_parallel_size} does not divide torchrun's world size {world}")
        spec.tensor_parallel_size = world // copies
        ctx = ParallelContext.from_env(config.timeout_s, config.all_reduce, spec.mesh)
        if not ctx.is_first:  # a torchrun worker: run what rank 0 sends
            load_engine(spec, ctx).serve_forever()
            ctx.close()
            return 0
    model_config, _ = spec.check()
    tokenizer = Tokenizer.from_pretrained(config.model)
    if config.max_num_seqs < 1 or config.max_queue < 0 or config.max_num_batched_tokens < 1:
        raise ValueError("--max-num-seqs and --max-num-batched-tokens must be at least 1 and --max-queue at least 0")
    sock = _bind(config.host, config.port)
    # Clients may name the model by --served-model-name, else by the folder's name or the --model value.
    names = (config.served_model_name,) if config.served_model_name else (Path(config.model).resolve().name,
                                                                            config.model)
    state_box: list[ServerState] = []

    def on_rank_failure(message: str) -> None:
        if state_box:
            state_box[0].fail(message)

    launcher = None if torchrun else Launcher(spec, on_failure=on_rank_failure)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # while loading, SIGTERM cleans up like Ctrl-C
    try:
        if launcher is None:
            engine = load_engine(spec, ctx, progress=True)
        else:
            with _workers_shielded_from_group_signals():
                engine = launcher.start(progress=False)
        signal.signal(signal.SIGTERM, previous)
        build = _build_state if model_config.family.kind == CAUSAL_LM else _build_embed_state
        state = build(config, engine, tokenizer, names, model_config.vocab_size)
        state_box.append(state)
        freeze_startup_heap()  # loaded: what this process holds now lives as long as it does
        return _run(config, engine, state, launcher, sock)
    except BaseException:
        if launcher is not None:
            launcher.shutdown(force=True)
        raise


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _workers_shielded_from_group_signals() -> Iterator[None]:
    """Spawn the workers with SIGINT and SIGTERM blocked, so only rank 0 acts on them.

    Ctrl-C in a terminal (and ``kill -- -PGID``, systemd, ``timeout``) signals the whole process group.
    A worker that died of it would turn a drain into a rank failure; rank 0 stops the workers itself
    when it has drained. A blocked signal mask survives fork and exec (multiprocessing's resource
    tracker is started the same way). Rank 0's main thread blocks them only while it spawns and
    loads; a helper thread started before the block keeps them deliverable to this process, so Ctrl-C
    still interrupts loading here (Python runs the handler in the main thread).
    """
    signals = {signal.SIGINT, signal.SIGTERM}
    # Start multiprocessing's resource tracker now: starting it later (the launcher's queue does)
    # unblocks these signals in the calling thread when it is done.
    resource_tracker.ensure_running()
    loaded = threading.Event()
    receiver = threading.Thread(target=loaded.wait, name="tpinfer-signals", daemon=True)
    receiver.start()
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
        loaded.set()


def _build_state(config: ServeConfig, engine: RankEngine, tokenizer: Tokenizer, names: tuple[str, ...],
                 vocab_size: int) -> ServerState:
    schedulers = [Scheduler(engine, config.max_num_seqs, config.max_queue, config.max_num_batched_tokens, replica=d,
                            prefix_caching=config.prefix_caching) for d in range(engine.ctx.dp_size)]
    why_not = Scheduler.prefix_caching_supported(engine)
    if config.prefix_caching and why_not:
        log.info("prefix caching is off for this model: %s", why_not)
    scheduler = schedulers[0] if len(schedulers) == 1 else Router(schedulers)
    cache = engine.generator.cache
    settings = AppSettings(model_names=tuple(dict.fromkeys(names)), max_model_len=scheduler.max_seq_len,
                           max_num_seqs=config.max_num_seqs, vocab_size=vocab_size, api_key=config.api_key,
                           max_body_bytes=config.max_body_bytes, defaults=engine.defaults,
                           echo_logprobs=engine.ctx.pp_size == 1 and engine.ctx.dp_size == 1)
    if engine.defaults.describe():
        log.info("%s", engine.defaults.describe())
    metrics = Metrics(engine.ctx.tp_size, config.max_num_seqs, cache.nbytes)
    metrics.queue_depth = lambda: scheduler.num_waiting
    metrics.running = lambda: scheduler.num_running
    metrics.pipeline_parallel_size = engine.ctx.pp_size
    metrics.bubble_seconds = lambda: sum(s.bubble_s for s in schedulers)
    metrics.busy_seconds = lambda: sum(s.busy_s for s in schedulers)
    metrics.step_phases = lambda: {k: sum(s.phase_s[k] for s in schedulers) for k in schedulers[0].phase_s}
    metrics.prefill_tokens = lambda: sum(s.prefill_tokens for s in schedulers)
    metrics.folded_steps = lambda: sum(s.folded_steps for s in schedulers)
    metrics.prefix_caching = schedulers[0].prefix_caching
    metrics.prefix_cache = lambda: (sum(s.prompt_tokens for s in schedulers), sum(s.prefix_hit_tokens for s in schedulers))
    metrics.replicas = lambda: [{"running": s.num_running, "waiting": s.num_waiting, "steps": s.steps,
                                 "generated_tokens": s.generated_tokens} for s in schedulers]
    if hasattr(engine.model, "expert_load"):
        metrics.expert_load = engine.model.expert_load
    pipes = [pipe for pipe in engine.ctx.remotes or [engine.ctx.pipe] if pipe is not None]
    if pipes:
        metrics.pipe_bytes = lambda: {"sent": sum(p.stats.bytes.get("pipe_send", 0) for p in pipes),
                                      "received": sum(p.stats.bytes.get("pipe_recv", 0) for p in pipes)}
    state = ServerState(settings, tokenizer, metrics)
    state.scheduler = scheduler
    state.schedulers = schedulers
    return state


def _build_embed_state(config: ServeConfig, engine: RankEngine, tokenizer: Tokenizer, names: tuple[str, ...],
                       vocab_size: int) -> ServerState:
    """An encoder's server: one queue of embedding requests, which the engine thread steps as it would a scheduler
    (up to 4 x --max-num-seqs inputs a step, in forwards of --max-num-seqs rows)."""
    from tpinfer.serve.embeddings import EmbedQueue

    queue = EmbedQueue(engine, 4 * config.max_num_seqs, max(1, config.max_queue))
    pooling = engine.encoder.pooling
    if pooling.default:
        log.warning("%s has no sentence-transformers modules.json: embeddings use %s", config.model, pooling.describe())
    settings = AppSettings(model_names=tuple(dict.fromkeys(names)), max_model_len=queue.max_seq_len,
                           max_num_seqs=config.max_num_seqs, vocab_size=vocab_size, api_key=config.api_key,
                           max_body_bytes=config.max_body_bytes,
                           embedding_dimension=engine.config.hidden_size * len(pooling.modes))
    metrics = Metrics(engine.ctx.tp_size, config.max_num_seqs, 0)
    metrics.queue_depth = lambda: queue.num_waiting
    metrics.running = lambda: queue.num_running
    state = ServerState(settings, tokenizer, metrics)
    state.scheduler, state.schedulers, state.embed_queue = queue, [queue], queue
    return state


def _run(config: ServeConfig, engine: RankEngine, state: ServerState, launcher: Launcher | None,
         sock: socket.socket) -> int:
    def stop_ranks() -> None:
        if launcher is not None:
            launcher.shutdown(engine)
        else:
            engine.stop_workers()
            engine.ctx.close()

    def on_fatal(message: str) -> None:
        deadline = time.monotonic() + 1.0  # a dead worker's own exit message beats "connection closed"
        while launcher is not None and launcher.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        state.fail(launcher.failure if launcher is not None and launcher.failure else message)

    heartbeat = heartbeat_interval(config.timeout_s)
    if len(state.schedulers) == 1:
        threads = [EngineThread(state.scheduler, on_fatal, stop_ranks, heartbeat)]
    else:  # one engine thread per replica, each telling its own replica to stop; then the processes are joined
        threads = [EngineThread(s, on_fatal, _stop_replica(engine, s.replica), heartbeat, name=f"tpinfer-engine{d}")
                   for d, s in enumerate(state.schedulers)]
    app = build_app(state)
    uv_config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                               timeout_graceful_shutdown=FINAL_WRITES_S, timeout_keep_alive=30)
    server = _Uvicorn(uv_config, state, config.shutdown_timeout_s)

    def exit_soon() -> None:  # any thread; uvicorn checks the flag every 0.1 s
        server.should_exit = True

    state.on_failure = exit_soon
    for thread in threads:
        thread.start()
    state.status = "ok"
    host, port = sock.getsockname()[:2]
    if engine.generator is None:
        log.info("serving %s (an encoder: /v1/embeddings) at %s on http://%s:%d (%s, inputs of up to %d tokens)",
                 state.model_name, layout_label(engine.ctx), host, port, engine.encoder.pooling.describe(),
                 state.settings.max_model_len)
    else:
        log.info("serving %s at %s on http://%s:%d (max %d sequences x %d tokens, KV cache %.1f MiB per rank)",
                 state.model_name, layout_label(engine.ctx), host, port, config.max_num_seqs,
                 state.settings.max_model_len, engine.generator.cache.nbytes / 2**20)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if state.failure is not None:
        print(f"tpinfer serve: {state.failure}; exiting", file=sys.stderr, flush=True)
        if launcher is not None:
            launcher.shutdown(force=True)
        logging.shutdown()
        os._exit(1)  # the engine thread may be blocked in a collective with a dead rank: do not wait for it
    stopped = [thread.stop(timeout=30.0) for thread in threads]
    if not all(stopped):
        print("tpinfer serve: the engine thread did not stop; killing the workers", file=sys.stderr, flush=True)
        for process in launcher.processes if launcher is not None else ():
            process.kill()
        os._exit(1)
    if len(threads) > 1:  # every replica was told to stop by its own thread
        if launcher is not None:
            launcher.shutdown()
        engine.ctx.close()
    log.info("stopped")
    return 0


def _stop_replica(engine: RankEngine, replica: int):  # noqa: ANN202
    """A replica's engine thread, stopping: tell that replica's ranks to leave (from the thread that steps it)."""
    from tpinfer.engine import messages

    return lambda: messages.send(engine.ctx, messages.Stop(), replica)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only when the proto says TCP,
    # and without it every response whose headers and body are written apart waits ~40 ms (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(False)
    return sock
