"""HTML report: escaping, self-containment, figures, and the acceptance check in real
headless Chromium (rows per method, no broken image, nothing fetched from outside)."""
from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from bench.analysis.claims import evaluate_all
from bench.core.artifacts import SampleManifest, file_name, run_paths
from bench.core.store import RunRecord
from bench.report.html import render_html
from bench.report.plots import write_plots, write_sample_grids
from bench.report.tables import leaderboard
from bench.report.write import write_report

EVIL = "ev\"il'<script>alert(1)</script>"
EVIL_PROMPT = "<script>alert(\"prompt\")</script> 'quoted' & \"double\""
F1 = {"version": "1", "higher_is_better": True, "consistency": True}  # as the runner records canny_f1 on canny runs
N_IDS = 3


def _artifacts(tmp: Path, run_id: str, seed: int) -> dict[str, str]:
    """What the runner keeps for a run: generated PNGs, grid conditions and re-extractions, and
    a manifest whose prompts carry markup, to prove the grid escapes them."""
    rng = np.random.default_rng(seed)
    paths = run_paths(tmp, run_id)
    ids = [f"eval-{i:06d}" for i in range(N_IDS)]
    for i, sid in enumerate(ids):
        img = np.zeros((32, 32, 3), np.uint8)
        cv2.rectangle(img, (4 + i, 6), (20 + i, 24), tuple(int(c) for c in rng.integers(60, 255, 3)), -1)
        for key in ("images", "conditions", "reextracted"):
            paths[key].mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(paths[key] / file_name(sid)), img if key == "images" else cv2.Canny(img, 60, 120))
    SampleManifest("canny", "canny_f1", ids, {i: file_name(i) for i in ids},
                   {i: EVIL_PROMPT for i in ids}).write(paths["samples"])
    return {k: str(v) for k, v in paths.items()}


def rec(tmp: Path, run_id: str, method: str, seed: int, f1: float, train_steps: int = 100,
        status: str = "FINISHED", hparams: dict | None = None, recipe: dict | None = None) -> RunRecord:
    budget = {"train_steps": train_steps, "resolution": 32, "eval_samples": N_IDS, "seeds": [0, 1]}
    spec = {"method": method, "method_version": "1", "dataset": "shapes", "dataset_version": "shapes-v1/seed0/32px",
            "condition": "canny", "budget": f"b{train_steps}", "budget_key": f"key{train_steps}", "seed": seed,
            "base_model": "proxy", "hparams": hparams or {}, "budget_fields": budget}
    if recipe is not None:
        spec["recipe"] = recipe
    return RunRecord(run_id=run_id, spec=spec, status=status, reason="OOM <b>" if status != "FINISHED" else "",
                     metrics={"canny_f1": f1}, metric_meta={"canny_f1": F1}, git_sha="abc123",
                     compute={"params_total": 2e6, "params_trainable": 5e5, "step_time_s": 0.1 + f1 / 10,
                              "peak_mem_mb": 900 + 100 * f1},
                     artifacts=_artifacts(tmp, run_id, seed))


@pytest.fixture
def records(tmp_path: Path) -> list[RunRecord]:
    out = []
    for seed in (0, 1):
        out.append(rec(tmp_path, f"cn{seed}", "controlnet", seed, 0.7 + 0.01 * seed))
        out.append(rec(tmp_path, f"t2i{seed}", "t2i_adapter", seed, 0.5 + 0.02 * seed))
        out.append(rec(tmp_path, f"evil{seed}", EVIL, seed, 0.3, hparams={"q": EVIL},
                       recipe={"q": EVIL, "empty_prompt_prob": 0.5}))
        out.append(rec(tmp_path, f"cn400_{seed}", "controlnet", seed, 0.8, train_steps=400))
    out.append(rec(tmp_path, "failed", "t2i_adapter", 2, 0.0, status="FAILED"))
    return out


def render(records: list[RunRecord], out: Path) -> str:
    tables, excluded = leaderboard(records)
    figures = write_plots(tables, records, out / "figures")
    grids = write_sample_grids(tables, records, out / "figures" / "samples")
    text = render_html(tables, excluded, {"git_sha": "abc123"}, evaluate_all(records), figures, grids)
    (out / "leaderboard.html").write_text(text, encoding="utf-8")
    return text


def test_everything_user_provided_is_escaped(records: list[RunRecord], tmp_path: Path) -> None:
    text = render(records, tmp_path / "report")
    assert text.count("<script") == 1  # ours only; planted tags arrive as text
    assert "alert(1)</script>" not in text and "alert(\"prompt\")" not in text
    assert "&lt;script&gt;alert(&quot;prompt&quot;)&lt;/script&gt; &#x27;quoted&#x27; &amp;" in text
    assert 'data-method="ev&quot;il&#x27;&lt;script&gt;' in text
    assert "OOM &lt;b&gt;" in text
    assert ('<b class="user-set">q ev&quot;il&#x27;&lt;script&gt;alert(1)&lt;/script&gt;</b>' in text)


