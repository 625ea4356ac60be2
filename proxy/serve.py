"""Process model: N worker processes sharing one port through SO_REUSEPORT.

The parent only supervises: it starts the workers, restarts one that dies while the
service runs, and on SIGTERM/SIGINT passes the signal on and waits for every worker
to drain. Each worker runs its own event loop (uvloop) and its own pools.

Worker shutdown order (bounded): fail readiness → stop accepting → wait for in-flight
requests and streams up to ``grace_period`` → cancel what is left → close resources
(cleanup_ctx, reverse order) → exit 0.

Metrics: with several workers the parent creates the multiprocess metrics directory
before it spawns any worker (each worker's prometheus_client must see it at import),
drops a dead worker's live gauges, and removes the directory when it exits.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import multiprocessing
import os
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import wait
from types import FrameType

import uvloop
from aiohttp import web

from .app import build_app, build_ops_app
from .config.load import worker_count
from .config.schema import Config, Server
from .http import listener
from .ops import metrics, redact
from .state import STATE

log = logging.getLogger("proxy")


def serve(config: Config) -> int:
    """Run the proxy until SIGTERM/SIGINT; returns the process exit code."""
    workers = worker_count(config)
    if workers == 1:
        return run_worker(config, reuse_port=False)
    with metrics.shared_dir() as metrics_dir:
        return supervise(config, workers, metrics_dir)


def run_worker(config: Config, reuse_port: bool, parent: int | None = None) -> int:
    """One worker until SIGTERM/SIGINT (or, when supervised, until ``parent`` is gone)."""
    setup_logging(config)
    if parent is not None:
        _die_with(parent)
    uvloop.run(_worker(config, reuse_port))
    return 0


async def start(config: Config, reuse_port: bool = False) -> web.AppRunner:
    """Build the app and start listening; the caller owns ``runner.cleanup()``."""
    server = config.server
    redact.install()
    app = build_app(config)
    if server.ops_port is not None:
        app.cleanup_ctx.append(ops_listener(server, reuse_port))
    runner = listener.Runner(
        app,
        handler_cancellation=True,  # a client that goes away cancels its upstream call
        access_log=None,
        keepalive_timeout=server.idle_timeout,  # aiohttp's own default is an hour
        # aiohttp reads a timeout of 0 as "no limit": 0 must mean "do not wait".
        shutdown_timeout=max(server.grace_period, 0.001),
        max_field_size=server.max_header_bytes,
        max_line_size=server.max_header_bytes,
    )
    await runner.setup()
    ssl_context = None
    if server.tls_cert and server.tls_key:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(server.tls_cert, server.tls_key)
    site = web.TCPSite(
        runner,
        server.host,
        server.port,
        ssl_context=ssl_context,
        backlog=4096,
        reuse_port=reuse_port,
    )
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def ops_listener(
    server: Server, reuse_port: bool
) -> Callable[[web.Application], AsyncIterator[None]]:
    """cleanup_ctx: the ops endpoints on ``server.ops_port``. Being a resource of the
    main app, it stays up while the main listener drains (metrics, /readyz = 503)."""

    async def listen(app: web.Application) -> AsyncIterator[None]:
        runner = listener.Runner(build_ops_app(app[STATE]), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, server.host, server.ops_port, reuse_port=reuse_port)
            await site.start()
            log.info("ops endpoints on http://%s:%s", server.host, server.ops_port)
            yield
        finally:
            await runner.cleanup()

    return listen


async def drain(runner: web.AppRunner) -> None:
    """Fail readiness, stop accepting, let in-flight work finish, close resources."""
    app = runner.app
    app[STATE].traffic.draining = True
    log.info(
        "draining: stopped accepting, waiting up to %gs", app[STATE].config.server.grace_period
    )
    await runner.cleanup()


async def _worker(config: Config, reuse_port: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = await start(config, reuse_port)
    log.info("worker %d: %d start-up objects frozen", os.getpid(), settle_heap())
    try:
        host, port = runner.addresses[0][:2]
        scheme = "https" if config.server.tls_cert else "http"
        log.info("proxy listening on %s://%s:%s (pid %d)", scheme, host, port, os.getpid())
        await stop.wait()
    finally:
        await drain(runner)
        log.info("worker %d stopped", os.getpid())


def settle_heap() -> int:
    """Tune the cyclic collector for a worker that has started: what start-up made
    (modules, classes, functions, the app and its pools: ~80k objects) is frozen out
    of its sight, and the youngest generation is collected less often. Returns how
    many objects are frozen.

    Measured under load (docs/performance.md, "The collector"), CPython's defaults
    cost a worker ~4.5 µs (bare) to ~10 µs (governed) a request and a 25-35 ms pause
    about once a second:
    - Objects that outlive a few collections (a ledger batch waiting for its flush,
      the access log's queue) are promoted to the oldest generation, and once those
      promoted since the last full collection are a quarter of it, it is collected
      whole, start-up objects included. Frozen, they are skipped: a full collection
      walks only what came after (~5 ms).
    - The youngest generation is collected each time 700 more tracked objects were
      made than freed. The requests in flight hold about that many (a task, its
      frames, futures and the exchange: ~15 each at 64 connections), so it was
      collected every few requests, each time walking them all. At
      ``YOUNG_THRESHOLD``, no collection ran in the same 9 s of load; one costs ~3 ms
      when it comes.
    Reference counting still frees frozen objects; only a cycle among them that later
    becomes garbage stays, and start-up objects are not replaced."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    return gc.get_freeze_count()


# Tracked objects made (less those freed) between collections of the youngest
# generation; CPython's default is 700 (settle_heap).
YOUNG_THRESHOLD = 20_000


def _die_with(parent: int) -> None:
    """A supervisor killed with SIGKILL cannot pass SIGTERM on: ask the kernel to send
    it to this worker when the parent goes (Linux prctl PR_SET_PDEATHSIG), so orphans
    drain by themselves instead of holding the port forever."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the supervisor's SIGTERM must do
        return
    if os.getppid() != parent:  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1


# A worker that dies sooner than this after its start failed to start (port taken,
# bad TLS file, ...): restarting it at once would only spin.
_START_GRACE = 10.0
_MAX_QUICK_DEATHS = 4


def supervise(config: Config, workers: int, metrics_dir: str) -> int:
    setup_logging(config)
    log.info("%d workers; metrics aggregated from %s", workers, metrics_dir)
    ctx = multiprocessing.get_context("spawn")
    stopping = False
    started: dict[multiprocessing.process.BaseProcess, float] = {}

    def spawn() -> None:
        if stopping:  # SIGTERM came while a replacement waited for its turn
            return
        proc = ctx.Process(target=run_worker, args=(config, True, os.getpid()), daemon=False)
        proc.start()
        started[proc] = time.monotonic()
        if stopping and proc.pid is not None:  # ... or while it was being started
            os.kill(proc.pid, signal.SIGTERM)

    def stop_all(signum: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        nonlocal stopping
        stopping = True
        for proc in started:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    for _ in range(workers):
        spawn()
    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    failed = False
    quick_deaths = 0
    while started:
        wait([p.sentinel for p in started], timeout=1.0)
        for proc in [p for p in started if not p.is_alive()]:
            lived = time.monotonic() - started.pop(proc)
            assert proc.pid is not None
            metrics.forget_worker(proc.pid, metrics_dir)
            if stopping:
                # -SIGTERM: stopped before it installed its handlers, with nothing to drain.
                failed |= proc.exitcode not in (0, -signal.SIGTERM)
                continue
            quick_deaths = quick_deaths + 1 if lived < _START_GRACE else 0
            if quick_deaths >= _MAX_QUICK_DEATHS:
                log.error("workers keep dying at start (last exit %s); giving up", proc.exitcode)
                failed = True
                stop_all()
                continue
            delay = 0.0 if quick_deaths == 0 else min(0.5 * 2.0 ** (quick_deaths - 1), 30.0)
            log.error(
                "worker %s exited with %s; starting another in %gs", proc.pid, proc.exitcode, delay
            )
            time.sleep(delay)  # the supervisor has nothing else to do meanwhile
            spawn()
    return 1 if failed else 0


def setup_logging(config: Config) -> None:
    logging.basicConfig(
        level=config.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
