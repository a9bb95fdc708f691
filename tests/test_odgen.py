"""ODGEN: the layout condition, its encoders, pseudo-layouts, the re-detection filter, layout mAP
and the downstream-detector utility protocol."""
from __future__ import annotations

from dataclasses import replace

import bench.datasets  # noqa: F401
import bench.methods  # noqa: F401
import bench.metrics  # noqa: F401
import numpy as np
import pytest
import torch
from bench.datasets.conditions import SEG_PALETTE
from bench.datasets.layouts import BoxStatistics, layout_objects
from bench.datasets.shapes import (
    BACKGROUND,
    COLORS,
    SHAPES,
    Scene,
    ShapesWorld,
    parse_prompt,
    render,
)
from bench.metrics.detector import (
    DetectorUtility,
    TinyCenterNet,
    detector_map,
    train_detector,
)
from bench.metrics.layout import (
    LayoutMAP,
    as_preds,
    as_targets,
    box_map_metric,
    filter_detected,
    map_value,
)

from bench.api.base_model import BaseModel
from bench.api.types import Batch, collate
from bench.core.errors import ConfigError
from bench.core.registry import CONDITIONS, METHODS, METRICS


def _world_batch(split: str, n: int, **kw) -> Batch:
    world = ShapesWorld(split, n, 32, **kw)
    return collate([world[i] for i in range(n)])


def _layout_batch(boxes: list[list[list[float]]], labels: list[list[int]], res: int = 32) -> Batch:
    n = len(boxes)
    return Batch(ids=[f"l{i}" for i in range(n)], image=torch.zeros(n, 3, res, res), prompts=[""] * n,
                 refs={"boxes": [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes],
                       "labels": [torch.tensor(l, dtype=torch.long) for l in labels]})


def render_layouts(batch: Batch) -> torch.Tensor:
    """A reference 'perfect generator': each layout's prompted colours as upright shapes filling their boxes."""
    images = []
    for boxes, labels, prompt in zip(batch.refs["boxes"], batch.refs["labels"], batch.prompts):
        colors = [c for c, _ in parse_prompt(prompt)]
        images.append(torch.from_numpy(render(layout_objects(boxes.numpy(), labels.numpy(), colors), 32).image))
    return torch.stack(images).permute(0, 3, 1, 2).float() / 255


# ---------------------------------------------------------------------------- condition
def test_layout_condition_pixels():
    boxes = np.array([[2, 3, 10, 12], [6, 8, 14, 16]], np.float32)
    scene = Scene(image=np.zeros((16, 16, 3), np.uint8), semantic=np.zeros((16, 16), np.int64),
                  instance=np.zeros((16, 16), np.int64), boxes=boxes, labels=np.array([1, 2]), objects=(), prompt="")
    layout = CONDITIONS.get("layout")
    got = layout.from_scene(scene)
    want = np.zeros((16, 16, 3), np.uint8)
    want[3:12, 2:10] = SEG_PALETTE[2]
    want[8:16, 6:14] = SEG_PALETTE[3]  # later boxes on top
    assert torch.equal(got, torch.from_numpy(want).permute(2, 0, 1).float() / 255)
    with pytest.raises(TypeError):
        layout(torch.zeros(1, 3, 16, 16))
    item = ShapesWorld("train", 1, 32, conditions=("layout",))[0]
    assert item.conditions["layout"].shape == (1, 3, 32, 32)


# ---------------------------------------------------------------------------- method
@pytest.fixture(scope="module")
def odgen(proxy_arch_dir, smoke_budget):
    torch.manual_seed(0)
    base = BaseModel.load(str(proxy_arch_dir))
    return METHODS.get("odgen")(base, "layout", smoke_budget)


