"""Devices follow the method: on a GPU, everything a run touches lives on the method's device.

This box has no GPU, so the tests run on `OnCuda` tensors: CPU tensors whose Python-visible device
is cuda:0 (their C++ device stays the CPU, as FakeTensor keeps `meta` underneath, so no CUDA guard,
stream or allocator is ever touched), under `FakeCuda`, a dispatch mode in which every aten op
refuses cuda and non-scalar cpu operands together, as CUDA kernels do. Unlike FakeTensorMode the
tensors keep their values, so schedulers, prompt drops, rewards and metrics run as they do on a GPU.
The method is moved as Lightning moves it (`LightningModule.to(cuda:0)`), the batch as
`transfer_batch_to_device`, and generation goes through the runner's own call (`Setup.generate`).
"""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import bench.methods  # noqa: F401
import bench.metrics  # noqa: F401
from bench.core.registry import METHODS, METRICS

CUDA = torch.device("cuda", 0)
aten = torch.ops.aten
MATH_SDPA = 0  # sdp::SDPBackend::math: SDPA decomposes into ops that have CPU kernels
COPIES = (aten._to_copy.default, aten.copy_.default, aten._copy_from.default, aten._copy_from_and_resize.default)


class MixedDevices(RuntimeError):
    pass


class OnCuda(torch.Tensor):
    """A CPU tensor (`elem`) that Python code sees on cuda:0."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        out = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                  storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                  layout=elem.layout, device=elem.device,
                                                  requires_grad=elem.requires_grad)
        out.elem = elem
        return out

    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def device(self):
        return CUDA

    @property
    def is_cuda(self):
        return True

    def get_device(self):
        return 0

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})

    def __repr__(self):
        return f"OnCuda({self.elem!r})"


def _is_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def _wrap(out):
    return tree_map(lambda t: OnCuda(t) if isinstance(t, torch.Tensor) and not isinstance(t, OnCuda) else t, out)


def _run(func, args, kwargs):
    """One aten op: refused on mixed devices, else run on the CPU data, cuda in -> cuda out."""
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    on_cuda = [t for t in tensors if isinstance(t, OnCuda)]
    on_cpu = [t for t in tensors if not isinstance(t, OnCuda) and t.dim() > 0]  # a 0-dim CPU tensor may mix
    if on_cuda and on_cpu and func not in COPIES:
        raise MixedDevices(f"{func} got cuda:0 and cpu tensors (cpu shapes {[tuple(t.shape) for t in on_cpu][:2]})")
    if func is aten._fused_sdp_choice.default:
        return MATH_SDPA  # the CUDA kernels SDPA would pick have no CPU build
    if func is aten._to_copy.default and kwargs.get("device") is not None:
        to_cuda = _is_cuda(kwargs["device"])
    elif not tensors and torch._C._current_graph_task_id() != -1:
        # a factory inside a backward formula: C++ takes its device from a gradient's options(), whose
        # C++ device is the CPU here; on a GPU it is the gradient's, cuda
        to_cuda = True
    else:
        to_cuda = _is_cuda(kwargs.get("device")) or bool(on_cuda)
    if _is_cuda(kwargs.get("device")):
        kwargs = {**kwargs, "device": torch.device("cpu")}
    plain_args, plain_kwargs = tree_map(lambda t: t.elem if isinstance(t, OnCuda) else t, (args, kwargs))
    out = func(*plain_args, **plain_kwargs)
    if func is aten.copy_.default:
        return args[0]
    if not to_cuda:
        return out
    if isinstance(args[0], OnCuda) and out is plain_args[0]:  # in place
        return args[0]
    return _wrap(out)


class _ToCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dtype):
        ctx.dtype = x.dtype
        return x.elem.to(dtype or x.dtype, copy=True)

    @staticmethod
    def backward(ctx, grad):
        return OnCuda(grad.to(ctx.dtype)), None


class _ToCuda(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dtype):
        ctx.dtype = x.dtype
        return OnCuda(x.detach().to(dtype or x.dtype, copy=True))

    @staticmethod
    def backward(ctx, grad):
        return (grad.elem if isinstance(grad, OnCuda) else grad).to(ctx.dtype), None


def _move(func, args, kwargs):
    """Tensor.to/.cpu/.cuda by the Python-visible device (C++ sees the CPU on both sides and would alias)."""
    self, rest, kwargs = args[0], args[1:], dict(kwargs)
    dtype = None
    if func is torch.Tensor.cpu:
        target = torch.device("cpu")
    elif func is torch.Tensor.cuda:
        target = CUDA
    elif rest and isinstance(rest[0], torch.Tensor):
        target, dtype = rest[0].device, rest[0].dtype
    else:
        kwargs.pop("copy", None)
        target, dtype, _, _ = torch._C._nn._parse_to(*rest, **kwargs)
    src = isinstance(self, OnCuda)
    dst = src if target is None else _is_cuda(target)
    if src == dst:
        return self if dtype in (None, self.dtype) else self.to(dtype=dtype)
    return _ToCuda.apply(self, dtype) if dst else _ToCpu.apply(self, dtype)


class _Functions(TorchFunctionMode):
    """Python-level calls that would reach CUDA's C++ runtime: moves, numpy, factories given cuda."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda):
            return _move(func, args, kwargs)
        if func in (torch.Tensor.numpy, torch.Tensor.__array__) and isinstance(args[0], OnCuda):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                            "to host memory first.")
        if func is torch.Tensor.tolist and isinstance(args[0], OnCuda):
            return args[0].elem.tolist()
        if _is_cuda(kwargs.get("device")):  # a factory: torch.tensor(device=cuda) would start CUDA's C++ init
            return _wrap(func(*args, **{**kwargs, "device": "cpu"}))
        return func(*args, **kwargs)


