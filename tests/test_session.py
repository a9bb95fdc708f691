"""The library entry points the CLI calls: `bench.run_config` (bench run), `bench.rescore` (bench eval)
and `bench.profile.run_profile` (bench profile), from Python."""
from __future__ import annotations

import pytest

import bench
from bench.core.errors import ConfigError
from bench.core.store import Store

pytestmark = pytest.mark.slow


def test_run_config_runs_stores_and_reports_what_bench_run_would(tmp_path, proxy_arch_dir):
    summary = bench.run_config(None, {"budget": "smoke", "methods": ["baseline"], "seeds": [0],
                                      "base_model": str(proxy_arch_dir)}, out=tmp_path / "out", progress=False)
    assert summary.finished == len(summary.records) == 1 and summary.ran == 1
    assert summary.store_path == tmp_path / "out" / "store.sqlite" and summary.report.is_file()
    with Store(summary.store_path, read_only=True) as s:
        assert [r.run_id for r in s.records()] == [summary.records[0].run_id]
    from bench.run.session import plan

    specs, _ = plan(None, ["budget=smoke", "methods=baseline", "seeds=0", f"base_model={proxy_arch_dir}"])
    assert [s.run_id for s in specs] == [summary.records[0].run_id]  # the CLI's spelling plans the same run
    again = bench.run_config(None, ["budget=smoke", "methods=baseline", "seeds=0", f"base_model={proxy_arch_dir}"],
                             out=tmp_path / "out", progress=False)
    assert again.ran == 0 and again.finished == 1  # finished runs are skipped


def test_run_config_refuses_bad_input_before_writing(tmp_path):
    with pytest.raises(ConfigError, match="unknown method 'controlnett'; did you mean 'controlnet'"):
        bench.run_config(None, ["methods=controlnett"], out=tmp_path / "out")
    with pytest.raises(ConfigError, match="--jobs"):
        bench.run_config(None, [], out=tmp_path / "out", jobs=0)
    assert not (tmp_path / "out").exists()


def test_run_profile_estimates_without_timing():
    from bench.profile import run_profile

    result = run_profile(["controlnet"], arch="proxy", resolutions=[32], batches=[1, 2], estimate=True, progress=False)
    assert [r["batch"] for r in result.estimates] == [1, 2] and not result.measured
    assert all(r.spec["kind"] == "estimate" for r in result.records)
    with pytest.raises(ConfigError, match="--fit needs --estimate"):
        run_profile(["controlnet"], fit="24GiB")
