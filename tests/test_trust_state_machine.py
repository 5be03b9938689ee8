"""Stateful differential test: random sequences of what users do to a model, applied to a torchvision
ResNet-18 and to its resnet_fast copy; after every action both must give the same outputs under
torch.no_grad() (the fused path, its caches warm from the steps before).

CI runs a few derandomised examples per backend; RESNET_FAST_SOAK=N runs N examples of up to 40 steps
each (a long soak). The Triton backend runs under the interpreter on CPU: tiny inputs, fewer steps.
"""
import os

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from torch import nn

import resnet_fast
from _backends import skip_unless_usable
from _models import pair, randomize_bn
from _numerics import max_rel_err

SOAK = int(os.environ.get("RESNET_FAST_SOAK", "0"))
# Relative error of the logits. After training forwards the BN statistics (the fused training ops' and
# torch's) differ by rounding, which moves fp32 logits ~1e-4 (tests/test_fold.py); a stale model is
# off by 1e-2 or more.
TOL = {torch.float32: 1e-4, torch.float64: 1e-9}
TOL_TRAINED = {torch.float32: 1e-3, torch.float64: 1e-9}

# Modules an action may hook, replace or reconfigure (spatially large enough for reflect padding at 16x16).
CONVS = ["conv1", "layer1.0.conv1", "layer1.1.conv2", "layer2.0.conv2", "layer2.0.downsample.0"]
HOOKABLE = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer1.0", "layer1.0.conv2", "layer2.0.bn1",
            "layer2.0.downsample", "layer3.1.relu", "layer4", "avgpool", "fc"]
BLOCKS = ["layer1.0", "layer2.1", "layer3.0", "layer4.1"]


