"""The contenders of `resnet-fast bench`: one model each, same weights, same inputs.

Every contender starts from one fp32 base model whose BatchNorm layers have
random affine parameters and running statistics calibrated to them (so eval()
activations keep a realistic scale at any depth, and folding BN is not a no-op).
A contender is reduced to `step()`: one forward (infer) or one training step
(train) on its own copy of the model and input, returning logits or the loss.
"""
from __future__ import annotations

import contextlib
import copy
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import resnet_fast
from resnet_fast.models import TORCHVISION_ARCHS

from . import int8

RESNET_FAST = "resnet_fast"
EAGER = "torchvision_eager"
EAGER_CL = "torchvision_channels_last"
COMPILE = "torch_compile"
TORCHSCRIPT = "torchscript_frozen"
RF_TORCH = "resnet_fast_torch_backend"
TORCHVISION_INT8 = int8.TORCHVISION_INT8
PT2E_INT8 = int8.PT2E_INT8
IMPLS = (RESNET_FAST, EAGER, EAGER_CL, COMPILE, TORCHSCRIPT, RF_TORCH, TORCHVISION_INT8, PT2E_INT8)
TORCHVISION_IMPLS = (EAGER, EAGER_CL, COMPILE, TORCHSCRIPT, TORCHVISION_INT8, PT2E_INT8)
# --dtype int8: the fp32 model quantized by each contender (torch_compile stays fp32, the baseline).
INT8_IMPLS = (RESNET_FAST, TORCHVISION_INT8, PT2E_INT8, COMPILE)
TORCHVISION_QUANTIZED_ARCHS = ("resnet18", "resnet50", "resnext101_32x8d", "resnext101_64x4d")

LR = 0.01  # SGD step size: large enough that the loss after one step depends on the gradients
ERROR_CALLS = {"infer": 1, "train": 2}  # first calls whose outputs are checked (from identical weights)


@dataclass(frozen=True)
class Spec:
    """One benchmark configuration; shared by all its contenders."""
    arch: str
    mode: str  # "infer" | "train"
    dtype: torch.dtype
    batch_size: int
    img_size: int
    device: torch.device
    channels_last: bool  # layout of the resnet_fast and torch_compile contenders
    backend: str  # resnet_fast backend of the "resnet_fast" contender
    compile_mode: str
    seed: int

    @property
    def has_torchvision(self) -> bool:
        return self.arch in TORCHVISION_ARCHS

    @property
    def int8(self) -> bool:
        return self.dtype == torch.int8

    @property
    def model_dtype(self) -> torch.dtype:
        """The dtype of the model's weights and input (int8 contenders quantize an fp32 model)."""
        return torch.float32 if self.int8 or self.mode == "train" else self.dtype


@dataclass
class Contender:
    impl: str
    memory_format: str  # "channels_last" | "contiguous"
    step: Callable[[], Tensor]
    setup_s: float


def default_impls(spec: Spec) -> list[str]:
    if spec.int8:  # the runnable ones; none (train, CUDA): resnet_fast, whose refusal plan() then reports
        return [i for i in INT8_IMPLS if unsupported(i, spec) is None] or [RESNET_FAST]
    if not spec.has_torchvision:  # ResNet-D: no torchvision model; plain-torch resnet_fast is the baseline
        return [RESNET_FAST, RF_TORCH]
    if spec.device.type == "cpu" and spec.dtype != torch.float32:
        # eager's reduced-precision CPU path is channels_last; TorchScript's freezing is an fp32 tool
        return [RESNET_FAST, EAGER_CL, COMPILE]
    impls = [RESNET_FAST, EAGER, EAGER_CL, COMPILE]
    if spec.mode == "infer" and spec.device.type == "cpu":
        impls.append(TORCHSCRIPT)
    return impls


def unsupported(impl: str, spec: Spec) -> str | None:
    """Why impl cannot run for spec, or None."""
    if impl not in IMPLS:
        return f"unknown impl {impl!r}; expected one of {', '.join(IMPLS)}"
    if impl in TORCHVISION_IMPLS and not spec.has_torchvision:
        return f"impl {impl!r} needs a torchvision model and torchvision has no {spec.arch}; use {RESNET_FAST}, {RF_TORCH}"
    if impl == TORCHSCRIPT and spec.mode == "train":
        return f"impl {impl!r} is inference-only; drop it or use --mode infer"
    if spec.int8 and (spec.device.type != "cpu" or spec.mode != "infer"):
        return "--dtype int8 is CPU inference only (--device cpu --mode infer)"
    if spec.int8 and impl not in INT8_IMPLS:
        return f"impl {impl!r} has no int8 path; with --dtype int8 use {', '.join(INT8_IMPLS)}"
    if impl in (TORCHVISION_INT8, PT2E_INT8) and not spec.int8:
        return f"impl {impl!r} is int8: use --dtype int8"
    if impl == TORCHVISION_INT8 and spec.arch not in TORCHVISION_QUANTIZED_ARCHS:
        return f"torchvision has no quantized {spec.arch} (it has {', '.join(TORCHVISION_QUANTIZED_ARCHS)})"
    if impl == PT2E_INT8 and not int8.pt2e_available():
        return f"impl {impl!r} needs torchao (pip install torchao, or the bench extra)"
    return None


