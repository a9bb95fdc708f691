"""ControlNeXt's released checkpoint layout: the official control module's keys, strict loading of the
control module and the tuned UNet weights (absolute on SD1.5, deltas on SDXL), save -> load round trips,
and one-line errors for files that do not fit."""
from __future__ import annotations

import bench.methods  # noqa: F401
import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.api.base_model import BaseModel
from bench.core.errors import ConfigError
from bench.core.registry import METHODS

# `ControlNeXtModel()` of dvlab-research/ControlNeXt ControlNeXt-SD1.5-Training/models/controlnext.py, counted by
# instantiating the official class (its SDXL twin, ControlNeXt-SDXL/models/controlnet.py, has the same count).
OFFICIAL_SD15_PARAMS = 3_526_400


def official_shapes(width: int = 256, out: int = 320) -> dict[str, tuple[int, ...]]:
    """The state dict the official ControlNeXtModel.__init__ produces, written out from its code: `embedding`
    (Sequential: conv 3->64 s2, GN, ReLU, conv 64->64, GN, ReLU, conv 64->128, GN, ReLU), `time_embedding`
    (TimestepEmbedding(128, 256)), `down_res` (ResnetBlock2D 128->128, 128->256), `down_sample` (Downsample2D
    "op": `.conv`), `mid_convs` ([Sequential(conv, ReLU, GN, conv, GN), conv 1x1 256->320]). `width` is the 256;
    the other widths are its official fractions, so the proxy-scale layout follows from it."""
    stem, half = width // 4, width // 2
    shapes = {"time_embedding.linear_1.weight": (width, half), "time_embedding.linear_1.bias": (width,),
              "time_embedding.linear_2.weight": (width, width), "time_embedding.linear_2.bias": (width,)}

    def conv(name, cout, cin, k=3):
        shapes.update({f"{name}.weight": (cout, cin, k, k), f"{name}.bias": (cout,)})

    def norm(name, c):
        shapes.update({f"{name}.weight": (c,), f"{name}.bias": (c,)})

    conv("embedding.0", stem, 3), norm("embedding.1", stem)
    conv("embedding.3", stem, stem), norm("embedding.4", stem)
    conv("embedding.6", half, stem), norm("embedding.7", half)
    for i, (cin, cout) in enumerate([(half, half), (half, width)]):
        norm(f"down_res.{i}.norm1", cin), conv(f"down_res.{i}.conv1", cout, cin)
        shapes.update({f"down_res.{i}.time_emb_proj.weight": (cout, width),
                       f"down_res.{i}.time_emb_proj.bias": (cout,)})
        norm(f"down_res.{i}.norm2", cout), conv(f"down_res.{i}.conv2", cout, cout)
        if cin != cout:
            conv(f"down_res.{i}.conv_shortcut", cout, cin, 1)
        conv(f"down_sample.{i}.conv", cout, cout)
    conv("mid_convs.0.0", width, width), norm("mid_convs.0.2", width)
    conv("mid_convs.0.3", width, width), norm("mid_convs.0.4", width)
    conv("mid_convs.1", out, width, 1)
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.1 + 0.05 for k, s in shapes.items()}  # non-zero everywhere


@pytest.fixture(scope="module")
def tiny_sdxl(tiny_sdxl_dir):
    return BaseModel.load(str(tiny_sdxl_dir))


def _method(base, smoke_budget, **hparams):
    return METHODS.get("controlnext")(base, "canny", smoke_budget, hparams)


