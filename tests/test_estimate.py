"""`bench profile --estimate`: fake-tensor peak memory and FLOPs per training step.

The estimate is checked against what it stands for, without a GPU:
- its peak and split equal the live tensor bytes counted by the same dispatch mode on real tensors
  running the same step (a tiny SD: VAE, text encoder, UNet, ControlNet);
- its FLOP counter agrees with hand counts for a convolution and an attention layer, whichever
  SDPA kernel runs;
- the SD1.5 architecture built for it (meta device, then fake tensors) has the published counts.
"""
from __future__ import annotations

import functools

import bench.methods  # noqa: F401
import pytest
import torch


def _fake_and_real(base: str, precision: str, batches):
    from bench.profile.estimate import Estimator
    from bench.profile.measure import ProfileSetup

    setup = ProfileSetup(base, 32, 2, precision, 1)
    fake, real = Estimator("controlnet", setup), Estimator("controlnet", setup, fake=False)
    # a second batch size reuses the rig, as --batch 1,4,8 does
    return fake, [(fake.step(b), real.step(b)) for b in batches]


def test_estimate_equals_live_bytes_on_real_tensors():
    """Same rig (the proxy, pixel space), same step, same tracker: fake tensors count exactly
    what real ones hold, at the peak and in each part of it, and the same FLOPs."""
    from bench.core.store import ESTIMATE_CATEGORIES

    fake, steps = _fake_and_real("proxy", "fp32", (2,))
    (f, r), = steps
    assert f.peak_bytes == r.peak_bytes > 0
    assert f.split == r.split and f.flops == r.flops > 0
    assert all(f.split[c] > 0 for c in ESTIMATE_CATEGORIES)
    # steady state: the AdamW state (2 fp32 moments + a step count per tensor) and every gradient
    # are live at the peak
    params = fake.rig.method.trainable_parameters()
    assert f.split["optimizer"] == sum(2 * p.numel() * 4 + 4 for p in params)
    assert f.split["gradients"] == sum(p.numel() * 4 for p in params)


def test_estimate_of_a_latent_model_under_autocast_is_within_cpu_kernel_differences(tiny_sd_dir):
    """Tiny SD (VAE, text encoder, UNet) under bf16 autocast. Weights, gradients, optimizer state
    and FLOPs are equal; the peak may be below the real CPU count, by at most 1% here, never
    above, for two CPU-kernel choices that meta kernels (and CUDA's) do not make:
    - group norm keeps mean/rstd in fp32 for bf16 input with fp32 weights (meta: bf16);
    - group norm keeps a channels-last input channels-last (the VAE attention's reshape makes
      one), so diffusers' resnet `.contiguous()` copies it (meta: already contiguous)."""
    from bench.core.store import ESTIMATE_CATEGORIES

    _, steps = _fake_and_real(str(tiny_sd_dir), "bf16", (2,))
    (f, r), = steps
    assert f.flops == r.flops > 0
    assert {c: f.split[c] for c in ESTIMATE_CATEGORIES[:3]} == {c: r.split[c] for c in ESTIMATE_CATEGORIES[:3]}
    assert 0 <= r.peak_bytes - f.peak_bytes <= 0.01 * r.peak_bytes


def test_tracker_counts_storages_once_and_frees_them():
    """A view adds nothing, a dead tensor leaves; the peak is the largest live sum."""
    from bench.profile.estimate import StorageTracker

    tracker = StorageTracker()
    with tracker:
        a = torch.ones(1000)  # 4000 B
        v = a.view(10, 100)  # same storage
        b = a * 2  # +4000
        del a, v, b
        c = torch.ones(250)  # 1000 B, after the others died
    assert tracker.peak == 8000
    assert tracker.current == 1000 and c.numel() == 250


def test_conv_flops_match_a_hand_count():
    from bench.profile.estimate import flop_counter

    n, cin, cout, k, h = 2, 3, 8, 3, 16
    conv = torch.nn.Conv2d(cin, cout, k, padding=1)
    x = torch.randn(n, cin, h, h, requires_grad=True)
    forward = 2 * cout * cin * k * k * h * h * n  # a multiply-add per weight per output position
    with flop_counter() as fc:
        y = conv(x)
    assert fc.get_total_flops() == forward
    with flop_counter() as fc:
        y.sum().backward()
    assert fc.get_total_flops() == 2 * forward  # grad of the input and grad of the weight, one conv each