# --- shared weights and inputs --------------------------------------------

def _randomize_bn(model: nn.Module, size: int, generator: torch.Generator) -> None:
    """Random BN affine, then running stats measured on random images (one train-mode pass with
    momentum 1), so each BN really normalizes its input: plain random stats blow up or wash
    out the activations of a deep net (a ResNet-152 overflows fp16). The last BN of each residual
    branch gets a small scale, as trained ResNets have: otherwise every block doubles the signal and
    the logits become ill-conditioned (bf16 eager moves them by ~10%), drowning the error columns."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    last = {id(getattr(block, "bn3", None) or getattr(block, "bn2", None)) for block in model.modules()
            if hasattr(block, "conv2") and hasattr(block, "downsample")}
    momenta = [bn.momentum for bn in bns]
    with torch.no_grad():
        for bn in bns:
            n = bn.num_features
            scale = torch.rand(n, generator=generator)
            bn.weight.copy_(scale * 0.2 if id(bn) in last else scale + 0.5)
            bn.bias.copy_(torch.randn(n, generator=generator) * 0.1)
            bn.momentum = 1.0
        was_training = model.training
        model.train()
        model(torch.randn(4, 3, size, size, generator=generator))
        model.train(was_training)
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum


def base_model(spec: Spec) -> nn.Module:
    """fp32 CPU model shared by all contenders: torchvision's when there is one, else resnet_fast's."""
    torch.manual_seed(spec.seed)  # conv/fc init
    generator = torch.Generator().manual_seed(spec.seed)
    size = min(spec.img_size, 64)  # statistics of small images are close enough, and cheap
    if spec.has_torchvision:
        import torchvision
        model = getattr(torchvision.models, spec.arch)()
        _randomize_bn(model, size, generator)
    else:
        model = getattr(resnet_fast, spec.arch)()
        with resnet_fast.use_backend("torch"):
            _randomize_bn(model, size, generator)
    return model.train(spec.mode == "train")


def inputs(spec: Spec) -> tuple[Tensor, Tensor]:
    """(images, labels) on spec.device; images in spec.dtype for infer, fp32 for train (autocast casts)."""
    g = torch.Generator().manual_seed(spec.seed + 1)
    x = torch.randn(spec.batch_size, 3, spec.img_size, spec.img_size, generator=g)
    y = torch.randint(0, 1000, (spec.batch_size,), generator=g)
    return x.to(spec.device, spec.model_dtype), y.to(spec.device)


# --- reference --------------------------------------------------------------

@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def reference_dtype(spec: Spec) -> torch.dtype:
    return torch.float64 if spec.device.type == "cpu" else torch.float32


def describe_reference(spec: Spec) -> str:
    what = "torchvision eager" if spec.has_torchvision else "resnet_fast (backend torch)"
    prec = "fp64" if reference_dtype(spec) == torch.float64 else "fp32 (TF32 off)"
    out = "logits" if spec.mode == "infer" else "loss of training steps 1 and 2 (after one SGD step)"
    return f"{out} vs {what} {prec} NCHW"


def reference(base: nn.Module, spec: Spec, x: Tensor, y: Tensor) -> Tensor:
    """What the checked calls should return: logits (infer) or the first ERROR_CALLS losses (train)."""
    dtype = reference_dtype(spec)
    model = copy.deepcopy(base).to(spec.device, dtype)
    backend = contextlib.nullcontext() if spec.has_torchvision else resnet_fast.use_backend("torch")
    with _no_tf32(), backend:
        if spec.mode == "infer":
            with torch.no_grad():
                return model(x.to(dtype)).cpu()
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        losses = []
        for _ in range(ERROR_CALLS["train"]):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x.to(dtype)), y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses).cpu()


def errors(outputs: list[Tensor], ref: Tensor) -> dict[str, float]:
    """max abs error and max abs error / max |reference| (elementwise relative error is meaningless
    for logits near zero). Train mode adds each step's loss error: step 1 checks the forward,
    step 2 (after one SGD step) the gradients too, and is chaotic for deep nets at random init:
    fp32 eager's own step-2 loss error on ResNet-50 is ~1e-2 while its step-1 error is ~1e-6."""
    got = outputs[0] if len(outputs) == 1 else torch.stack(outputs)
    diff = (got.detach().cpu().to(ref.dtype) - ref).abs()
    worst = diff.max().item()
    result = {"max_abs_err": worst, "max_rel_err": worst / max(ref.abs().max().item(), 1e-30)}
    if len(outputs) > 1:
        result.update({f"step{i + 1}_loss_err": d for i, d in enumerate(diff.tolist())})
    else:  # logits: does the contender pick the reference's class?
        result["top1_agree"] = int8.top1_agreement(got.detach().cpu(), ref)
    return result