def test_encoders_follow_box_positions(odgen):
    k = 3
    batch = _layout_batch([[[4, 5, 14, 13], [9, 16, 20, 27]], []], [[0, 2], []])
    moved = _layout_batch([[[4 + k, 5, 14 + k, 13], [9 + k, 16, 20 + k, 27]], []], [[0, 2], []])
    for mode in (odgen.eval, odgen.train):
        mode()
        with torch.no_grad():
            for encode in (odgen.text_canvas, odgen.image_canvas):
                a, b = encode(batch), encode(moved)
                assert a[0].abs().sum() > 0 and a[1].abs().sum() == 0, "boxes paint; an empty layout stays blank"
                assert torch.equal(b, a.roll(k, -1))
            # the conv net is translation-equivariant away from its zero-padded border (2 px for two 3x3 convs)
            fa, fb = odgen.layout_features(batch), odgen.layout_features(moved)
            assert torch.allclose(fb[..., 2 + k:-2], fa[..., 2:-2 - k], atol=1e-5)


def _scrambled_targets(batch: Batch) -> Batch:
    """The same layouts with every target pixel (and the masks) replaced inside the boxes."""
    image, semantic = batch.image.clone(), batch.refs["semantic"].clone()
    gen = torch.Generator().manual_seed(1)
    for i, boxes in enumerate(batch.refs["boxes"]):
        for x0, y0, x1, y1 in boxes.long().tolist():
            image[i, :, y0:y1, x0:x1] = torch.rand(3, y1 - y0, x1 - x0, generator=gen)
            semantic[i, y0:y1, x0:x1] = 1 + torch.randint(len(SHAPES), (y1 - y0, x1 - x0), generator=gen)
    return Batch(ids=batch.ids, image=image, prompts=batch.prompts, conditions=batch.conditions,
                 refs={**batch.refs, "semantic": semantic})


def test_condition_never_contains_target_pixels(odgen):
    real = _world_batch("train", 4)
    scrambled = _scrambled_targets(real)
    assert not torch.equal(real.image, scrambled.image)
    with torch.no_grad():
        for mode in (odgen.train, odgen.eval):
            mode()
            for cfg in (False, True):
                a = odgen.prepare(real, None, cfg)
                assert torch.equal(a, odgen.prepare(scrambled, None, cfg)), f"training={odgen.training} cfg={cfg}"
    # nor does any pasted pixel equal the target's at its place (v1 pasted the object's own pixels)
    canvas = odgen.image_canvas(real).reshape(4, len(SHAPES), 3, 32, 32)
    pasted = canvas.abs().sum(2) > 0
    same = (canvas == real.image[:, None]).all(2) & pasted
    assert pasted.any() and same.float().sum() < 0.05 * pasted.float().sum()


def test_training_and_generation_build_the_same_image_list(odgen):
    batch = _world_batch("eval", 4)
    with torch.no_grad():
        odgen.train()
        trained = odgen.image_canvas(batch)
        odgen.eval()
        generated = odgen.image_canvas(batch)
    assert trained.abs().sum() > 0 and torch.equal(trained, generated)
    # entries are fixed per (sample, box), not per class: other ids draw other entries of the same bank
    other = odgen.image_canvas(Batch(ids=[f"other{i}" for i in range(4)], image=batch.image, prompts=batch.prompts,
                                     refs=batch.refs))
    assert not torch.equal(other, trained)


def test_bank_is_deterministic_leaves_base_and_rng_alone(proxy_arch_dir, smoke_budget):
    base = BaseModel.load(str(proxy_arch_dir))
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    budget = replace(smoke_budget, sampler="euler")  # a sampler whose step may draw noise
    a, b = (METHODS.get("odgen")(base, "layout", budget) for _ in range(2))
    torch.manual_seed(123)
    bank_a = a.object_bank()
    after_bank = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(4), after_bank), "building the bank consumed the global RNG stream"
    torch.manual_seed(7)  # another global state: the bank must not depend on it
    bank_b = b.object_bank()
    assert [len(c) for c in bank_a] == [len(COLORS)] * len(SHAPES)
    for ca, cb in zip(bank_a, bank_b):
        for (pa, ma), (pb, mb) in zip(ca, cb):
            assert torch.equal(pa, pb) and torch.equal(ma, mb)
            assert pa.shape[1:] == ma.shape and ma.sum() > 0
    assert a.object_bank() is bank_a, "built once"
    assert not base.unet.training and not any(p.requires_grad for p in base.unet.parameters())
    assert all(torch.equal(v, before[k]) for k, v in base.unet.state_dict().items())