@pytest.mark.parametrize("kernel", ["math", "efficient"])
def test_attention_flops_match_a_hand_count(kernel):
    """diffusers' cross-attention layer: four projections and QK^T, AV. The CPU's fused kernel is
    not in torch's FLOP registry; bench.profile.estimate adds it with the same formula."""
    from diffusers.models.attention_processor import Attention

    from bench.profile.estimate import flop_counter
    from bench.profile.measure import attention_kernel

    n, lq, s, c, cc, heads, d = 2, 16, 7, 32, 24, 4, 8
    inner = heads * d
    attn = Attention(query_dim=c, heads=heads, dim_head=d, cross_attention_dim=cc)
    x, ctx = torch.randn(n, lq, c, requires_grad=True), torch.randn(n, s, cc)
    projections = 2 * n * lq * c * inner + 2 * (2 * n * s * cc * inner) + 2 * n * lq * inner * c  # q, k, v, out
    scores_and_mix = 2 * (2 * n * heads * lq * s * d)  # QK^T and softmax(.)V
    with attention_kernel(kernel, "cpu"), flop_counter() as fc:
        y = attn(x, ctx)
    assert fc.get_total_flops() == projections + scores_and_mix
    with attention_kernel(kernel, "cpu"), flop_counter() as fc:
        y.sum().backward()
    # backward: q and out need grad of input and weight, k and v of the weight only; attention
    # needs dV, dP, dQ, dK (math), and the fused kernel recomputes QK^T (torch's formula)
    linear = 2 * (2 * n * lq * c * inner) + 2 * (2 * n * s * cc * inner) + 2 * (2 * n * lq * inner * c)
    attention = (4 if kernel == "math" else 5) * 2 * n * heads * lq * s * d
    assert fc.get_total_flops() == linear + attention


def test_sd15_estimate_rig_has_the_published_counts():
    """Built on the meta device and placed as fake tensors: no memory, and the exact counts
    (UNet 859.5M, ControlNet 361.3M; T2I-Adapter's default is the released 1-channel canny one,
    77.0M; the 3-channel full adapter, 77.4M, is what a depth condition builds)."""
    from bench.profile.estimate import Estimator
    from bench.profile.measure import ProfileSetup

    controlnet = Estimator("controlnet", ProfileSetup("sd15-arch", 512, 1, "bf16", 1))
    t2i = {c: Estimator("t2i_adapter", ProfileSetup("sd15-arch", 512, 1, "bf16", 1, c)).counts["params_trainable"]
           for c in ("canny", "depth")}
    assert sum(p.numel() for p in controlnet.rig.method.base.unet.parameters()) == 859_520_964
    assert controlnet.counts["params_trainable"] == 361_279_120
    assert round(t2i["canny"] / 1e5) == 770 and round(t2i["depth"] / 1e5) == 774
    assert all(p.is_meta or type(p).__name__ == "FakeTensor" for p in controlnet.rig.method.parameters())


