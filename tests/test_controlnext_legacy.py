"""ControlNeXt's older SD1.5 release (dvlab-research/ControlNeXt ControlNeXt-SD1.5/models/controlnet.py, the layout
of the published SD1.5 `controlnet.safetensors`): its keys, strict loading with the switch to its branch, its
injection after the UNet mid block checked against a hand computation, errors, and the save -> load round trip."""
from __future__ import annotations

import bench.methods  # noqa: F401
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from bench.api.base_model import BaseModel
from bench.core.errors import ConfigError
from bench.core.registry import METHODS

# `ControlNetModel()` of ControlNeXt-SD1.5/models/controlnet.py, counted by instantiating the official class.
OFFICIAL_LEGACY_PARAMS = 5_352_327


def legacy_shapes(width: int = 256, out: int = 1280) -> dict[str, tuple[int, ...]]:
    """The state dict the official `ControlNetModel.__init__` produces, written out from its code: `scale`
    (nn.Parameter(torch.tensor(1.))), `time_embedding` (TimestepEmbedding(128, 256)), `down_res` (ResnetBlock2D
    in_channels [3, 128, 256], out_channels [128, 256, 256]), `down_sample` (Downsample2D "op": `.conv`),
    `mid_convs` ([Sequential(conv, ReLU, conv), conv 1x1 256 -> 1280]). `width` is the 256, 128 its half."""
    half = width // 2
    shapes = {"scale": (), "time_embedding.linear_1.weight": (width, half), "time_embedding.linear_1.bias": (width,),
              "time_embedding.linear_2.weight": (width, width), "time_embedding.linear_2.bias": (width,)}

    def conv(name, cout, cin, k=3):
        shapes.update({f"{name}.weight": (cout, cin, k, k), f"{name}.bias": (cout,)})

    for i, (cin, cout) in enumerate([(3, half), (half, width), (width, width)]):
        for norm, c in (("norm1", cin), ("norm2", cout)):
            shapes.update({f"down_res.{i}.{norm}.weight": (c,), f"down_res.{i}.{norm}.bias": (c,)})
        shapes.update({f"down_res.{i}.time_emb_proj.weight": (cout, width), f"down_res.{i}.time_emb_proj.bias": (cout,)})
        conv(f"down_res.{i}.conv1", cout, cin), conv(f"down_res.{i}.conv2", cout, cout)
        if cin != cout:
            conv(f"down_res.{i}.conv_shortcut", cout, cin, 1)
        conv(f"down_sample.{i}.conv", cout, cout)
    conv("mid_convs.0.0", width, width), conv("mid_convs.0.2", width, width)
    conv("mid_convs.1", out, width, 1)
    return shapes


@pytest.fixture(scope="module")
def tiny_sd(tiny_sd_dir):
    return BaseModel.load(str(tiny_sd_dir))


def _method(base, smoke_budget):
    return METHODS.get("controlnext")(base, "canny", smoke_budget, {})