def test_bank_from_the_trained_proxy_holds_objects_of_the_prompted_colour(smoke_budget):
    base = BaseModel.load("proxy")
    bank = METHODS.get("odgen")(base, "layout", smoke_budget).object_bank()
    palette = torch.tensor(list(COLORS.values())).float() / 255
    for per_class in bank:
        for want, (pixels, mask) in enumerate(per_class):
            assert 12 <= mask.sum() and mask.shape[0] < 32 and mask.shape[1] < 32, "a cropped object, not the frame"
            colour = pixels[:, mask > 0].median(1).values
            assert int((palette - colour).abs().sum(1).argmin()) == want


def test_sprite_prob_is_gone():
    cls = METHODS.get("odgen")
    assert cls.version == "odgen-v4"
    with pytest.raises(ConfigError, match="unknown hparam 'sprite_prob'"):
        cls.check_hparams({"sprite_prob": 0.5})
    cls.check_hparams({"conditioning_scale": 0.5})


def test_gradient_reaches_controlnet_and_text_net_not_base(odgen):
    odgen.train()
    opt = odgen.configure_optimizers()["optimizer"]
    # ControlNet's zero convs, then its zero conv_out, block gradients into the condition path at
    # init; two optimiser steps open them, as in real training.
    for step in range(3):
        opt.zero_grad()
        odgen.training_loss(_world_batch("train", 4)).backward()
        if step < 2:
            opt.step()
    for part in (odgen.controlnet, odgen.text_proj, odgen.text_net):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), part
    assert all(p.grad is None for p in odgen.base.parameters())
    assert {id(p) for p in odgen.text_net.parameters()} <= {id(p) for p in odgen.trainable_parameters()}


# ---------------------------------------------------------------------------- pseudo-layouts
@pytest.fixture(scope="module")
def stats():
    world = ShapesWorld("train", 256, 32)
    return BoxStatistics.fit([world[i] for i in range(len(world))])


def test_box_statistics_deterministic_in_image_and_on_distribution(stats):
    a, b, c = stats.pseudo_batch(300, seed=1), stats.pseudo_batch(300, seed=1), stats.pseudo_batch(300, seed=2)
    assert a.prompts == b.prompts and all(torch.equal(x, y) for x, y in zip(a.refs["boxes"], b.refs["boxes"]))
    assert a.prompts != c.prompts
    boxes, labels = torch.cat(a.refs["boxes"]), torch.cat(a.refs["labels"])
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 32).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    # 300 layouts (~600 boxes) vs the train frequencies: max gaps measured 0.027 (classes), 0.037 (counts)
    freq = torch.bincount(labels, minlength=len(SHAPES)).float() / len(labels)
    assert (freq - torch.from_numpy(stats.class_freq).float()).abs().max() < 0.06
    counts = np.bincount([len(l) for l in a.refs["labels"]], minlength=len(stats.counts)) / 300
    assert np.abs(counts - stats.counts).max() < 0.08
    for prompt, lab in zip(a.prompts, a.refs["labels"]):  # the world's grammar, distinct colours, z-order
        objects = parse_prompt(prompt)
        assert [SHAPES.index(s) for _, s in objects] == lab.tolist()
        assert len({c for c, _ in objects}) == len(objects)
    assert a.conditions["layout"].shape == (300, 3, 32, 32)


def test_filter_keeps_real_images_and_drops_blank(stats):
    real = _world_batch("eval", 64)
    keep = filter_detected(real.image, real)
    assert keep.float().mean() >= 0.85  # measured 0.95
    blank = torch.tensor(BACKGROUND).float().div(255)[None, :, None, None].expand_as(real.image)
    assert not filter_detected(blank, real).any()
    pseudo = stats.pseudo_batch(64, seed=0)
    assert filter_detected(render_layouts(pseudo), pseudo).float().mean() >= 0.75  # measured 0.91