# --- contenders ---------------------------------------------------------------

def _memory_format(impl: str, spec: Spec) -> torch.memory_format:
    if impl == EAGER_CL or (impl in (RESNET_FAST, RF_TORCH, COMPILE, *INT8_IMPLS) and spec.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _model(impl: str, base: nn.Module, spec: Spec, mf: torch.memory_format) -> nn.Module:
    model = copy.deepcopy(base)  # every contender owns its weights: train steps must not leak across
    if impl in (RESNET_FAST, RF_TORCH) and spec.has_torchvision:
        model = resnet_fast.from_torchvision(model)
    # infer: weights in the benchmark dtype (fp32 for int8); train: fp32 master weights under autocast
    return model.to(device=spec.device, dtype=spec.model_dtype, memory_format=mf)


def _backend_context(impl: str, spec: Spec) -> Callable[[], contextlib.AbstractContextManager]:
    if impl == RESNET_FAST and spec.int8:
        return contextlib.nullcontext
    if impl == RESNET_FAST:
        return lambda: resnet_fast.use_backend(spec.backend)
    if impl == RF_TORCH:
        return lambda: resnet_fast.use_backend("torch")
    if impl == COMPILE and spec.mode == "infer":
        import torch._inductor.config as inductor_config
        # Freezing (weights as constants) is inductor's inference setting; it only applies under no_grad.
        return lambda: inductor_config.patch(freezing=True)
    return contextlib.nullcontext


def _script(model: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # torch.jit is deprecated; it is here on purpose, as a baseline
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        with torch.no_grad():
            return torch.jit.optimize_for_inference(torch.jit.script(model))


def _infer_step(forward: Callable, x: Tensor, context: Callable) -> Callable[[], Tensor]:
    def step() -> Tensor:
        with torch.no_grad(), context():
            return forward(x)
    return step


def _train_step(model: nn.Module, forward: Callable, x: Tensor, y: Tensor, spec: Spec,
                context: Callable) -> Callable[[], Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    amp = spec.dtype != torch.float32
    # fp16 needs loss scaling; a modest initial scale avoids skipping the checked first steps.
    scaler = torch.amp.GradScaler(spec.device.type, init_scale=2.0 ** 10) if spec.dtype == torch.float16 else None

    def step() -> Tensor:
        with context():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(spec.device.type, dtype=spec.dtype, enabled=amp):
                loss = F.cross_entropy(forward(x), y)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
        return loss.detach()
    return step


def _int8_forward(impl: str, base: nn.Module, spec: Spec) -> tuple[Callable, Callable]:
    """The quantized model of an int8 contender and the context its calls need."""
    calib = int8.calibration(spec.batch_size, spec.img_size, spec.seed)
    if impl == RESNET_FAST:
        return int8.resnet_fast_int8(base, calib), contextlib.nullcontext
    if impl == TORCHVISION_INT8:
        return int8.torchvision_int8(base, spec.arch, calib), contextlib.nullcontext
    return int8.pt2e_int8(base, calib)


def build(impl: str, base: nn.Module, spec: Spec, x: Tensor, y: Tensor) -> Contender:
    start = time.perf_counter()
    mf = _memory_format(impl, spec)
    x = x.contiguous(memory_format=mf)
    if spec.int8 and impl != COMPILE:
        forward, context = _int8_forward(impl, base, spec)
        layout = "channels_last" if mf == torch.channels_last else "contiguous"
        return Contender(impl, layout, _infer_step(forward, x, context), time.perf_counter() - start)
    model = _model(impl, base, spec, mf)
    forward: Callable = model
    if impl == COMPILE:
        # Forget earlier archs' graphs: ResNet.forward recompiles per arch, and past dynamo's
        # recompile limit torch.compile would quietly run eager.
        torch._dynamo.reset()
        forward = torch.compile(model, mode=spec.compile_mode)
    elif impl == TORCHSCRIPT:
        forward = _script(model)
    context = _backend_context(impl, spec)
    if spec.mode == "infer":
        step = _infer_step(forward, x, context)
    else:
        step = _train_step(model, forward, x, y, spec, context)
    layout = "channels_last" if mf == torch.channels_last else "contiguous"
    return Contender(impl, layout, step, time.perf_counter() - start)
