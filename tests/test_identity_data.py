"""The identity world: disjoint identity pools, determinism, references, keypoints, Batch layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from bench.datasets.identity import (
    IDENTITIES,
    KEYPOINTS_LOCAL,
    PATTERNS,
    IdentityWorld,
    draw_keypoints,
    identity_pools,
    keypoints_of,
    render_identity,
)
from bench.datasets.shapes import BACKGROUND, COLORS, SHAPES, ShapeObject

from bench.api.types import collate
from bench.core.registry import CONDITIONS, DATASETS
from bench.run.data import materialize

PALETTE = np.array([BACKGROUND, *COLORS.values()], np.float32)
NAMES = ["background", *COLORS]


def colours_seen(image: np.ndarray, min_pixels: int = 3) -> set[str]:
    """Palette colours with at least min_pixels pixels within RGB distance 40 (blends belong to none)."""
    dist = np.linalg.norm(image.astype(np.float32)[:, :, None] - PALETTE, axis=-1)
    label = np.where(dist.min(-1) < 40, dist.argmin(-1), -1)
    return {NAMES[c] for c in range(1, len(NAMES)) if np.count_nonzero(label == c) >= min_pixels}


def test_identities_enumerated_and_pools_disjoint():
    assert len(IDENTITIES) == len(SHAPES) * len(COLORS) * (len(COLORS) - 1) * len(PATTERNS) == 360
    assert len({(i.shape, i.body, i.second, i.pattern) for i in IDENTITIES}) == 360
    assert [i.index for i in IDENTITIES] == list(range(360))
    pools = identity_pools()
    train, eval_, test = (set(pools[s]) for s in ("train", "eval", "test"))
    assert len(train) == 240 and len(eval_) == 60 and len(test) == 60
    assert not train & eval_ and not train & test and not eval_ & test
    assert train | eval_ | test == set(range(360))
    # every attribute value is learned from train identities, so held-out ones are new combinations
    for attr, values in (("shape", SHAPES), ("body", COLORS), ("second", COLORS), ("pattern", PATTERNS)):
        assert {getattr(IDENTITIES[i], attr) for i in train} == set(values)
    # samples of a split only ever show that split's identities, whatever the world seed
    for split, pool in pools.items():
        for seed in (0, 7):
            world = IdentityWorld(split, 130, seed=seed)
            assert {int(world[i].refs["identity"]) for i in range(0, 130, 13)} <= set(pool)
    assert {world.identity(i).index for i in range(60)} == test  # one cycle covers the pool


def test_deterministic_and_seeded():
    a, b = IdentityWorld("eval", 5, num_refs=2), IdentityWorld("eval", 5, num_refs=2)
    for i in range(5):
        x, y = a[i], b[i]
        assert torch.equal(x.image, y.image) and x.prompts == y.prompts
        assert torch.equal(x.refs["reference_images"][0], y.refs["reference_images"][0])
        assert torch.equal(x.refs["keypoints"], y.refs["keypoints"])
    other = IdentityWorld("eval", 5, seed=1)
    assert any(not torch.equal(a[i].image, other[i].image) for i in range(5))
    train = IdentityWorld("train", 5)
    assert all(not torch.equal(a[i].image, train[i].image) for i in range(5))


def test_scene_identical_across_num_refs():
    one, four = IdentityWorld("test", 6, num_refs=1, conditions=("keypoints",)), IdentityWorld("test", 6, num_refs=4)
    assert one.version != four.version
    for i in range(6):
        x, y = one[i], four[i]
        assert torch.equal(x.image, y.image) and x.prompts == y.prompts
        assert torch.equal(x.refs["keypoints"], y.refs["keypoints"])
        assert torch.equal(x.refs["identity"], y.refs["identity"])
        r1, r4 = x.refs["reference_images"][0], y.refs["reference_images"][0]
        assert r1.shape == (1, 3, 32, 32) and r4.shape == (4, 3, 32, 32)
        assert torch.equal(r1[0], r4[0])
        assert len({r.numpy().tobytes() for r in r4}) == 4  # each reference is a new view


def test_references_show_the_instance_and_prompt_hides_its_colours():
    world = IdentityWorld("eval", 40, num_refs=3)
    companions_seen = 0
    for i in range(40):
        scene, ident = world.scene(i), world.identity(i)
        instance, companions = scene.objects[-1], scene.objects[:-1]
        assert instance.shape == ident.shape and instance.color == ident.body
        assert all(o.color not in ident.colors for o in companions)
        companions_seen += len(companions)
        words = scene.prompt.replace(",", "").split()
        assert not ident.colors & set(words), scene.prompt  # the colours must come from the references
        assert scene.prompt.startswith(f"a {ident.shape}")
        assert sum(w in SHAPES for w in words) == len(scene.objects)
        assert ident.colors <= colours_seen(scene.image)
        for k in range(3):
            ref = world.reference(i, k)
            assert len(ref.objects) == 1 and ref.identity == ident
            assert colours_seen(ref.image) == set(ident.colors), (ident, k)
    assert companions_seen > 20  # scenes do have companions


def test_instance_visible_on_top():
    world = IdentityWorld("train", 30)
    for i in range(30):
        scene = world.scene(i)
        top = len(scene.objects)
        full = render_identity(scene.identity, scene.objects[-1], (), 32).instance
        assert np.array_equal(scene.instance == top, full == 1)  # nothing covers the instance
        for z in range(1, top):
            assert np.count_nonzero(scene.instance == z) > 0


def test_keypoints_follow_the_instance():
    ident = IDENTITIES[0]
    base = ShapeObject(ident.shape, ident.body, 12.0, 14.0, 7.0, 0.0)
    moved = ShapeObject(ident.shape, ident.body, 19.0, 16.0, 7.0, 25.0)
    k0, k1 = keypoints_of(base), keypoints_of(moved)
    assert np.allclose(k0, np.array([12.0, 14.0]) + KEYPOINTS_LOCAL * 7.0, atol=1e-5)
    assert np.allclose(k1[2], [19.0, 16.0])  # the nose is the centre
    a = np.deg2rad(25.0)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    assert np.allclose(k1, (k0 - k0[2]) @ rot.T + k1[2], atol=1e-4)  # shifted and rotated with the instance
    # in real scenes every keypoint lies on the instance, and the condition image draws them there
    world = IdentityWorld("eval", 20, conditions=("keypoints",))
    for i in range(20):
        b, scene = world[i], world.scene(i)
        kps = b.refs["keypoints"][0].numpy()
        assert np.array_equal(kps, scene.keypoints)
        top = len(scene.objects)
        for x, y in kps:  # ShapeObject coordinates: pixel j's samples sit at j + 0..0.75
            assert scene.instance[int(y), int(x)] == top
        cond = b.conditions["keypoints"][0]
        for (x, y), colour in zip(kps, ([1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1])):
            px = cond[:, int(y), int(x)]
            assert torch.allclose(px, torch.tensor(colour, dtype=px.dtype), atol=0.45), (i, px)


def test_draw_keypoints_is_insightface_style():
    kps = np.array([[10, 10], [22, 10], [16, 16], [11, 22], [21, 22]], np.float32)
    img = draw_keypoints(kps, 32, 32)
    assert img.shape == (3, 32, 32) and img.min() >= 0 and img.max() <= 1
    assert img[:, 0:4, 0:4].sum() == 0 and img[:, 28:, 28:].sum() == 0  # black elsewhere
    mid = img[:, 13, 13]  # on the limb eye -> nose: the eye's colour at 60%
    assert mid[0] > 0.3 and mid[1] < 0.1 and mid[2] < 0.1
    assert torch.equal(draw_keypoints(kps + 3, 32, 32)[:, 13 + 3, 13 + 3], mid)


def test_registry_batch_layout_and_materialize():
    one = DATASETS.get("identity")(split="eval", size=3, resolution=32, conditions=("keypoints",))
    multi = DATASETS.get("identity_multi")(split="eval", size=3, resolution=32, conditions=())
    assert one.num_refs == 1 and multi.num_refs == 4
    extractor = CONDITIONS.get("keypoints")
    assert extractor.version and extractor.name == "keypoints"
    with pytest.raises(TypeError):
        extractor(torch.zeros(1, 3, 32, 32))
    b = collate([one[i] for i in range(3)])
    assert b.image.shape == (3, 3, 32, 32) and len(b.prompts) == 3
    assert b.conditions["keypoints"].shape == (3, 3, 32, 32)
    assert b.refs["identity"].dtype == torch.int64 and b.refs["identity"].shape == (3,)
    assert b.refs["keypoints"].dtype == torch.float32 and b.refs["keypoints"].shape == (3, 5, 2)
    assert [r.shape for r in b.refs["reference_images"]] == [(1, 3, 32, 32)] * 3
    assert b.refs["class_word"] == [IDENTITIES[int(i)].shape for i in b.refs["identity"]]
    m = materialize(multi, progress=False)
    got = m.__getitems__([0, 2])
    assert torch.allclose(got.image, collate([multi[0], multi[2]]).image, atol=1 / 255)
    assert got.refs["reference_images"][1].shape == (4, 3, 32, 32)
    assert got.refs["identity"].tolist() == [multi.identity(0).index, multi.identity(2).index]