# ---------------------------------------------------------------------------- metrics
def _coco_map(pred_boxes, gt_boxes) -> float:
    metric = box_map_metric()
    metric.update(as_preds([(torch.tensor(pred_boxes), torch.ones(len(pred_boxes)), torch.zeros(len(pred_boxes), dtype=torch.long))]),
                  as_targets([torch.tensor(gt_boxes)], [torch.zeros(len(gt_boxes), dtype=torch.long)]))
    return float(map_value(metric))


def test_box_map_hand_computed():
    gt = [[0.0, 0.0, 10.0, 10.0]]
    assert _coco_map(gt, gt) == pytest.approx(1.0)
    # shifted by 2.3 px: IoU 7.7/12.3 = 0.626, matched at thresholds .50, .55, .60 only -> 3/10
    assert _coco_map([[2.3, 0.0, 12.3, 10.0]], gt) == pytest.approx(0.3)
    assert np.isnan(_coco_map([[0.0, 0.0, 1.0, 1.0]], np.zeros((0, 4), np.float32).tolist()))


def test_layout_map_on_images():
    assert METRICS.get("layout_map") is LayoutMAP and LayoutMAP.evaluator_ids == ("detector-cv2-v1",)
    image = np.full((32, 32, 3), BACKGROUND, np.uint8)
    image[8:20, 8:20] = COLORS["red"]
    batch = _layout_batch([[[8, 8, 20, 20]]], [[SHAPES.index("square")]])
    metric = LayoutMAP()
    metric.update(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255, batch)
    # the detector reads the edge at 8.25/19.75: IoU (11.5/12)^2 = 0.918, matched at .50 ... .90 -> 9/10
    assert float(metric.compute()) == pytest.approx(0.9)
    metric.reset()
    real = _world_batch("eval", 64)
    metric.update(real.image, real)
    assert float(metric.compute()) > 0.65  # measured 0.733


def test_detector_learns_real_scenes():
    assert sum(p.numel() for p in TinyCenterNet().parameters()) < 100_000
    train, test = _world_batch("train", 256), _world_batch("test", 128)
    model = train_detector(train.image, train.refs["boxes"], train.refs["labels"], steps=300, seed=0)
    assert float(detector_map(model, test.image, test.refs["boxes"], test.refs["labels"])) > 0.3  # measured 0.397


def test_detector_utility_end_to_end():
    assert METRICS.get("detector_map") is DetectorUtility
    metric = DetectorUtility(n_synthetic=96, n_real=96, n_test=96, steps=200)
    real = _world_batch("eval", 2)
    metric.update(real.image, real)
    with pytest.raises(RuntimeError, match="synthesize"):
        metric.compute()
    world = ShapesWorld("train", 256, 32)
    out = metric.synthesize(render_layouts, world, seed=0)
    assert set(out) == {"real", "synth", "mixed", "kept"} and metric.compute() == out
    assert all(v.ndim == 0 for v in out.values())
    # measured: kept 0.854; mAP real 0.268, synth 0.223, mixed 0.288 (200 steps, 96 images each)
    assert float(out["kept"]) > 0.75
    assert float(out["real"]) > 0.18 and float(out["mixed"]) > 0.18
    assert float(out["synth"]) > 0.15, "a perfect generator's data should train a detector nearly as well as real data"


# ---------------------------------------------------------------------------- stage 1 (§3.1)
def test_object_crops_resize_one_boxed_object_per_sample_to_the_frame():
    from bench.methods.odgen import object_crops

    image = torch.rand(2, 3, 32, 32)
    batch = replace(_layout_batch([[[4, 6, 12, 20]], []], [[2], []]), image=image)
    crops = object_crops(batch, torch.Generator().manual_seed(0))
    assert crops.ids == ["l0/object0"] and crops.prompts == [f"a {SHAPES[2]}"]  # the boxless sample has none
    region = image[0:1, :, 6:20, 4:12]  # rows y0..y1, cols x0..x1 (pixel centres inside the box)
    want = torch.nn.functional.interpolate(region, size=(32, 32), mode="bilinear", antialias=True)[0].clamp(0, 1)
    assert torch.allclose(crops.image[0], want)
    assert object_crops(_layout_batch([[], []], [[], []])) is None