def _legacy_file(base, directory, seed=1):
    """A random legacy control module for `base` (branch width 2x its first block, output its mid block's width)."""
    blocks = base.unet.config.block_out_channels
    g = torch.Generator().manual_seed(seed)
    # non-zero everywhere, `scale` included, so no zero-initialised layer can hide a wiring bug
    state = {k: torch.randn(s, generator=g) * 0.1 + 0.05
             for k, s in legacy_shapes(-(-2 * blocks[0] // 8) * 8, blocks[-1]).items()}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "controlnet.safetensors"))
    return state


def _inputs(base, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, base.unet.config.in_channels, 16, 16, generator=g)
    state = torch.rand(2, 3, 16 * base.scale_factor, 16 * base.scale_factor, generator=g)
    return x, torch.tensor([100, 800]), base.encode_prompt(["a red circle", "a blue square"]), state


def test_sd15_scale_legacy_branch_is_the_official_module(smoke_budget):

    with torch.device("meta"):
        method = _method(BaseModel.load("sd15-arch"), smoke_budget)
        branch = method.new_branch(legacy=True)
    assert not method.legacy  # fresh training uses the current layout
    ours = {k: tuple(v.shape) for k, v in branch.state_dict().items()}
    assert ours == legacy_shapes()
    assert sum(v.numel() for v in branch.state_dict().values()) == OFFICIAL_LEGACY_PARAMS
    assert [d.conv.stride for d in branch.down_sample] == [(2, 2)] * 3  # 512 px -> 64 latents, as the official model


def _official_control(branch, cond, t):
    """ControlNetModel.forward (ControlNeXt-SD1.5/models/controlnet.py), written out on the loaded modules."""
    emb = branch.time_embedding(branch.time_proj(t))
    for res, down in zip(branch.down_res, branch.down_sample):
        cond = down(res(cond, emb))
    for conv in branch.mid_convs:
        cond = conv(cond)
    return cond


def test_legacy_file_loads_strictly_and_adds_after_the_mid_block(tiny_sd, smoke_budget, tmp_path):
    method = _method(tiny_sd, smoke_budget).eval()
    x, t, embeds, cond = _inputs(tiny_sd)
    with torch.no_grad():
        before = method.denoise(x, t, embeds, cond)
    written = _legacy_file(tiny_sd, tmp_path)
    method.load_weights(tmp_path)
    assert method.legacy
    loaded = method.branch.state_dict()
    assert loaded.keys() == written.keys() and all(torch.equal(loaded[k], written[k]) for k in written)

    # ControlNeXt-SD1.5/models/unet.py: the mid block's output plus the control, pooled to its size, given the
    # output's per-sample mean and (unbiased) std, times the learned scale; nothing else changes
    def by_hand(module, inputs, sample):
        control = F.adaptive_avg_pool2d(_official_control(method.branch, cond, t), sample.shape[-2:])
        dims = (1, 2, 3)
        normed = ((control - control.mean(dims, keepdim=True)) / (control.std(dims, keepdim=True) + 1e-12)
                  * sample.std(dims, keepdim=True) + sample.mean(dims, keepdim=True))
        return sample + normed * written["scale"]

    with torch.no_grad():
        handle = method.base.unet.mid_block.register_forward_hook(by_hand)
        expected = method.base.unet(x, t, **embeds.unet_inputs()).sample
        handle.remove()
        got = method.denoise(x, t, embeds, cond)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - before).abs().max() > 1e-3  # the control changes the prediction


def test_a_legacy_file_that_does_not_fit_is_a_one_line_error(tiny_sd, tiny_sdxl_dir, smoke_budget, tmp_path):
    written = _legacy_file(tiny_sd, tmp_path)
    save_file({k: v for k, v in written.items() if k != "down_res.2.conv1.weight"},
              str(tmp_path / "controlnet.safetensors"))
    with pytest.raises(ConfigError, match=r"controlnet\.safetensors is not a ControlNeXt control module for this "
                                          r"base: missing keys down_res\.2\.conv1\.weight$") as e:
        _method(tiny_sd, smoke_budget).load_weights(tmp_path)
    assert "\n" not in str(e.value)

    _legacy_file(tiny_sd, tmp_path)
    with pytest.raises(ConfigError, match="is for SD1.5 bases"):
        _method(BaseModel.load(str(tiny_sdxl_dir)), smoke_budget).load_weights(tmp_path)


def test_legacy_save_then_load_is_exact(tiny_sd, smoke_budget, tmp_path):
    first = _method(tiny_sd, smoke_budget).eval()
    written = _legacy_file(tiny_sd, tmp_path / "release")
    first.load_weights(tmp_path / "release")
    first.save_weights(tmp_path / "saved")
    saved = load_file(str(tmp_path / "saved" / "controlnet.safetensors"))
    assert saved.keys() == written.keys() and all(torch.equal(saved[k], written[k]) for k in written)

    second = _method(tiny_sd, smoke_budget).eval()
    second.load_weights(tmp_path / "saved")
    assert second.legacy
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x, t, embeds, cond = _inputs(tiny_sd, seed=1)
    with torch.no_grad():
        assert torch.equal(first.denoise(x, t, embeds, cond), second.denoise(x, t, embeds, cond))
