"""The run process: each run in its own interpreter (or a fork of the warm fork server).

A run process is isolated so that (a) peak RSS on CPU is that run's alone, (b) a crash,
OOM or SIGKILL becomes a FAILED record instead of taking the sweep down. Only the parent
writes the store. The module name is `bench.core.store.RUN_PROCESS_MODULE`, which the store's claim
liveness check looks for in /proc; a test keeps the two the same.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from bench.core.files import atomic_write
from bench.core.provenance import STARTED_ENV
from bench.core.store import RUN_PROCESS_MODULE, RunRecord
from bench.run.forkserver import FLAG as FORK_SERVER_FLAG
from bench.run.forkserver import ForkedRun, ForkServer, ForkServerGone
from bench.run.spec import RunSpec

if TYPE_CHECKING:

    pass


from bench.core.provenance import rank_zero
from bench.run.execute import execute, failed

PARENT_ENV = "CONTROLBENCH_RUN_PARENT"
RUN_MODULE = RUN_PROCESS_MODULE  # this module, as the store's liveness check knows it
PARENT_GONE = 75  # the run process's exit code when its launcher died before it could start


def _death_signal_setter():
    """A function that makes the calling process receive SIGKILL when its parent thread exits,
    or None where prctl(PR_SET_PDEATHSIG) does not exist (not Linux). Resolved here, so that
    a preexec_fn (which runs in the forked child) only makes one foreign call."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigkill = 1, int(signal.SIGKILL)
    return lambda: prctl(pr_set_pdeathsig, sigkill)


