"""Run processes forked from one warm interpreter, instead of each importing the stack itself.

A fresh interpreter spends about 12 s of this 2-core box importing torch, Lightning, torchmetrics,
diffusers and W&B before a run can begin; a smoke run's own work is about 6 s. A `ForkServer` is one
interpreter per launching command that imports those libraries once and forks every run from there.
Each run is still a process of its own, started from the same imported state:

- one run per process, which exits after it. The server runs no project code and no torch op, so a
  run inherits no thread pool, CUDA context, RNG draw or registry entry from it (it checks this
  before it serves);
- a run never outlives its launcher: launcher -> server -> run, each link with
  PR_SET_PDEATHSIG=SIGKILL and a parent-pid check after it is set (bench.run.process's `_child_main`);
- `/proc/PID/cmdline` reads `python -m bench.run.process RUN_ID OUT_DIR` (setproctitle), so the store's
  liveness check, `ps` and the tests see which run a process is;
- `sys.argv` reads as the plain run command, so the ranks Lightning's DDP launcher starts by re-running
  it are ordinary run processes.

Linux only (prctl, pidfd). Elsewhere, with CONTROLBENCH_FORK_SERVER=0, or when the server cannot
start, each run gets a fresh interpreter as before (bench.run.process.run_isolated).

Why not `multiprocessing`'s forkserver (`set_start_method("forkserver")` + `set_forkserver_preload`)?
It would save these ~300 lines, but it cannot give two of the properties above that the harness relies on:
- its children run a pickled target inside the multiprocessing bootstrap, with the server's argv, so
  Lightning's DDP launcher (which re-runs `sys.argv`) would start copies of the fork server, not ranks;
- its server is started by the first `Process.start()` with no death signal of ours, and its children
  are its own: a killed launcher leaves the server (and its runs) alive, where here every link dies.
(The /proc title could be set in its children as well; that alone would not justify this module.)

Protocol: JSON lines over two pipes. Launcher -> server: {"tag", "argv", "threads"} starts a run,
{"kill": tag} kills it. Server -> launcher: {"ready": pid} once, then {"tag", "pid"} when a run has
started and {"tag", "code"} when it has ended (code as Popen.returncode: -N for signal N).
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading
from typing import Callable

from bench.core.provenance import STARTED_ENV
from bench.core.store import (
    RUN_PROCESS_MODULE,  # "fork-server" in a forked run; the record's machine says so
)

ENABLE_ENV = "CONTROLBENCH_FORK_SERVER"  # "0": a fresh interpreter per run
FLAG = "--fork-server"  # `python -m bench.run.process --fork-server REQUESTS_FD RESPONSES_FD`

# Third-party only: the server must not run project or plugin code (a plugin's import error is the
# run's to report, and registries fill in the run). A name missing here is imported by the run itself.
# Not wandb: its import makes temp directories (wandb-media) that each process deletes at exit, so forked
# runs sharing them lost their W&B tables once the first run ended (tests/test_wandb.py checks two runs).
PRELOAD = ("numpy", "scipy.signal", "scipy.linalg", "cv2", "PIL.Image", "torch", "torchvision", "torchmetrics",
           "lightning.pytorch", "diffusers", "transformers", "safetensors.torch", "kornia", "tqdm.auto")
# diffusers and transformers import lazily: these attributes load the modules the methods use
PRELOAD_ATTRS = (("diffusers", ("UNet2DConditionModel", "AutoencoderKL", "ControlNetModel", "T2IAdapter",
                                "DDIMScheduler", "DDPMScheduler")),
                 ("transformers", ("CLIPTextModel", "CLIPTokenizer", "CLIPVisionModelWithProjection")))


class ForkServerGone(RuntimeError):
    """The server could not start, or has died; the caller starts runs without it."""


def supported() -> bool:
    if os.environ.get(ENABLE_ENV, "1") == "0" or not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"):
        return False
    try:
        import setproctitle  # noqa: F401
    except ImportError:
        return False
    return True


# ---- the launcher's side ------------------------------------------------------------------------------

class ForkedRun:
    """A run process started by the server: the part of subprocess.Popen that run_isolated and
    run_all use (pid, wait, poll, kill, returncode)."""

    def __init__(self, server: ForkServer, tag: int):
        self._server, self.tag = server, tag
        self.pid: int | None = None
        self.returncode: int | None = None
        self._started, self._ended = threading.Event(), threading.Event()

    def wait(self) -> int:
        self._ended.wait()
        return self.returncode

    def poll(self) -> int | None:
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            self._server.send({"kill": self.tag})

    def _ended_with(self, code: int) -> None:
        self.returncode = code
        self._started.set()
        self._ended.set()


class ForkServer:
    """The launcher's handle on one server process. Start it from a thread that lives as long as the
    runs (the death signal follows the starting thread); `spawn` may be called from any thread."""

    def __init__(self, proc: subprocess.Popen, requests, responses):
        self._proc, self._requests, self._responses = proc, requests, responses
        self._lock = threading.Lock()
        self._runs: dict[int, ForkedRun] = {}
        self._next_tag = 0
        self._ready = threading.Event()
        self._gone: str | None = None
        threading.Thread(target=self._read, name="fork-server-reader", daemon=True).start()

    @classmethod
    def start(cls, popen: Callable[..., subprocess.Popen]) -> ForkServer | None:
        """The server, or None where it is not supported. ``popen`` starts `python -m bench.run.process`
        with the launcher's death signal (bench.run.process passes its own Popen wrapper)."""
        if not supported():
            return None
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        try:
            proc = popen([FLAG, str(req_r), str(resp_w)], pass_fds=(req_r, resp_w))
        finally:
            os.close(req_r)
            os.close(resp_w)
        return cls(proc, os.fdopen(req_w, "w", buffering=1), os.fdopen(resp_r, "r"))

    def spawn(self, argv: list[str], threads: int | None) -> ForkedRun:
        """Fork a run process of ``argv`` (bench.run.process's run arguments) once the server is ready.
        Raises ForkServerGone when it cannot."""
        self._ready.wait()
        with self._lock:
            if self._gone:
                raise ForkServerGone(self._gone)
            run = self._runs[self._next_tag] = ForkedRun(self, self._next_tag)
            self._next_tag += 1
        self.send({"tag": run.tag, "argv": argv, "threads": threads})
        run._started.wait()
        if run.pid is None and self._gone:  # died before it could fork this one
            raise ForkServerGone(self._gone)
        return run

    def send(self, message: dict) -> None:
        with self._lock:
            if self._gone:
                return
            try:
                self._requests.write(json.dumps(message) + "\n")
            except OSError:  # the reader thread sees the server's end and fails the runs
                pass

    def close(self) -> None:
        """No more runs. Called once the runs have ended (or must end: a live one dies with the
        server), so the server is killed rather than left to finish its imports."""
        with self._lock:
            if not self._requests.closed:
                self._requests.close()
        self._proc.kill()
        self._proc.wait()

    def _read(self) -> None:
        for line in self._responses:
            msg = json.loads(line)
            if "ready" in msg:
                self._ready.set()
            elif "unsafe" in msg:
                self._fail(f"fork server refused to serve: {msg['unsafe']}")
            elif "pid" in msg:
                run = self._runs[msg["tag"]]
                run.pid = msg["pid"]
                run._started.set()
            elif "code" in msg:
                self._runs.pop(msg["tag"])._ended_with(msg["code"])
        self._proc.wait()
        self._fail(f"fork server exited with code {self._proc.returncode}")

    def _fail(self, why: str) -> None:
        """The server is gone (or will not serve): waiting callers fail, live runs count as killed
        (their death signal has killed them)."""
        with self._lock:
            self._gone = self._gone or why
            runs, self._runs = list(self._runs.values()), {}
        self._ready.set()
        for run in runs:
            run._ended_with(-9)


