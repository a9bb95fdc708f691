"""CLI behaviour: bad input exits 2 with one line; runs are resumable after SIGKILL."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import pytest

from bench.cli import main

BENCH = [sys.executable, "-m", "bench.cli"]


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "CONTROLBENCH_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("argv, needle", [
    (["run", "methods=contrlnet"], "did you mean 'controlnet'"),
    (["run", "budget=nope"], "unknown budget"),
    (["run", "oops"], "cannot read config"),
    (["run", "budget.train_steps=-3"], "train_steps"),
    (["run", "--frobnicate=1"], "unknown config key"),
    (["run", "hparams.controlnet.nope=1"], "unknown hparam"),
    (["run", "metrics=fid_typo"], "unknown metric"),
])
def test_bad_input_exits_2_with_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_corrupt_config_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [baseline\nbudget: : smoke\n")
    out = subprocess.run([*BENCH, "run", str(bad)], capture_output=True, text=True, env=_env(tmp_path), timeout=600)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "not valid YAML" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_missing_base_model_fails_before_compute(tmp_path, capsys):
    assert main(["run", f"base_model={tmp_path / 'nowhere'}", f"out_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "base model file missing" in err and "unet/config.json" in err
    assert not (tmp_path / "out").exists()


def test_sdxl_directory_without_its_second_text_encoder_fails_before_compute(tmp_path, tiny_sdxl_dir, capsys):
    import shutil

    partial = tmp_path / "sdxl"
    shutil.copytree(tiny_sdxl_dir, partial, ignore=shutil.ignore_patterns("text_encoder_2"))
    assert main(["run", f"base_model={partial}", f"out_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "base model file missing" in err and "text_encoder_2/config.json" in err
    assert not (tmp_path / "out").exists()


def _finished(store: Path) -> list[tuple[str, float]]:
    if not store.exists():
        return []
    try:
        with sqlite3.connect(store) as db:
            return db.execute("SELECT run_id, updated_at FROM runs WHERE status='FINISHED' ORDER BY run_id").fetchall()
    except sqlite3.OperationalError:
        return []


@pytest.mark.slow
def test_sigkill_mid_sweep_then_rerun_completes_without_duplicates(tmp_path, proxy_arch_dir):
    out = tmp_path / "out"
    args = [*BENCH, "run", "budget=smoke", "methods=baseline,controlnet", "seeds=0,1",
            f"base_model={proxy_arch_dir}", f"out_dir={out}", "--quiet"]
    proc = subprocess.Popen(args, env=_env(tmp_path), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not _finished(out / "store.sqlite") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    first = _finished(out / "store.sqlite")
    assert first, "no run finished before the deadline"
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its run process
    proc.wait()
    assert len(first) < 4, "the sweep ended before it could be killed"

    rerun = subprocess.run(args, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    done = _finished(out / "store.sqlite")
    assert len(done) == 4 and len({r for r, _ in done}) == 4
    assert set(first) <= set(done), "a FINISHED record was rewritten or lost"
    pngs = [p for p in (out / "images").rglob("*.png") if not p.name.startswith(".")]
    assert len(pngs) == 4 * 8
    assert all(cv2.imread(str(p)) is not None for p in pngs), "half-written PNG"

    again = subprocess.run(args, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "4/4 runs finished" in again.stdout
    assert _finished(out / "store.sqlite") == done


# ---- run processes never outlive their parent; concurrent runs share the work; damaged stores ----

def _quiet_env(tmp_path: Path) -> dict:
    return {**_env(tmp_path), "WANDB_MODE": "disabled"}  # the mirror is tested in test_wandb.py


def _test_sweep_helpers():
    """tests/test_sweep.py's helpers (its cheap grid), loaded from the file: tests/ is no package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_test_sweep_helpers", Path(__file__).with_name("test_sweep.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _processes() -> dict[int, tuple[list[bytes], int]]:
    """Every process's command line (split on NULs and spaces: a forked run's is one title) and parent pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").split()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        found[int(entry.name)] = (args, ppid)
    return found


def _run_processes(out: Path) -> dict[int, list[bytes]]:
    """Live run processes (`python -m bench.run.process RUN_ID OUT_DIR ...`) writing to `out`, by pid."""
    return {pid: args for pid, (args, _) in _processes().items()
            if b"bench.run.process" in args and str(out).encode() in args}


def _fork_servers(parent: int) -> dict[int, list[bytes]]:
    """The fork servers (bench.run.forkserver) that process `parent` started, by pid."""
    return {pid: args for pid, (args, ppid) in _processes().items() if b"--fork-server" in args and ppid == parent}


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def _torch_loaded(pid: int) -> bool:
    try:
        return b"libtorch" in Path(f"/proc/{pid}/maps").read_bytes()
    except OSError:
        return False


def _kill_parent_when(args: list[str], env: dict, out: Path, ready, timeout: float = 600) -> dict:
    """Start `args` (a bench command), wait until ready(run processes, fork servers, output so far),
    SIGKILL that process alone (not its process group, so nothing kills its run processes and fork
    server but the death signal), and assert that none of them survives it. Returns what was seen
    at the kill."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    chunks: list[bytes] = []
    # A daemon reader, never joined before the check: the pipe ends only when every writer is gone,
    # the run process included, so waiting for it would wait for an orphan to finish.
    threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read1(1 << 16), b"")), daemon=True).start()
    deadline, kids, servers = time.time() + timeout, {}, {}
    try:
        while proc.poll() is None and time.time() < deadline:
            kids, servers = _run_processes(out), _fork_servers(proc.pid)
            if ready(kids, servers, b"".join(chunks)):
                break
            time.sleep(0.005)
        seen = {"kids": kids, "servers": servers, "output": b"".join(chunks),
                "torch": {pid: _torch_loaded(pid) for pid in [*kids, *servers]}}
        assert proc.poll() is None, "the command ended before the kill point: " + seen["output"][-2000:].decode()
        assert time.time() < deadline, "kill point not reached: " + seen["output"][-2000:].decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

        def survivors() -> list[int]:
            return [*_run_processes(out), *(pid for pid in servers if _alive(pid))]

        until = time.time() + 5
        while survivors() and time.time() < until:
            time.sleep(0.05)
        assert kids or servers, "nothing was started before the kill"
        assert not survivors(), f"processes outlived their parent: {survivors()}"
    finally:
        for pid in [proc.pid, *_run_processes(out), *servers]:  # never leave one behind, whatever failed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    return seen