def test_recipes_under_each_table_and_tuning_section(records: list[RunRecord], tmp_path: Path) -> None:
    """The evil arm recorded its recipe, the others predate spec["recipe"]; two controlnet
    settings in one table are tuning trials, the better one (higher canny_f1) named best."""
    extra = [rec(tmp_path, f"cnhp{seed}", "controlnet", seed, 0.9, hparams={"conditioning_scale": 1.5},
                 recipe={"conditioning_scale": 1.5, "empty_prompt_prob": 0.5, "timesteps": "uniform"})
             for seed in (0, 1)]
    text = render(records + extra, tmp_path / "report")
    key100 = text.split("<h2>", 2)[1]  # the first table's section runs until the next heading
    assert key100.index('table class="leaderboard"') < key100.index('<ul class="recipes">')
    items = dict(re.findall(r'<li data-recipe="([^"]*)">(.*?)</li>', text))
    assert items['controlnet {&quot;conditioning_scale&quot;: 1.5}'] == (
        '<code>controlnet {&quot;conditioning_scale&quot;: 1.5}</code>: <b class="user-set">conditioning_scale '
        "1.5</b>, empty_prompt_prob 0.5, timesteps uniform")
    assert items["controlnet {}"].endswith("<i>recipe not recorded</i>")
    assert text.count("<li data-recipe=") == 5  # 4 rows in key100, 1 in key400
    tuning = text.split("<h2>Tuning</h2>", 1)[1].split("<h2>", 1)[0]
    row = re.search(r"<tr><td>controlnet</td><td>canny_f1 ↑</td>(.*?)</tr>", tuning).group(1)
    assert re.findall(r"<td[^>]*>([^<]*)</td>", row) == [
        "2", '{&quot;conditioning_scale&quot;: 1.5}', "0.900", "0.705", "0.802", "0.900"]


def test_self_contained_with_plots_grids_and_spec(records: list[RunRecord], tmp_path: Path) -> None:
    text = render(records, tmp_path / "report")
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text, re.I)
    # and the browser refuses any request leaving the file
    assert 'http-equiv="Content-Security-Policy" content="default-src &#x27;none&#x27;; img-src data:;' in text
    assert "memory vs step time".lower() in text.lower() and "Parameters ·" in text
    assert "canny_f1 vs train steps" in text  # controlnet at 100 and 400 steps -> a curve
    # condition, generated, re-extracted per method and id: 3 methods in key100, 1 in key400
    assert text.count('<img class="sample"') == 3 * N_IDS * (3 + 1)
    assert "canny_f1 ↑" in text and "key100" in text and "abc123" in text and "canny_f1@1" in text


def test_csp_allows_only_the_pages_own_script_and_style_by_hash(records: list[RunRecord], tmp_path: Path) -> None:
    import base64
    import hashlib

    text = render(records, tmp_path / "report")
    csp = html.unescape(re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', text).group(1))
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "nonce-" not in csp
    policy = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", text, re.S)
        assert len(bodies) == 1 and f"<{tag} " not in text  # one element, no attributes to smuggle in
        digest = base64.b64encode(hashlib.sha256(bodies[0].encode()).digest()).decode()
        assert policy[directive] == f"'sha256-{digest}'"
    assert " style=" not in text and " onclick=" not in text  # inline attributes would be refused


def test_write_report_html_and_markdown_parity(records: list[RunRecord], tmp_path: Path) -> None:
    out = tmp_path / "report"
    md_path = write_report(records, out, {"git_sha": "abc123"}, plots=True, html=True)
    md, html_text = md_path.read_text(encoding="utf-8"), (out / "leaderboard.html").read_text(encoding="utf-8")
    for verdict_line in (ln for ln in md.splitlines() if ln.startswith("| t2i-adapter-")):
        cid, verdict = verdict_line.split(" | ")[0][2:], verdict_line.split(" | ")[6]
        assert cid in html_text and f"<b>{verdict}</b>" in html_text
    for png in re.findall(r"\]\((figures/[^)]+\.png)\)", md):
        assert (out / png).is_file(), png
    assert "figures/compute_0.png" in md and "## Samples" in md


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'chromium-profile'}"]
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=600, check=True)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium is not installed "
                    "(apt-get install -y chromium; .ci/run installs it)")
def test_acceptance_in_headless_chromium(records: list[RunRecord], tmp_path: Path) -> None:
    out = tmp_path / "report"
    text = render(records, out)
    url = (out / "leaderboard.html").as_uri()
    dom = _chromium("--virtual-time-budget=5000", "--dump-dom", url, tmp=tmp_path).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body))
    assert attrs.get("ready") == "1", body
    assert attrs["broken-images"] == "0" and int(attrs["images"]) == text.count("<img ")
    methods = [html.unescape(m) for m in re.findall(r'<td data-method="([^"]*)"', dom)]
    # key100 table: controlnet, t2i_adapter, evil; key400 table: controlnet
    assert sorted(methods) == sorted(["controlnet", "controlnet", "t2i_adapter", EVIL])
    assert attrs["leaderboard-rows"] == "4"
    shot = tmp_path / "report.png"
    _chromium(f"--screenshot={shot}", "--window-size=1280,2000", url, tmp=tmp_path)
    assert shot.is_file() and cv2.imread(str(shot)).shape[:2] == (2000, 1280)
