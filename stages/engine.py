"""Running work units on Dask, with crash isolation and per-step deadlines.

The stage starts a ``LocalCluster`` (workers and threads from params, BLAS/OpenMP threads
capped to the worker's threads) or connects to an existing scheduler (``address``), which
is how a study scales out to many machines. Workers and the stage must see the same
filesystem (the feature shards and ``scratch``): workers read inputs themselves and only
results travel back to the stage, which is the only process that writes the database.

``run_units`` submits one top-level function per work unit and handles results as they
complete. When a worker dies inside a unit (segfault, abort, OOM kill), the scheduler
fails the task fast (``allowed-failures`` = 0) and the unit is split and resubmitted until
the single item that kills a worker is isolated and reported with the fatal signal (from
a faulthandler report). When a worker may run more than one task at once (several threads,
or a scheduler not known to send one task per thread), the item is first run once more
alone on the cluster, so an innocent item that merely shared a worker with the culprit is
never blamed.

``deadline`` is the worker-side timeout: a watchdog thread writes a note naming the step
that overran and then SIGKILLs its own worker process (a hung C extension cannot be
interrupted any other way); the stage reads the note when the death is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import dask
from distributed import Client, Future, KilledWorker, LocalCluster, as_completed
from pydantic import Field

from stages.errors import UserError
from stages.io import write_json_atomic
from stages.params import MemoryLimit, SchedulerAddress, Section

U = TypeVar("U")
R = TypeVar("R")

log = logging.getLogger("stages.engine")

THREAD_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


class EngineParams(Section):
    """Where work units run: a LocalCluster started by the stage, or ``address``."""

    address: SchedulerAddress | None = None  # e.g. tcp://scheduler:8786; None: a LocalCluster
    n_workers: int = Field(2, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    memory_limit: MemoryLimit = "auto"  # per worker; the nanny kills a worker above it
    allowed_failures: int = Field(0, ge=0)  # worker deaths a task may cause before it fails
    connect_timeout_s: float = Field(10.0, gt=0)  # how long to wait for ``address`` to answer


def thread_env(threads: int) -> dict[str, str]:
    """Environment that caps BLAS/OpenMP pools to ``threads`` (no oversubscription)."""
    return dict.fromkeys(THREAD_ENV_VARS, str(threads))


def _dask_config(params: EngineParams) -> dict[str, Any]:
    return {
        "distributed.scheduler.allowed-failures": params.allowed_failures,
        # One task per worker thread, so a dying worker takes no queued innocents with it.
        "distributed.scheduler.worker-saturation": 1.0,
        # Workers may start processes of their own. None of the stages' units does since the
        # extraction decodes on threads; Dask's daemonic default is untried under chaos.
        "distributed.worker.daemon": False,
        # Dask sets MALLOC_TRIM_THRESHOLD_=65536 in its workers, which also freezes glibc's
        # mmap threshold at 128 KiB: every large array is then mmapped and unmapped anew, and
        # the page faults doubled the extraction's wall time (25 s of system time for 292
        # images). glibc's own dynamic thresholds instead.
        "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    }


@contextlib.contextmanager
def dask_client(
    params: EngineParams,
    resources: dict[str, float] | None = None,
    resource_workers: int | None = None,
) -> Iterator[Client]:
    """A client on ``params.address``, or on a LocalCluster this context starts and stops.

    ``resources``: Dask worker resources each local worker offers (e.g. ``{"GPU": 1}``), so
    units submitted with ``run_units(resources=...)`` run only where they fit; a remote
    cluster's workers declare theirs themselves (``dask worker --resources GPU=1``).
    ``resource_workers``: only the first that many local workers (named ``0 ..
    resource_workers - 1``) offer them (None: every worker), e.g. one per GPU; a worker
    the nanny restarts keeps its resources.

    A remote scheduler should be started with ``DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=0``
    so crashing units fail fast (otherwise each crash is retried on other workers first).
    """
    with dask.config.set(_dask_config(params)):
        if params.address:
            with connect(params) as client:
                yield client
            return
        some = resources is not None and resource_workers is not None
        with (
            LocalCluster(
                n_workers=0 if some else params.n_workers,
                threads_per_worker=params.threads_per_worker,
                memory_limit=params.memory_limit,
                processes=True,
                dashboard_address=":0",  # the HTTP server starts anyway: a free port
                scheduler_kwargs={"dashboard": False},
                # Task errors come back to the stage, which reports them in its own words.
                silence_logs=logging.CRITICAL,
                env=thread_env(params.threads_per_worker),
                resources=None if some else resources,
            ) as cluster,
            Client(cluster) as client,
        ):
            if some:
                _start_workers(cluster, params.n_workers, resources or {}, resource_workers or 0)
                client.wait_for_workers(params.n_workers)
            yield client


def _start_workers(cluster: LocalCluster, n: int, resources: dict[str, float], k: int) -> None:
    """Start ``n`` workers of ``cluster``'s own kind, the first ``k`` offering ``resources``
    (in their spec, so a restarted worker offers them again)."""
    base = cluster.new_spec
    for i in range(n):
        options = {**base["options"], **({"resources": dict(resources)} if i < k else {})}
        cluster.worker_spec[i] = {"cls": base["cls"], "options": options}
    cluster.scale(n)


def _unreachable(
    params: EngineParams, key: str, where: str | Path, reason: str | None
) -> UserError:
    what = (f"no Dask scheduler answered at {params.address} within "
            f"{params.connect_timeout_s:g} s ({key}.connect_timeout_s)" if reason is None
            else f"cannot use {params.address} as a Dask scheduler ({reason})")  # fmt: skip
    return UserError(
        f"{f'{where}: ' if where else ''}{key}.address: {what}: start the scheduler and its "
        "workers (README 'Scaling out'), or set address: null for a local cluster"
    )


def connect(params: EngineParams, key: str = "engine", where: str | Path = "") -> Client:
    """A client on the scheduler at ``params.address``; ``UserError`` naming ``key`` (of the
    params file ``where``) when none answers within ``connect_timeout_s``."""
    try:
        return Client(params.address, timeout=f"{params.connect_timeout_s}s")
    except (OSError, TimeoutError):
        raise _unreachable(params, key, where, None) from None


async def _identity(address: str, timeout: float) -> dict[str, Any]:
    """The ``identity`` of the Dask server at ``address``: the whole exchange bounded by
    ``timeout`` (a server that is not Dask's may accept the connection and never answer)."""
    from distributed.comm import connect as open_comm
    from distributed.security import Security

    async def ask() -> dict[str, Any]:
        comm = await open_comm(address, timeout=timeout,
                               **Security().get_connection_args("client"))  # fmt: skip
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    return await asyncio.wait_for(ask(), timeout)


def check_scheduler(params: EngineParams, key: str, where: str | Path = "") -> None:
    """Before a stage writes anything: a Dask scheduler answers at ``address`` (if any)
    within ``connect_timeout_s``, else one line naming ``key`` (``UserError``)."""
    if not params.address:
        return
    with contextlib.suppress(RuntimeError):
        asyncio.get_running_loop()
        return  # called from async code: the connection itself will tell
    try:
        reply = asyncio.run(_identity(params.address, params.connect_timeout_s))
    except (OSError, TimeoutError):
        raise _unreachable(params, key, where, None) from None
    except Exception as exc:  # TLS not configured, a web server, ...: said as it is
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise _unreachable(params, key, where, reason) from None
    kind = reply.get("type") if isinstance(reply, dict) else None
    if kind != "Scheduler":
        raise _unreachable(params, key, where, f"it answers as a Dask {kind or 'server'}, "
                           "not a scheduler")  # fmt: skip


# --- worker side ---------------------------------------------------------------------------

_watch_lock = threading.Lock()
_watched: dict[str, tuple[float, float, Path]] = {}  # token -> (due, seconds, note)
_watcher: threading.Thread | None = None


def _watch() -> None:
    while True:
        time.sleep(0.05)
        now = time.monotonic()
        with _watch_lock:
            expired = [(s, n) for due, s, n in _watched.values() if now >= due]
        if expired:
            for seconds, note in expired:
                write_json_atomic(note, {"timeout_s": seconds, "pid": os.getpid()})
            os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def deadline(seconds: float | None, note: Path) -> Iterator[None]:
    """Run the body with a deadline: past it, write ``note`` and SIGKILL this process.

    Only for code running in a Dask worker process (the nanny restarts the worker).
    """
    global _watcher
    if seconds is None:
        yield
        return
    token = uuid.uuid4().hex
    with _watch_lock:
        _watched[token] = (time.monotonic() + seconds, seconds, Path(note))
        if _watcher is None:
            _watcher = threading.Thread(target=_watch, name="ood-deadline", daemon=True)
            _watcher.start()
    try:
        yield
    finally:
        with _watch_lock:
            del _watched[token]


def _call(fn: Callable[[Any], Any], unit: Any, threads: int, fault_file: str | None) -> Any:
    """Worker-side wrapper: caps native thread pools; with ``fault_file``, records fatal signals."""
    from threadpoolctl import threadpool_limits

    report = open(fault_file, "w") if fault_file else None  # noqa: SIM115 - must outlive a crash
    if report is not None:
        faulthandler.enable(file=report, all_threads=False)
    try:
        with threadpool_limits(limits=threads):
            return fn(unit)
    finally:
        if report is not None:
            faulthandler.disable()
            report.close()
            Path(report.name).unlink(missing_ok=True)


# --- stage side ----------------------------------------------------------------------------

FAULT_NAMES = {
    "Aborted": "SIGABRT",
    "Segmentation fault": "SIGSEGV",
    "Bus error": "SIGBUS",
    "Floating-point exception": "SIGFPE",
    "Floating point exception": "SIGFPE",
    "Illegal instruction": "SIGILL",
}


def fault_summary(path: Path) -> str:
    """What killed a worker, from its faulthandler report (none: SIGKILL, e.g. OOM)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        text = ""
    for line in text.splitlines():
        if line.startswith("Fatal Python error:"):
            what = line.split(":", 1)[1].strip()
            return f"{FAULT_NAMES.get(what, what)} ({what})"
    return "SIGKILL or another uncatchable signal (no fault report; e.g. the OOM killer)"


def one_task_per_worker(client: Client) -> bool:
    """Whether every worker runs one task at a time, so a death blames exactly one task."""
    threads = client.nthreads()
    saturation = client.run_on_scheduler(_saturation)
    return bool(threads) and all(n == 1 for n in threads.values()) and saturation <= 1.0


def _saturation(dask_scheduler: Any) -> float:
    return float(getattr(dask_scheduler, "WORKER_SATURATION", float("inf")))


@dataclass
class RunStats:
    submitted: int = 0
    worker_deaths: int = 0
    splits: int = 0
    crashed: int = 0


def run_units(
    client: Client,
    fn: Callable[[U], R],
    units: Iterable[U],
    *,
    split: Callable[[U], Sequence[U]],
    on_result: Callable[[U, R], None],
    on_error: Callable[[U, BaseException], None],
    on_crash: Callable[[U, str], None],
    explain_death: Callable[[U], Sequence[U] | None] | None = None,
    scratch: str | Path,
    threads: int = 1,
    name: str = "unit",
    resources: Callable[[U], dict[str, float] | None] | None = None,
) -> RunStats:
    """Run ``fn(unit)`` on the cluster for every unit; call back as results arrive.

    ``fn`` must be a picklable top-level function. On a worker death, ``explain_death(unit)``
    may account for it (e.g. a deadline note) and return what is left to run; otherwise the
    unit is ``split``; a unit that cannot be split (``len(split(u)) <= 1``) is passed to
    ``on_crash`` with the fatal signal (after a rerun alone when workers run several tasks
    at once). Any other exception from ``fn`` goes to ``on_error``. Callbacks run in this
    (the stage) process. ``resources(unit)``, when given, is the Dask worker resources the
    unit asks for (e.g. ``{"GPU": 1}``; None: any worker), its parts' too.
    """
    scratch = Path(scratch).resolve()  # workers may run in another directory
    scratch.mkdir(parents=True, exist_ok=True)
    stats = RunStats()
    running: dict[Future, tuple[U, Path | None, bool]] = {}
    pending = as_completed()
    suspects: deque[U] = deque()
    exclusive = one_task_per_worker(client)

    def submit(unit: U, solo: bool = False) -> None:
        atomic = len(split(unit)) <= 1
        fault = scratch / f"fault-{uuid.uuid4().hex}.txt" if atomic else None
        future = client.submit(
            _call, fn, unit, threads, None if fault is None else str(fault),
            key=f"{name}-{uuid.uuid4().hex}", pure=False,
            resources=None if resources is None else resources(unit),
        )  # fmt: skip
        running[future] = (unit, fault, solo or exclusive)
        pending.add(future)
        stats.submitted += 1

    for unit in units:
        submit(unit)
    while running or suspects:
        if not running:  # everything else finished: confirm one suspect alone on the cluster
            submit(suspects.popleft(), solo=True)
        future = next(pending)
        unit, fault, certain = running.pop(future)
        try:
            if future.status == "finished":
                on_result(unit, future.result())
                continue
            exc = future.exception()
            if not isinstance(exc, KilledWorker):
                on_error(unit, exc)
                continue
            stats.worker_deaths += 1
            rest = explain_death(unit) if explain_death is not None else None
            if rest is not None:
                for part in rest:
                    submit(part)
            elif fault is None:
                parts = split(unit)
                stats.splits += 1
                log.info("a worker died in a %s; retrying it as %d parts", name, len(parts))
                for part in parts:
                    submit(part)
            elif certain:
                stats.crashed += 1
                on_crash(unit, fault_summary(fault))
            else:
                suspects.append(unit)
        finally:
            future.release()
            if fault is not None:
                fault.unlink(missing_ok=True)
    return stats