def _rows(store: Path, sql: str) -> list:
    with sqlite3.connect(store) as db:
        return db.execute(sql).fetchall()


@pytest.mark.slow
def test_killing_bench_run_at_any_point_leaves_no_run_process_and_the_rerun_completes(tmp_path, proxy_arch_dir):
    """Kill -9 the `bench run` process while its fork server imports, right after the server forked
    the run, right after it spawned a fresh interpreter instead (before that has imported torch),
    during training and during evaluation: no run process or server survives any of them, and the
    re-run completes the run once."""
    out = tmp_path / "out"
    args = [*BENCH, "run", "budget=smoke", "methods=controlnet", "seeds=0", "metrics=canny_f1",
            f"base_model={proxy_arch_dir}", f"out_dir={out}"]  # progress on: its output shows the steps
    env = _quiet_env(tmp_path)

    # while the fork server imports the stack (before torch), and right after it forked the run
    importing = _kill_parent_when(args, env, out, lambda kids, servers, text: bool(servers))
    assert not importing["kids"] and not any(importing["torch"].values()), "killed too late: torch was imported"
    spawned = _kill_parent_when(args, env, out, lambda kids, servers, text: bool(kids))
    (run_id,) = {a[a.index(b"bench.run.process") + 1].decode() for a in spawned["kids"].values()}
    # without the server: a fresh interpreter per run, killed before it has imported torch
    fresh = _kill_parent_when(args, {**env, "CONTROLBENCH_FORK_SERVER": "0"}, out,
                              lambda kids, servers, text: bool(kids))
    assert not fresh["servers"] and not any(fresh["torch"].values()), "killed too late: torch was imported"

    started = {}

    def training(kids, servers, text):  # training follows the train split's rendering (64 samples, about a second)
        if kids and b"render train set" in text:
            started.setdefault("t", time.time())
        return "t" in started and time.time() - started["t"] > 8.0

    # 2000 steps (another run id) keep it training long enough to be killed there on any machine
    trained = _kill_parent_when([*args, "budget.train_steps=2000"], env, out, training)
    (long_id,) = {a[a.index(b"bench.run.process") + 1].decode() for a in trained["kids"].values()}
    assert any(trained["torch"].values()) and b"sample:" not in trained["output"]
    assert not (out / "images" / long_id).exists()

    evaluated = _kill_parent_when(args, env, out,
                                  lambda kids, servers, text: kids and (out / "images" / run_id).is_dir())
    assert any(evaluated["torch"].values())
    assert _rows(out / "store.sqlite", "SELECT COUNT(*) FROM runs") == [(0,)]  # nothing reached the store
    assert sorted(_rows(out / "store.sqlite", "SELECT run_id FROM claims")) == sorted([(run_id,), (long_id,)])

    rerun = subprocess.run([*args, "--quiet"], env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and "1/1 runs finished" in rerun.stdout, rerun.stderr[-2000:]
    assert _rows(out / "store.sqlite", "SELECT run_id, status FROM runs") == [(run_id, "FINISHED")]
    assert _rows(out / "store.sqlite", "SELECT run_id FROM claims") == [(long_id,)]  # its dead parent's, stale
    assert [p.name for p in (out / "records").iterdir()] == [f"{run_id}.json"]
    assert len([p for p in (out / "images" / run_id).iterdir() if not p.name.startswith(".")]) == 8


@pytest.mark.slow
def test_killing_bench_sweep_right_after_it_spawned_a_run_leaves_no_run_process(tmp_path, proxy_arch_dir):
    grid = _test_sweep_helpers()._grid(tmp_path, proxy_arch_dir, 1)
    out, env = tmp_path / "out", _quiet_env(tmp_path)
    args = [*BENCH, "sweep", str(grid), "--local", "--quiet"]
    importing = _kill_parent_when(args, env, out, lambda kids, servers, text: bool(servers))
    assert not importing["kids"] and not any(importing["torch"].values()), "killed too late: torch was imported"
    _kill_parent_when(args, env, out, lambda kids, servers, text: bool(kids))
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and "1 ran here" in rerun.stdout, rerun.stderr[-2000:]
    assert [s for _, s in _rows(out / "store.sqlite", "SELECT run_id, status FROM runs")] == ["FINISHED"]
    assert _rows(out / "store.sqlite", "SELECT * FROM claims") == []


@pytest.mark.slow
def test_two_concurrent_bench_runs_on_one_out_split_the_work(tmp_path, proxy_arch_dir):
    out = tmp_path / "out"
    args = [*BENCH, "run", "budget=smoke", "methods=baseline", "seeds=0,1", "metrics=canny_f1",
            f"base_model={proxy_arch_dir}", f"out_dir={out}", "--quiet"]
    procs = [subprocess.Popen(args, env=_quiet_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    ran = [int(o.split(" ran here")[0].split("(")[-1]) for o, _ in outs]
    assert sum(ran) == 2, outs  # each run ran exactly once, in one of the two processes
    if ran == [1, 1]:  # one of them found the other's run claimed (the other may find its run finished)
        assert any("1 skipped: claimed by another live process" in o for o, _ in outs), outs
    assert sorted(s for _, s in _rows(out / "store.sqlite", "SELECT run_id, status FROM runs")) == ["FINISHED"] * 2


def _damaged_store(path: Path) -> bytes:
    """A store whose SQLite header is valid but one of whose pages is garbage."""
    from bench.core.store import RunRecord, Store

    with Store(path) as store:
        for i in range(40):
            store.put(RunRecord(run_id=f"r{i:02d}", spec={"method": "baseline", "seed": i}, status="FINISHED",
                                metrics={"canny_f1": 0.5}, reason="x" * 1500))
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 8 * page and data[:16] == b"SQLite format 3\x00"
    data[5 * page:6 * page] = bytes((i * 37 + 11) % 251 for i in range(page))
    path.write_bytes(bytes(data))
    return bytes(data)


def test_a_store_with_a_damaged_page_is_one_line_exit_2_and_left_untouched(tmp_path, proxy_arch_dir, capsys):
    store = tmp_path / "store.sqlite"
    before = _damaged_store(store)
    good = tmp_path / "good.sqlite"
    from bench.core.store import Store

    Store(good).close()
    grid = _test_sweep_helpers()._grid(tmp_path, proxy_arch_dir, 1)
    baseline = Path(__file__).resolve().parent.parent / "sweeps" / "regression" / "baseline.json"
    commands = {
        "run": ["run", "budget=smoke", "methods=baseline", "seeds=0", f"base_model={proxy_arch_dir}",
                f"out_dir={tmp_path / 'out'}", "--store", str(store), "--quiet"],
        "report": ["report", "--store", str(store), "--out", str(tmp_path / "report")],
        "sweep": ["sweep", str(grid), "--local", "--store", str(store), "--quiet"],
        "check": ["check", "--baseline", str(baseline), "--store", str(store)],
        "merge from": ["store", "merge", str(good), str(store)],
        "merge into": ["store", "merge", str(store), str(good)],
    }
    for name, argv in commands.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"store {store} is damaged" in err and "--store" in err, (name, err)
        assert store.read_bytes() == before, f"{name} wrote to the damaged store"
    assert not (tmp_path / "out" / "images").exists()  # refused before any run
    cli = subprocess.run([*BENCH, "report", "--store", str(store), "--out", str(tmp_path / "r")], capture_output=True,
                         text=True, env=_env(tmp_path), timeout=600)
    assert cli.returncode == 2 and cli.stderr.count("\n") == 1 and "Traceback" not in cli.stderr, cli.stderr
    assert store.read_bytes() == before