def test_profile_estimate_cli_stores_estimates_apart_from_measurements(tmp_path, capsys, tiny_sd_dir):
    from bench.analysis.claims import evaluate_all, load_claims
    from bench.cli import main
    from bench.core.store import Store

    store = tmp_path / "est.sqlite"
    rc = main(["profile", "--estimate", "--arch", str(tiny_sd_dir), "--methods", "frozen,controlnet,baseline",
               "--resolution", "32", "--batch", "1,2", "--precision", "bf16", "--store", str(store), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "kind: estimate" in out and "mem/fz" in out and "batch-size curves" in out
    assert "baseline: not estimated: has no trainable parameters" in out
    assert "controlnet-memory-vs-frozen" in out and "bs 2, 32px, bf16" in out
    with Store(store) as s:
        records = s.records()
    assert {(r.method, r.spec["kind"], r.spec["budget_fields"]["batch_size"]) for r in records} == {
        (m, "estimate", b) for m in ("frozen", "controlnet") for b in (1, 2)}
    assert all(r.spec["dataset"] == "profile-estimate" and "peak_mem_mb" not in r.compute for r in records)
    # the measured claims never read an estimate
    measured = {c.claim.id: c.verdict for c in evaluate_all(records, [c for c in load_claims() if "vs-frozen" in c.id])}
    assert set(measured.values()) == {"not measured"}
    # the report: estimates in their own section, not as leaderboard rows
    assert main(["report", "--store", str(store), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "leaderboard.md").read_text()
    assert "## Training cost estimates (kind: estimate)" in text and "batch-size curves" in text
    assert "| controlnet |" not in text
    assert (tmp_path / "report" / "figures" / "estimate_curves_0.png").stat().st_size > 0


@pytest.mark.parametrize("argv,fix", [(["--fit", "24 bananas"], "24GiB"), (["--fit", "24GiB"], "needs --estimate"),
                                      (["--batch", "0,4"], "1,4,8"), (["--precision", "bf17"], "bf16-true")])
def test_profile_bad_input_is_one_line_naming_the_fix(argv, fix, capsys):
    from bench.cli import main

    extra = ["--estimate"] if argv[0] == "--fit" and argv[1] != "24GiB" else []
    assert main(["profile", "--arch", "proxy", "--methods", "controlnet", *extra, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert fix in err and "\n" not in err


# ---- the estimate's options: checkpointing, attention kernel, precision, --help ------------------

@functools.lru_cache(maxsize=None)
def _option_step(base: str, precision: str = "fp32", checkpointing: bool = False, attention: str = "default"):
    """The fake estimate of one controlnet step at 32 px, batch 2, and its rig (shared by the tests below)."""
    from bench.profile.estimate import Estimator
    from bench.profile.measure import ProfileSetup

    est = Estimator("controlnet", ProfileSetup(base, 32, 2, precision, 1, checkpointing=checkpointing,
                                               attention=attention))
    return est.step(2), est.rig


def test_checkpointing_lowers_activation_memory_and_recomputes_the_forward(tiny_sd_dir):
    """Tiny SD, whose UNet and ControlNet support diffusers' gradient checkpointing: on, the
    blocks keep only their inputs and recompute their forward in backward, so activations at the
    peak drop, the state (weights, gradients, AdamW) does not move, and FLOPs rise by at most one
    forward of the checkpointed models (the frozen UNet's backward costs one forward, the
    ControlNet's two: a recomputed forward is under half of the step)."""
    off, _ = _option_step(str(tiny_sd_dir), attention="efficient")
    on, _ = _option_step(str(tiny_sd_dir), checkpointing=True, attention="efficient")
    assert on.split["activations"] < 0.75 * off.split["activations"] and on.peak_bytes < off.peak_bytes
    assert {c: on.split[c] for c in ("weights", "gradients", "optimizer")} == {
        c: off.split[c] for c in ("weights", "gradients", "optimizer")}
    assert off.flops < on.flops <= 1.5 * off.flops


def test_attention_kernel_math_saves_the_attention_matrix_the_fused_kernel_does_not():
    """On the CPU, "efficient" runs the CPU's flash kernel (its only fused one; CUDA's
    memory-efficient kernel saves the same: the output and a logsumexp per query row) and
    PyTorch's CPU default picks it too; "math" saves the softmax probabilities for backward. Live
    bytes after one diffusers cross-attention forward differ by exactly that: n*heads*lq*s fp32
    probabilities against n*heads*lq fp32 logsumexps."""
    from diffusers.models.attention_processor import Attention

    from bench.profile.estimate import StorageTracker
    from bench.profile.measure import attention_kernel

    n, lq, s, c, cc, heads, d = 2, 64, 77, 32, 24, 4, 8
    torch.manual_seed(0)
    attn = Attention(query_dim=c, heads=heads, dim_head=d, cross_attention_dim=cc)
    x, ctx = torch.randn(n, lq, c, requires_grad=True), torch.randn(n, s, cc)
    saved = {}
    for kernel in ("math", "efficient", "default"):
        tracker = StorageTracker()
        with attention_kernel(kernel, "cpu"), tracker:
            y = attn(x, ctx)
            saved[kernel] = tracker.current
        del y
    assert saved["math"] - saved["efficient"] == n * heads * lq * s * 4 - n * heads * lq * 4
    assert saved["default"] == saved["efficient"]


def test_attention_option_reaches_the_estimate(tiny_sd_dir):
    """--attention math vs efficient on tiny SD: only activations move (math holds the attention
    matrices), and the fused kernel's backward recomputes QK^T, so it counts more FLOPs."""
    math_, _ = _option_step(str(tiny_sd_dir), attention="math")
    fused, _ = _option_step(str(tiny_sd_dir), attention="efficient")
    assert math_.split["activations"] > fused.split["activations"]
    assert {c: math_.split[c] for c in ("weights", "gradients", "optimizer")} == {
        c: fused.split[c] for c in ("weights", "gradients", "optimizer")}
    assert math_.flops < fused.flops


@pytest.mark.parametrize("precision,size", [("bf16", 4), ("fp16", 4), ("bf16-true", 2)])
def test_state_bytes_follow_the_precision_by_hand_count(precision, size):
    """Autocast (bf16, fp16) keeps fp32 master weights, gradients and AdamW moments: 4 bytes an
    element, as fp32; pure bf16 casts them all to 2 bytes. AdamW's step count is one fp32
    scalar per tensor either way; integer buffers keep their dtype. Activations under autocast
    are below fp32's (half-precision matmul and conv outputs)."""
    step, rig = _option_step("proxy", precision)
    method = rig.method
    elem = lambda t: size if t.is_floating_point() else t.element_size()  # noqa: E731
    trainable = method.trainable_parameters()
    assert step.split["weights"] == sum(t.numel() * elem(t) for t in (*method.parameters(), *method.buffers()))
    assert step.split["gradients"] == sum(p.numel() * size for p in trainable)
    assert step.split["optimizer"] == sum(2 * p.numel() * size + 4 for p in trainable)
    fp32, _ = _option_step("proxy", "fp32")
    assert step.split["activations"] < fp32.split["activations"]


def test_profile_estimate_help_explains_every_option(capsys):
    """`bench profile --estimate --help`: every option is listed with an explanation, and the
    estimate's own options say what they change."""
    from bench.cli.main import build_parser, main

    with pytest.raises(SystemExit) as done:
        main(["profile", "--estimate", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    profile = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "profile")[1]
    for action in profile._actions:
        assert action.help and len(action.help) > 10, action.option_strings
        assert action.option_strings[-1] in text
    for words in ("gradient checkpointing", "math", "efficient", "bf16-true", "fake tensors", "24GiB", "1,4,8"):
        assert words in text, words


def _estimate_rows(evil: str) -> list[dict]:
    """Estimate rows as `bench profile --estimate` makes them, with made-up figures: peak memory
    (MiB) and FLOPs per method grow linearly in the batch; one variant carries markup."""
    cost = {"finetune": (9000, 300, 30), "frozen": (3000, 200, 20), "controlnet": (4500, 260, 24),
            f"t2i_adapter:q={evil}": (3400, 230, 21)}
    rows = []
    for variant, (fixed, per_sample, tflop) in cost.items():
        method, _, rest = variant.partition(":")
        for b in (1, 2, 4):
            rows.append(dict(variant=variant, method=method, hparams={"q": evil} if rest else {}, device="cpu-fake",
                             batch=b, resolution=512, precision="bf16", params_total=1e9, params_trainable=3e8,
                             params_added=3e8, est_peak_mem_mb=fixed + per_sample * b, est_weights_mb=fixed,
                             est_gradients_mb=0.0, est_optimizer_mb=0.0, est_activations_mb=per_sample * b,
                             flops_per_step=tflop * 1e12 * b))
    return rows


def test_html_report_shows_the_estimate_curves_escaped(tmp_path):
    """The HTML report's estimate section: the table with the ratios to finetune and frozen, the
    ratio-vs-batch figure written as a PNG beside the Markdown (which links it) and inlined in the
    HTML, every record string escaped."""
    import re

    import cv2

    from bench.profile.measure import ProfileSetup, to_records
    from bench.report.write import write_report

    evil = "<script>alert(1)</script>"
    setup = ProfileSetup(f"base<b>{evil}", 512, 1, "bf16", 1)
    records = to_records(_estimate_rows(evil), setup, kind="estimate")
    out = tmp_path / "report"
    md = write_report(records, out, {"git_sha": "abc"}, plots=True, html=True).read_text()
    html_text = (out / "leaderboard.html").read_text()
    png = out / "figures" / "estimate_curves_0.png"
    assert png.stat().st_size > 0 and cv2.imread(str(png)).shape[0] > 300
    assert "(figures/estimate_curves_0.png)" in md and "estimate_curves_1" not in md
    section = html_text.split("<h2>Training cost estimates (kind: estimate)</h2>", 1)[1]
    assert section.count('<img class="" src="data:image/png;base64,') == 1
    assert "alert(1)</script>" not in html_text and html_text.count("<script") == 1
    assert "Training cost vs batch (estimate) · base&lt;b&gt;&lt;script&gt;" in section
    # controlnet at batch 4: memory (4500 + 4 * 260) / (9000 + 4 * 300) vs finetune, / (3000 + 4 * 200) vs frozen
    row = re.search(r"<tr><td>controlnet</td><td>512px, bf16</td>(.*?)</tr>.*?<tr><td>controlnet</td><td>512px, "
                    r"bf16</td>(.*?)</tr>.*?<tr><td>controlnet</td><td>512px, bf16</td>(.*?)</tr>", section).group(3)
    cells = re.findall(r">([^<]*)</td>", row)
    assert cells[0] == "4" and cells[-4:] == [f"{5540 / 10200:.3f}", f"{5540 / 3800:.3f}", f"{24 / 30:.3f}",
                                              f"{24 / 20:.3f}"]
    assert "t2i_adapter:q=&lt;script&gt;alert(1)&lt;/script&gt;" in section
    assert "controlnet-memory-vs-frozen" in section and "bs 4, 512px, bf16" in section


# ---- whole-run estimates: evaluation peak, frozen weights in the weight dtype, the budget per card -----

def test_eval_estimate_equals_live_bytes_on_real_tensors(tiny_sd_dir):
    """One sampler step with CFG and the decode, fake vs real tensors on tiny SD: the same peak within
    1% (the CPU kernels' group-norm choices, see above, and the real timestep the fake mode copies);
    it grows with the eval batch."""
    from bench.profile.estimate import Estimator
    from bench.profile.measure import ProfileSetup
    from bench.profile.runplan import eval_peak

    setup = ProfileSetup(str(tiny_sd_dir), 32, 1, "fp32", 1)
    fake, real = Estimator("controlnet", setup), Estimator("controlnet", setup, fake=False)
    f1, f2, r2 = eval_peak(fake, 1), eval_peak(fake, 2), eval_peak(real, 2)
    assert abs(r2 - f2) <= 0.01 * r2 and f2 > f1 > 0
    weights = sum(t.nbytes for t in (*fake.rig.method.parameters(), *fake.rig.method.buffers()))
    assert f1 > weights  # weights plus the step's activations, no gradients or optimizer state


def test_frozen_modules_are_held_in_the_weight_dtype(tiny_sd_dir):
    """bf16-mixed: the frozen base in bf16 (2 bytes), the trained ControlNet fp32 (4), as
    train_controlnet.py casts vae/unet/text_encoder to weight_dtype."""
    from bench.profile.estimate import Estimator
    from bench.profile.measure import ProfileSetup
    from bench.profile.runplan import frozen_in_weight_dtype

    est = Estimator("controlnet", ProfileSetup(str(tiny_sd_dir), 32, 1, "bf16", 1))
    method = est.rig.method
    trained = {id(p) for p in method.trainable_parameters()}
    n_trained = sum(p.numel() for p in method.trainable_parameters())
    n_frozen = sum(p.numel() for p in method.parameters() if id(p) not in trained)
    frozen_in_weight_dtype(est)
    assert sum(p.nbytes for p in method.parameters()) == 4 * n_trained + 2 * n_frozen
    assert all(p.dtype == torch.float32 for p in method.trainable_parameters())


def test_budget_per_card_picks_checkpointing_accumulation_and_eval_batch():
    from bench.profile.measure import ProfileSetup
    from bench.profile.runplan import GIB, Line, MethodPeaks, plan_card

    setup = ProfileSetup("sd15-arch", 512, 1, "bf16", 1)
    peaks = MethodPeaks("m", train=Line(10 * GIB, 2 * GIB), train_ckpt=Line(8 * GIB, 0.5 * GIB),
                        evaluate=Line(4 * GIB, 0.25 * GIB), params_trainable=1.0)
    big = plan_card(peaks, 80 * GIB, 16, setup)  # 10 + 2 * 15 = 40 GiB: batch 16 at once
    assert (big["checkpointing"], big["micro_batch"], big["accumulate"], big["eval_batch_size"]) == (False, 16, 1, 64)
    mid = plan_card(peaks, 24 * GIB, 16, setup)  # 10 + 2 * 7 = 24: micro-batch 8 (divides 16), accumulate 2
    assert (mid["checkpointing"], mid["micro_batch"], mid["accumulate"]) == (False, 8, 2)
    assert mid["train_peak_gib"] == 24 and mid["eval_batch_size"] == 64
    small = plan_card(peaks, 9 * GIB, 16, setup)  # only checkpointing fits: 8 + 0.5 = 8.5 at micro-batch 2
    assert (small["checkpointing"], small["micro_batch"], small["accumulate"], small["eval_batch_size"]) == (
        True, 2, 8, 16)
    none = plan_card(peaks, 4 * GIB, 16, setup)
    assert none["micro_batch"] == 0 and none["checkpointing"] is None and none["eval_batch_size"] == 1


def test_fit_prints_a_budget_per_card(tiny_sd_dir, capsys):
    from bench.cli import main

    rc = main(["profile", "--estimate", "--arch", str(tiny_sd_dir), "--methods", "controlnet,baseline",
               "--resolution", "32", "--batch", "4", "--precision", "bf16", "--fit", "24GiB,64MiB", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "budget per card (32px, bf16, effective batch 4" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("controlnet ")]
    assert [r[1] for r in rows] == ["24G", "0G"] and rows[0][2] == "off" and rows[0][3:6] == ["4", "x", "1"]
    assert "baseline: not estimated: has no trainable parameters" in out
