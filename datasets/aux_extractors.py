"""controlnet-aux detectors as condition extractors, with weights from local files only.

Each network class comes from controlnet_aux and is built with random init; its state dict is
read from `$CONTROLBENCH_WEIGHTS/annotators/<file>` (lllyasviel/Annotators file names) with
torch.load(weights_only=True) or safetensors, never `Processor` or `from_pretrained`. The
controlnet-aux detector wrapper then does its own pre/post-processing, so maps match what
ControlNet checkpoints were trained on: the input's shorter side goes to `detect_resolution`
(rounded to a multiple of 64), and the map comes back to the input size (INTER_AREA when
shrinking, bilinear when enlarging).

DWPose: controlnet_aux.dwpose needs mmcv + mmpose + mmdet; DWPose/RTMPose ONNX models run
through the `rtmlib` pose backend (bench.datasets.pose) instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
from bench.datasets.conditions import to_uint8

from bench.core.registry import CONDITIONS
from bench.core.weights import WeightSpec, register_weight, weight_path


def annotator(name: str, file: str) -> WeightSpec:
    return register_weight(WeightSpec(name, f"annotators/{file}", how=f"download {file} from "
                                      "huggingface.co/lllyasviel/Annotators on a connected machine and copy it there"))


HED = annotator("annotator-hed", "ControlNetHED.pth")
PIDINET = annotator("annotator-pidinet", "table5_pidinet.pth")
LINEART = annotator("annotator-lineart", "sk_model.pth")
DPT_HYBRID = annotator("annotator-dpt-hybrid", "dpt_hybrid-midas-501f0c75.pt")
OPENPOSE_BODY = annotator("annotator-openpose-body", "body_pose_model.pth")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Safe load; unwraps training checkpoints ({'state_dict'}; MiDaS {'model', 'optimizer'}) and
    DataParallel's `module.` prefixes."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)
    sd = sd["model"] if "optimizer" in sd else sd
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _hed(sd):
    from controlnet_aux.hed import ControlNetHED_Apache2, HEDdetector

    net = ControlNetHED_Apache2()
    net.load_state_dict(sd)
    return HEDdetector(net), [net]


def _pidinet(sd):
    from controlnet_aux.pidi import PidiNetDetector
    from controlnet_aux.pidi.model import pidinet

    net = pidinet()
    net.load_state_dict(sd)
    return PidiNetDetector(net), [net]


def _lineart(sd):
    from controlnet_aux.lineart import Generator, LineartDetector

    net = Generator(3, 1, 3)
    net.load_state_dict(sd)
    return LineartDetector(net, net), [net]  # the coarse model is never called (coarse=False)


def _dpt_hybrid(sd):
    from controlnet_aux.midas import MidasDetector
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    net = DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)
    net.load_state_dict(sd)
    return MidasDetector(net), [net]


def _openpose(sd):
    from controlnet_aux.open_pose import OpenposeDetector
    from controlnet_aux.open_pose.body import Body
    from controlnet_aux.open_pose.model import bodypose_model
    from controlnet_aux.open_pose.util import transfer

    net = bodypose_model()
    net.load_state_dict(transfer(net, sd))  # the Caffe-converted file lacks the stage prefix
    body = Body.__new__(Body)  # Body.__init__ would torch.load unsafely
    body.model = net
    return OpenposeDetector(body), [net]


def _aux_version() -> str:
    try:
        return package_version("controlnet-aux")
    except PackageNotFoundError:  # the version still names the weights; calling it says what is missing
        return "-missing"


@lru_cache(maxsize=None)
def load_detector(builder: Callable, path: str):
    detector, nets = builder(load_state_dict(Path(path)))
    for net in nets:
        net.float().eval()
    return detector, nets


@dataclass(frozen=True)
class AuxExtractor:
    """A controlnet-aux detector: images [B,3,H,W] in [0,1] -> maps [B,3,H,W] in [0,1]."""

    name: str
    weight: WeightSpec
    builder: Callable
    detect_resolution: int = 512
    options: tuple[tuple[str, object], ...] = ()  # detector keyword arguments, part of the version

    @property
    def weights(self) -> tuple[str, ...]:
        return (self.weight.name,)

    @property
    def version(self) -> str:
        opts = "".join(f"-{k}{v}" for k, v in self.options)
        return (f"{self.name}-controlnet_aux{_aux_version()}-{Path(self.weight.relpath).name}"
                f"-d{self.detect_resolution}{opts}-v1")

    def detector(self, device: torch.device | str = "cpu"):
        detector, nets = load_detector(self.builder, str(weight_path(self.weight.name)))
        for net in nets:
            net.to(device)
        return detector

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        detector, (h, w) = self.detector(images.device), images.shape[-2:]
        out = []
        for image in to_uint8(images):
            m = detector(image, detect_resolution=self.detect_resolution, image_resolution=self.detect_resolution,
                         output_type="np", **dict(self.options))
            m = np.repeat(m[..., None], 3, 2) if m.ndim == 2 else m
            out.append(cv2.resize(m, (w, h), interpolation=cv2.INTER_AREA if m.shape[0] > h else cv2.INTER_LINEAR))
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float().div(255).to(images.device)


SOFT_EDGES = ("hed", "pidinet", "lineart")
for _extractor in (
    AuxExtractor("hed", HED, _hed),
    AuxExtractor("pidinet", PIDINET, _pidinet),
    AuxExtractor("lineart", LINEART, _lineart),
    AuxExtractor("depth_midas", DPT_HYBRID, _dpt_hybrid),
    AuxExtractor("openpose", OPENPOSE_BODY, _openpose, options=(("include_hand", False), ("include_face", False))),
):
    CONDITIONS.register(_extractor.name)(_extractor)