def test_odgen_plans_its_stage1_run_first_and_skipping_it_plans_nothing(proxy_arch_dir, tmp_path):
    from tests.test_cnpp_protocol import _specs

    specs, _ = _specs(proxy_arch_dir, tmp_path, methods=["odgen"], condition=["layout"], metrics=["layout_map"])
    assert [s.method for s in specs] == ["odgen_stage1", "odgen"] and specs[1].init_run == specs[0].run_id
    alone, _ = _specs(proxy_arch_dir, tmp_path, methods=["odgen"], condition=["layout"], metrics=["layout_map"],
                      hparams={"odgen": {"init_from": ""}})
    assert [s.method for s in alone] == ["odgen"] and not alone[0].init_run
    with pytest.raises(ConfigError, match="init_from must be one of '', 'odgen_stage1'"):
        METHODS.get("odgen").check_hparams({"init_from": "controlnet"})


def test_stage1_trains_the_unet_on_scenes_and_crops_and_odgen_starts_from_it(proxy_arch_dir, smoke_budget, tmp_path):
    base = BaseModel.load(str(proxy_arch_dir))
    shared = {k: v.clone() for k, v in base.unet.state_dict().items()}
    stage1 = METHODS.get("odgen_stage1")(base, "layout", smoke_budget)
    stage1.train()
    batch = _world_batch("train", 4)
    stage1.training_loss(batch).backward()
    grads = [p.grad for p in stage1.base.unet.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # the loss is L_objects + scene_weight * L_scenes: with no boxes only the scene term is left, weighted
    no_boxes = replace(batch, refs={**batch.refs, "boxes": [b[:0] for b in batch.refs["boxes"]]})
    weighted = METHODS.get("odgen_stage1")(base, "layout", smoke_budget, {"scene_weight": 0.25})
    torch.manual_seed(3)
    scene = stage1.training_loss(no_boxes)
    torch.manual_seed(3)
    assert torch.allclose(weighted.training_loss(no_boxes), 0.25 * scene)

    with torch.no_grad():  # stand-in for trained weights: a UNet that differs from the shared base
        for p in stage1.base.unet.parameters():
            p.add_(0.01)
    stage1.save_weights(tmp_path / "stage1")
    odgen = METHODS.get("odgen")(base, "layout", smoke_budget)
    odgen.load_init(tmp_path / "stage1")
    tuned = stage1.base.unet.state_dict()
    assert all(torch.equal(v, tuned[k]) for k, v in odgen.base.unet.state_dict().items())
    assert all(torch.equal(v, shared[k]) for k, v in base.unet.state_dict().items()), "the shared base changed"
    assert not any(p.requires_grad for p in odgen.base.unet.parameters())
    assert torch.equal(odgen.controlnet.conv_in.weight, tuned["conv_in.weight"]), "ControlNet copied from stage 1"
    assert odgen.stage1_unet and [len(c) for c in odgen.object_bank()] == [len(COLORS)] * len(SHAPES)
    # its checkpoint carries the stage-1 UNet, so `bench eval` generates with the base it trained on
    odgen.save_weights(tmp_path / "odgen")
    again = METHODS.get("odgen")(BaseModel.load(str(proxy_arch_dir)), "layout", smoke_budget)
    again.load_weights(tmp_path / "odgen")
    assert again.stage1_unet and all(torch.equal(v, tuned[k]) for k, v in again.base.unet.state_dict().items())


def test_bank_prompts_follow_stage1():
    from bench.methods.odgen import bank_prompts

    after = bank_prompts(True)
    assert after == [[f"a {shape}"] * len(COLORS) for shape in SHAPES]
    before = bank_prompts(False)
    assert [parse_prompt(p[0]) for p in before] == [[(next(iter(COLORS)), shape)] for shape in SHAPES]