class FakeCuda(TorchDispatchMode):
    """Within it, cuda:0 works on a CPU-only machine (see the module docstring)."""

    def __enter__(self):
        self._functions = _Functions()
        self._functions.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._functions.__exit__(*exc)

    reads = 0  # device -> host reads of a value (`.item()`, `bool()`, `int()`): a GPU's host sync each

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is aten._local_scalar_dense.default:
            self.reads += 1
        return _run(func, args, kwargs or {})


@pytest.fixture
def fake_cuda(monkeypatch):
    """FakeCuda, with CUDA's Python-side initialisation and RNG state stubbed (nothing to start).
    Hub kernels off, as the run process sets them (transformers would query the device's capability)."""
    monkeypatch.setenv("USE_HUB_KERNELS", "0")
    monkeypatch.setattr(torch.cuda, "_lazy_init", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.get_rng_state())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": None)
    # Module.to then swaps each parameter with its OnCuda copy (torch.utils.swap_tensors), keeping the
    # Python object, as `.data =` keeps it on a GPU: lists of parameters a method holds stay valid
    old = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield FakeCuda
    finally:
        torch.__future__.set_swap_module_params_on_conversion(old)


def test_the_fake_device_refuses_a_mix_and_keeps_values(fake_cuda):
    """The harness's own check: what the method tests rely on."""
    with fake_cuda():
        a = torch.arange(4.0).to(CUDA)
        assert a.device == CUDA and (a * 2).device == CUDA and a.cpu().device.type == "cpu"
        assert a.tolist() == [0.0, 1.0, 2.0, 3.0] and float(a.sum()) == 6.0
        assert (a + torch.tensor(1.0)).device == CUDA  # a 0-dim CPU tensor may meet cuda, as on a GPU
        with pytest.raises(MixedDevices, match="cuda:0 and cpu"):
            a + torch.ones(4)
        lin = torch.nn.Linear(4, 2).to(CUDA)
        lin(a[None]).sum().backward()
        assert lin.weight.grad.device == CUDA


def _condition(cls):
    return cls.conditions[0] if cls.conditions else "canny"


def _batch(cls, n: int = 2):
    """A batch of the method's sample dataset with the condition it needs (as the contract tests build it)."""
    import bench.datasets  # noqa: F401
    from bench.api.types import collate
    from bench.core.registry import DATASETS

    world = DATASETS.get(cls.sample_dataset)("train", n, 32, (_condition(cls),), seed=0)
    return collate([world[i] for i in range(n)])


# hparams that put each method's device-sensitive path into the first step
STEP_HPARAMS = {"controlnet_pp": {"reward_start": 0.0}}