# ---- the server's side ------------------------------------------------------------------------------

def serve(requests_fd: int, responses_fd: int, run: Callable[[list[str]], int]) -> int:
    """The server process's loop (bench.run.process calls it after its death-signal set-up): import the
    stack, then fork ``run(argv)`` per request until the launcher closes the request pipe."""
    import selectors
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the launcher, whose death ends this process
    responses = os.fdopen(responses_fd, "w", buffering=1)

    def say(message: dict) -> None:
        responses.write(json.dumps(message) + "\n")

    unsafe = _preload()
    if unsafe:
        say({"unsafe": unsafe})
        return 1
    say({"ready": os.getpid()})
    selector = selectors.DefaultSelector()
    selector.register(requests_fd, selectors.EVENT_READ)
    children: dict[int, tuple[int, int]] = {}  # pidfd -> (tag, pid)
    pending, reading = b"", True
    while reading or children:
        for key, _ in selector.select():
            if key.fd != requests_fd:
                tag, pid = children.pop(key.fd)
                selector.unregister(key.fd)
                os.close(key.fd)
                say({"tag": tag, "code": os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])})
                continue
            data = os.read(requests_fd, 1 << 16)
            if not data:  # the launcher has no more runs (or is gone: then so are we, by the death signal)
                reading = False
                selector.unregister(requests_fd)
                continue
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                msg = json.loads(line)
                if "kill" in msg:
                    for tag, pid in children.values():
                        if tag == msg["kill"]:
                            os.kill(pid, 9)  # not reaped yet, so the pid is still this run's
                    continue
                server_fds = [requests_fd, responses_fd, selector.fileno(), *children]
                pid = _fork_run(msg["argv"], msg.get("threads"), run, server_fds)
                pidfd = os.pidfd_open(pid)
                children[pidfd] = (msg["tag"], pid)
                selector.register(pidfd, selectors.EVENT_READ)
                say({"tag": msg["tag"], "pid": pid})
    return 0