class TwinModels(RuleBasedStateMachine):
    backend = "auto"
    sizes = (16, 24, 32)

    def __init__(self):
        super().__init__()
        self.previous_backend = resnet_fast.get_backend()
        resnet_fast.use_backend(self.backend)
        self.tv, self.fast = pair("resnet18", num_classes=10)
        self.hooks = []
        self.dtype = torch.float32
        self.trained = False  # whether a train-mode forward has run (BN statistics then differ by rounding)
        self.x = self._input(2, self.sizes[0])

    def teardown(self):
        resnet_fast.use_backend(self.previous_backend)

    def _input(self, batch: int, size: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(batch * 100 + size)
        return torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64).to(self.dtype)

    def _both(self):
        return (self.tv, self.fast)

    def _train_batch(self, seed: int) -> torch.Tensor:
        # 8 images: train-mode BN on a batch of 2 at layer4's 1x1 is too ill-conditioned to compare
        g = torch.Generator().manual_seed(seed)
        size = max(self.sizes)
        return torch.randn(8, 3, size, size, generator=g, dtype=torch.float64).to(self.dtype) + 0.5

    # --- the actions -------------------------------------------------------------------

    @rule(kind=st.sampled_from(["sgd", "adam", "adam_foreach", "adam_fused"]), lr=st.sampled_from([1e-3, 1e-2]))
    def optimizer_step(self, kind, lr):
        """A training step of each model; the optimizer then applies torchvision's gradients to both (the
        steps must produce the same parameters: what is compared is how the eval path sees them)."""
        self.trained = True
        batch = self._train_batch(0)
        for model in self._both():
            model.train()
            model(batch).logsumexp(1).sum().backward()
            model.eval()
        for p_fast, p_tv in zip(self.fast.parameters(), self.tv.parameters()):
            p_fast.grad = p_tv.grad.clone()
        for model in self._both():
            params = list(model.parameters())
            if kind == "sgd":
                opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
            else:
                opt = torch.optim.Adam(params, lr=lr * 0.1, foreach=kind == "adam_foreach",
                                       fused=True if kind == "adam_fused" else None)
            opt.step()
            opt.zero_grad(set_to_none=True)

    @rule(seed=st.integers(0, 3))
    def bn_recalibration(self, seed):
        """Train-mode forwards under no_grad, no optimizer step (BN re-estimation), then eval()."""
        batch = self._train_batch(seed)
        self.trained = True
        for model in self._both():
            model.train()
            with torch.no_grad():
                model(batch)
            model.eval()

    @rule(scale=st.sampled_from([0.5, 1.1]))
    def data_write_then_eval(self, scale):
        for model in self._both():
            for p in model.parameters():
                p.data.mul_(scale)
            model.eval()

    @rule(seed=st.integers(0, 3))
    def load_state_dict(self, seed):
        torch.manual_seed(seed)
        other = randomize_bn(torchvision.models.resnet18(num_classes=10), seed=seed + 10).to(self.dtype)
        for model in self._both():
            model.load_state_dict(other.state_dict())

    @precondition(lambda self: self.backend != "triton")  # the Triton kernels have no fp64
    @rule(dtype=st.sampled_from([torch.float32, torch.float64]))
    def to_dtype(self, dtype):
        for model in self._both():
            model.to(dtype)
        self.dtype, self.x = dtype, self.x.to(dtype)

    @rule()
    def round_trip_through_half(self):
        """.half() then back: the weights are rounded, and may land at the addresses they left."""
        for model in self._both():
            model.half().to(self.dtype)

    @rule(fmt=st.sampled_from([torch.channels_last, torch.contiguous_format]))
    def memory_format(self, fmt):
        for model in self._both():
            model.to(memory_format=fmt)

    @rule(path=st.sampled_from(BLOCKS + [""]), kind=st.sampled_from(["leaky", "relu", "gelu"]))
    def replace_activation(self, path, kind):
        for model in self._both():
            make = {"leaky": lambda: nn.LeakyReLU(0.2), "relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU}
            model.get_submodule(path).relu = make[kind]()

    @rule(path=st.sampled_from(CONVS), mode=st.sampled_from(["zeros", "reflect", "replicate"]))
    def conv_padding_mode(self, path, mode):
        for model in self._both():
            conv = model.get_submodule(path)
            if conv.kernel_size != (1, 1):  # a 1x1 conv has no padding to pad with
                conv.padding_mode = mode

    @rule(path=st.sampled_from(CONVS))
    def replace_parameter(self, path):
        w = self.tv.get_submodule(path).weight.detach() * 0.9
        for model in self._both():
            model.get_submodule(path).weight = nn.Parameter(w.clone())

    @rule(path=st.sampled_from(HOOKABLE), pre=st.booleans())
    def add_hook(self, path, pre):
        for model in self._both():
            module = model.get_submodule(path)
            if pre:
                handle = module.register_forward_pre_hook(lambda m, args: tuple(a * 0.9 for a in args))
            else:
                handle = module.register_forward_hook(lambda m, args, out: out * 1.1)
            self.hooks.append(handle)

    @precondition(lambda self: self.hooks)
    @rule()
    def remove_hooks(self):
        for handle in self.hooks:
            handle.remove()
        self.hooks = []

    @rule(times=st.integers(1, 2))
    def train_eval_toggles(self, times):
        for model in self._both():
            for _ in range(times):
                model.train()
                model.eval()

    @rule(batch=st.sampled_from([2, 3]), size_index=st.integers(0, 2))
    def new_input(self, batch, size_index):
        self.x = self._input(batch, self.sizes[min(size_index, len(self.sizes) - 1)])

    # --- the check after every action ------------------------------------------------------

    @invariant()
    def same_outputs(self):
        with torch.no_grad():
            want = self.tv(self.x)
            got = self.fast(self.x)
        assert got.dtype == want.dtype and got.shape == want.shape
        err = max_rel_err(got, want)
        assert err < (TOL_TRAINED if self.trained else TOL)[self.dtype], f"{self.backend}: relative error {err:.2e}"


def _machine(backend: str, examples: int, steps: int):
    class Machine(TwinModels):
        pass
    Machine.backend = backend
    if backend == "triton":
        Machine.sizes = (16,)
    Machine.TestCase.settings = settings(
        max_examples=SOAK or examples, stateful_step_count=40 if SOAK else steps, deadline=None,
        derandomize=not SOAK, database=None, suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate] + ([Phase.shrink] if SOAK else []))  # CI: report, no shrinking
    return Machine


@pytest.mark.parametrize("backend,examples,steps", [("auto", 4, 10), ("ext", 3, 8), ("torch", 3, 8),
                                                    ("triton", 1, 3)])
def test_twin_models_agree_after_every_action(backend, examples, steps):
    if backend != "auto":
        skip_unless_usable(backend, torch.device("cpu"))  # the models are on CPU
    _machine(backend, examples, steps).TestCase("runTest").runTest()