def _tuned_file(method, seed: int) -> dict[str, torch.Tensor]:
    """Random values for the UNet parameters the official SD1.5 recipe tunes (names containing `to_out`)."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) * 0.02 for n, p in method._shared_unet[0].named_parameters()
            if "to_out" in n}


def test_sd15_scale_branch_is_the_official_module(smoke_budget):

    with torch.device("meta"):
        method = _method(BaseModel.load("sd15-arch"), smoke_budget, unet_trainable="")
    ours = {k: tuple(v.shape) for k, v in method.branch.state_dict().items()}
    assert ours == official_shapes()
    assert sum(method.branch.state_dict()[k].numel() for k in ours) == OFFICIAL_SD15_PARAMS
    assert sum(p.numel() for p in method.trainable_parameters()) == OFFICIAL_SD15_PARAMS
    strides = [method.branch.embedding[0].stride] + [d.conv.stride for d in method.branch.down_sample]
    assert strides == [(2, 2)] * 3  # 512 px -> 64 latents, as the official model


@pytest.mark.parametrize("base_name, deltas", [("proxy", False), ("tiny_sdxl", True)])
def test_official_layout_loads_strictly(base_name, deltas, request, smoke_budget, tmp_path):
    """A tiny random checkpoint in the official layout: the control module lands key for key; the UNet file's
    values are absolute on SD1.5 and added to the base on SDXL, in a private copy (the shared base unchanged)."""
    base = request.getfixturevalue(base_name)
    shared = {n: p.detach().clone() for n, p in base.unet.named_parameters()}
    method = _method(base, smoke_budget)
    out = base.unet.config.block_out_channels[0]
    control = random_state(official_shapes(-(-2 * out // 8) * 8, out), seed=1)
    unet = _tuned_file(method, seed=2)
    save_file(control, str(tmp_path / "controlnet.safetensors"))
    save_file(unet, str(tmp_path / "unet.safetensors"))
    method.load_weights(tmp_path)
    loaded = method.branch.state_dict()
    assert loaded.keys() == control.keys() and all(torch.equal(loaded[k], control[k]) for k in control)
    params = dict(method.base.unet.named_parameters())
    for name, value in unet.items():
        assert torch.equal(params[name].detach(), value + shared[name] if deltas else value), name
    assert all(torch.equal(p, shared[n]) for n, p in base.unet.named_parameters()), "the shared base changed"


@pytest.mark.parametrize("base_name", ["proxy", "tiny_sdxl"])
def test_save_then_load_is_exact(base_name, request, smoke_budget, tmp_path):
    base = request.getfixturevalue(base_name)
    trained = _method(base, smoke_budget)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # stand-in for training: every saved tensor moves off its initial value
        for p in [*trained.branch.parameters(), *trained.tuned]:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    trained.save_weights(tmp_path)
    assert {f.name for f in tmp_path.iterdir()} == {"controlnet.safetensors", "unet.safetensors"}
    saved_unet = load_file(str(tmp_path / "unet.safetensors"))
    tuned = dict(zip(trained.tuned_names, trained.tuned))
    assert saved_unet.keys() == tuned.keys()
    shared = dict(base.unet.named_parameters())
    for name, value in saved_unet.items():  # SDXL: W - W_base, as the official SDXL loader adds it back
        expected = tuned[name] - shared[name] if base.is_sdxl else tuned[name]
        assert torch.equal(value, expected.detach()), name

    loaded = _method(base, smoke_budget)
    loaded.load_weights(tmp_path)
    a, b = trained.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6 if base.is_sdxl else 0) for k in a)  # deltas round
    if not base.is_sdxl:
        x, t = torch.randn(2, 3, 32, 32), torch.tensor([100, 800])
        embeds = base.encode_prompt(["a red circle", "a blue square"])
        state = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(trained.eval().denoise(x, t, embeds, state), loaded.eval().denoise(x, t, embeds, state))


def test_a_file_that_does_not_fit_is_a_one_line_error(proxy, smoke_budget, tmp_path):
    method = _method(proxy, smoke_budget)
    control = random_state(official_shapes(32, 16), seed=4)
    missing = {k: v for k, v in control.items() if k != "mid_convs.0.4.weight"}
    save_file(missing, str(tmp_path / "controlnet.safetensors"))
    with pytest.raises(ConfigError, match=r"missing keys mid_convs\.0\.4\.weight") as e:
        method.load_weights(tmp_path)
    assert "\n" not in str(e.value)

    # a hybrid file (the current layout plus a third ResNet stage and a 1280-wide output): fits neither layout
    old = {**control, "down_res.2.conv1.weight": torch.ones(256, 256, 3, 3),
           "mid_convs.1.weight": torch.ones(1280, 32, 1, 1)}
    save_file(old, str(tmp_path / "controlnet.safetensors"))
    with pytest.raises(ConfigError, match=r"unexpected keys down_res\.2\.conv1\.weight.*shape mismatches "
                                          r"mid_convs\.1\.weight \(1280, 32, 1, 1\) \(expected \(16, 32, 1, 1\)\)"):
        method.load_weights(tmp_path)

    save_file(control, str(tmp_path / "controlnet.safetensors"))
    save_file({"down_blocks.0.no_such.weight": torch.ones(3)}, str(tmp_path / "unet.safetensors"))
    with pytest.raises(ConfigError, match=r"unet\.safetensors does not fit this base's UNet: unexpected keys "
                                          r"down_blocks\.0\.no_such\.weight"):
        method.load_weights(tmp_path)
    (tmp_path / "unet.safetensors").unlink()
    (tmp_path / "controlnet.safetensors").unlink()
    with pytest.raises(ConfigError, match="has no ControlNeXt control module"):
        method.load_weights(tmp_path)