def _watch_parent(parent: int) -> None:
    """Fallback without prctl: exit as soon as the parent is gone (the child is reparented)."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(PARENT_GONE)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _child_main(argv: list[str]) -> int:
    """Entry point of the run process (see the comment above)."""
    set_death_signal = _death_signal_setter()
    if set_death_signal is not None:  # set by the launcher already; again for processes that did not
        set_death_signal()            # get it at fork, e.g. DDP ranks Lightning starts by re-running us
    parent = int(os.environ.get(PARENT_ENV) or 0)
    if parent and os.getppid() != parent:
        return PARENT_GONE  # the launcher died before the death signal was set: do nothing at all
    if parent and set_death_signal is None:
        _watch_parent(parent)
    os.environ[PARENT_ENV] = str(os.getpid())  # processes this run starts check against it
    if argv[0] == FORK_SERVER_FLAG:  # not a run: the server that forks them (bench.run.forkserver)
        from bench.run.forkserver import serve

        return serve(int(argv[1]), int(argv[2]), _child_main)
    _run_id, out_dir, result_path, progress, spec_json = argv
    _child(json.loads(spec_json), out_dir, result_path, progress == "1")
    return 0


def _child(spec_dict: dict, out_dir: str, result_path: str, progress: bool) -> None:
    from bench.run.wandb_mirror import mirror, start

    spec = RunSpec.from_dict(spec_dict)
    live = start(spec.run_id, spec.to_dict(), Path(out_dir)) if rank_zero() else None  # never raises
    try:
        record = execute(spec, Path(out_dir), progress, live)
    except Exception as e:  # noqa: BLE001 - every failure becomes a FAILED record with its reason
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        record = failed(spec, f"{type(e).__name__}: {first}"[:500])
        _report_failure(spec.run_id, Path(out_dir), progress, record.reason)
    if record is None:  # a non-zero rank: rank 0 writes the result
        return
    record = mirror(record, Path(out_dir), live)  # never raises: a W&B failure is noted in the record
    atomic_write(result_path, record.to_json())


def _report_failure(run_id: str, out_dir: Path, progress: bool, reason: str) -> None:
    """Called in an `except` block: the traceback goes to the run's log file, OUT/logs/RUN_ID.log;
    stderr gets it whole, or under --quiet (no progress) one line naming the log."""
    trace = traceback.format_exc()
    log: Path | None = out_dir / "logs" / f"{run_id}.log"
    try:
        atomic_write(log, trace)
    except OSError:  # nowhere to keep it: stderr is the only copy
        log = None
    if progress or log is None:
        sys.stderr.write(trace)
    else:
        print(f"run {run_id} failed: {reason}; traceback in {log}", file=sys.stderr)


def _start_run_module(args: list[str], threads: int | None = None, gpu: str | None = None,
                      **popen: Any) -> subprocess.Popen:
    """`python -m bench.run.process ARGS` as a child that dies with this thread (see above); ``gpu``:
    the one GPU it sees (CUDA_VISIBLE_DEVICES), so its cuda:0 is that card."""
    isolated = ["-P"] if sys.version_info >= (3, 11) else []  # no cwd on sys.path: a ./bench must not shadow us
    env = {**os.environ, PARENT_ENV: str(os.getpid()), STARTED_ENV: "interpreter"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    # Not Linux: no death signal; the child's watchdog thread (see _child_main) stands in for it.
    return subprocess.Popen([sys.executable, *isolated, "-m", RUN_MODULE, *args], env=env,
                            preexec_fn=_death_signal_setter(), **popen)


class Launcher:
    """Starts run processes: forked from a fork server (bench.run.forkserver), or each in a fresh
    interpreter where there is none. The server starts at the first run started from the thread that
    made the Launcher, which must outlive its runs (the server's death signal follows that thread);
    other threads use the server once it exists (run_all warms it before handing runs to its pool)."""

    def __init__(self) -> None:
        self._owner = threading.get_ident()
        self._server: ForkServer | None = None
        self._tried = False

    def warm(self) -> None:
        """Start the server, once, from the owning thread (lazily: a command whose runs are all
        FINISHED starts none)."""
        if not self._tried and threading.get_ident() == self._owner:
            self._tried, self._server = True, ForkServer.start(_start_run_module)

    def start(self, args: list[str], threads: int | None) -> subprocess.Popen | ForkedRun:
        self.warm()
        server = self._server
        if server is not None:
            try:
                return server.spawn(args, threads)
            except ForkServerGone as e:
                if self._server is server:
                    print(f"warning: {e}; runs start in a fresh interpreter from now on", file=sys.stderr)
                    self._server = None
        return _start_run_module(args, threads)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_isolated(spec: RunSpec, out_dir: Path, progress: bool = True, threads: int | None = None,
                 started: Callable[[subprocess.Popen], None] | None = None,
                 launcher: Launcher | None = None, gpu: str | None = None) -> RunRecord:
    """Run one spec in its own process (see the comment above `PARENT_ENV`) and return its record;
    a run process that crashes or is killed before writing its result becomes a FAILED record.
    Its stdout and stderr (progress bars, a failure's traceback) are this process's. ``threads``:
    the run's CPU threads (OMP/MKL), when several runs share the machine; ``started`` is called
    with the run process (`run_all` kills its live runs when interrupted); ``launcher``: where the
    process comes from (default: a fresh interpreter); ``gpu``: the GPU it alone sees (`run_all --jobs`)."""
    out_dir = Path(out_dir)
    result = out_dir / "records" / f"{spec.run_id}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    spec_json = json.dumps(spec.to_dict(), sort_keys=True)
    args = [spec.run_id, str(out_dir), str(result), "1" if progress else "0", spec_json]
    t0 = time.perf_counter()
    # a run given its own GPU starts a fresh interpreter: CUDA reads CUDA_VISIBLE_DEVICES once, at its first
    # call, and a fork server's process may have asked torch for the device count already
    fresh = launcher is None or gpu is not None
    proc = _start_run_module(args, threads, gpu) if fresh else launcher.start(args, threads)
    if started is not None:
        started(proc)
    try:
        code = proc.wait()
    finally:
        if proc.returncode is None:  # interrupted (Ctrl-C) or failing here: the run goes with us
            proc.kill()
            proc.wait()
    if result.exists():
        record = RunRecord.from_json(result.read_text())
        if record.finished:  # the run process's whole life: start-up and exit are the rest of the phases
            record.compute["phase_total_s"] = time.perf_counter() - t0
        return record
    why = f"killed by signal {-code}" if code < 0 else f"run process exited with code {code}"
    return failed(spec, f"{why} before writing a result (out of memory or killed?)")



if __name__ == "__main__":
    from bench.run.process import (
        _child_main as main,  # this file under its own name: one copy of its classes
    )

    sys.exit(main(sys.argv[1:]))