def _preload() -> str | None:
    """Import the stack; returns why the server must not fork, or None. An import that fails is left
    to the run, which then reports it as it would have without the server."""
    fds = set(os.listdir("/proc/self/fd"))
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - see the docstring
            pass
    for module, attrs in PRELOAD_ATTRS:
        for attr in attrs:
            try:
                getattr(sys.modules.get(module), attr)
            except Exception:  # noqa: BLE001
                pass
    opened = [_fd_target(fd) for fd in set(os.listdir("/proc/self/fd")) - fds]
    if any(target is not None for target in opened):  # None: the first listing's own fd, closed since
        return f"importing the stack left files open ({sorted(map(str, opened))}), which forked runs would share"
    if threading.active_count() != 1:
        return f"an import started Python threads ({[t.name for t in threading.enumerate()]})"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "an import initialized CUDA"
    return None


def _fd_target(fd: str) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _fork_run(argv: list[str], threads: int | None, run: Callable[[list[str]], int], server_fds: list[int]) -> int:
    """Fork one run process; returns its pid in the server. The child never returns from here."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        import signal

        signal.signal(signal.SIGINT, signal.default_int_handler)  # a run stops on Ctrl-C, as a fresh one does
        for fd in server_fds:
            os.close(fd)
        _become_run(argv, threads)
        code = run(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - the run's own failures are records; this is the process's end
        import traceback

        traceback.print_exc()
    finally:
        try:
            import atexit

            atexit._run_exitfuncs()  # what an interpreter's normal exit runs (W&B, Lightning hooks)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _become_run(argv: list[str], threads: int | None) -> None:
    """Make this forked process read as `python -m bench.run.process ARGV`: to /proc (the title), to
    Lightning's DDP launcher (sys.argv), and to the CPU-thread setting a fresh process would have."""
    from setproctitle import setproctitle

    run_id, out_dir = argv[0], argv[1]
    setproctitle(f"{sys.executable} -m {RUN_PROCESS_MODULE} {run_id} {out_dir}")
    sys.argv = [sys.argv[0], *argv]
    os.environ[STARTED_ENV] = "fork-server"
    if threads:
        os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        import torch

        torch.set_num_threads(threads)  # OpenMP read its variables when the server loaded it