@pytest.mark.parametrize("name", METHODS.names())
def test_training_step_and_generate_stay_on_the_method_device(name, fake_cuda, proxy_arch_dir, smoke_budget):
    """Each run builds its own base (as a run process does), Lightning moves the method to cuda:0,
    the step trains on a cuda batch, then the runner's generate call samples from it: every op sees
    one device. On 923f740 (before the fix) generate failed for controlnext, finetune and photomaker:
    their private UNet copy moved, the shared base's UNet (the sampler's) stayed on the CPU."""
    from bench.api.base_model import BaseModel
    from bench.api.sampler import generate

    cls = METHODS.get(name)
    torch.manual_seed(0)
    base = BaseModel.load(str(proxy_arch_dir))
    method = cls(base, _condition(cls), smoke_budget, STEP_HPARAMS.get(name, {}))
    batch = _batch(cls, 2)
    with fake_cuda():
        method.to(CUDA)
        method.train()
        loss = method.training_step(method.transfer_batch_to_device(batch, CUDA, 0), 0)
        assert loss.device == CUDA
        if method.trainable_parameters():
            loss.backward()
            assert all(p.grad is None or p.grad.device == CUDA for p in method.trainable_parameters())
            opt = method.configure_optimizers()["optimizer"]
            opt.step()
        method.eval()
        images = generate(base, method, batch, sampler="ddim", steps=2, guidance_scale=2.0, seed=0)
        assert images.device == CUDA and images.shape == batch.image.shape


def test_controlnext_sdxl_saves_deltas_on_the_device(fake_cuda, tiny_sdxl_dir, smoke_budget, tmp_path):
    """On SDXL, ControlNeXt saves its tuned UNet weights as deltas against the shared (CPU) UNet."""
    from bench.api.base_model import BaseModel
    from safetensors.torch import load_file

    base = BaseModel.load(str(tiny_sdxl_dir))
    method = METHODS.get("controlnext")(base, "canny", smoke_budget, {"unet_trainable": "to_out"})
    with fake_cuda():
        method.to(CUDA)
        with torch.no_grad():
            for p in method.tuned:
                p.add_(1.0)
        method.save_weights(tmp_path)
    deltas = load_file(str(tmp_path / "unet.safetensors"))
    assert deltas and all(torch.allclose(v, torch.ones_like(v)) for v in deltas.values())


@pytest.mark.parametrize("name", METRICS.names())
def test_metrics_score_on_the_method_device(name, fake_cuda):
    """The runner moves every metric to the run's device and scores a cuda batch with it."""
    import bench.datasets  # noqa: F401
    from bench.api.types import collate
    from bench.core.errors import ConfigError
    from bench.core.registry import DATASETS

    cls = METRICS.get(name)
    if cls.synthesizes:
        pytest.skip("scores generated training data (synthesize), not a batch")
    try:
        metric = cls()
        world = DATASETS.get("shapes")("eval", 4, 32, (cls.condition or "canny",), seed=0)
        batch = collate([world[i] for i in range(4)])
    except ConfigError as e:  # a real weight (Inception, CLIP, an annotator) that is not on this machine
        pytest.skip(str(e))
    with fake_cuda():
        metric = metric.to(CUDA)
        cuda_batch = batch.to(CUDA)
        metric.update(cuda_batch.image.clone(), cuda_batch)
        metric.compute()


def test_a_non_finite_loss_is_noted_without_a_host_sync(fake_cuda, proxy_arch_dir, smoke_budget):
    """The step notes a non-finite loss on the device; only the read every 10 steps (and at the end of
    training) waits for the GPU, and it names the first bad step."""
    from bench.api.base_model import BaseModel

    method = METHODS.get("frozen")(BaseModel.load(str(proxy_arch_dir)), "canny", smoke_budget, {})
    with fake_cuda() as mode:
        method.to(CUDA)
        for loss in (1.0, float("nan"), 2.0):
            method._note_nonfinite(torch.tensor(loss, device=CUDA))
        assert mode.reads == 0
        with pytest.raises(FloatingPointError, match="non-finite loss at step 0; lower lr"):
            method._raise_if_nonfinite()
        assert mode.reads == 1
