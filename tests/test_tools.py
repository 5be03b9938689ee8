"""The tools that consume torchvision ResNets work on resnet_fast's (CPU, tiny inputs).

Recording tools (torch.fx symbolic tracing and feature extraction, torch.jit.script, torch.jit.trace) get
torchvision's module-by-module forward: torchvision's node names, and a graph that holds the live parameters
and BN modules, so it follows load_state_dict (no folded copy left stale, pytorch/pytorch#108863).
torch.export, ONNX and torch.compile trace the fused ops, which fold from the parameters on every call. Also:
FX quantization, torch.jit.freeze, and a Faster R-CNN train step on a FrozenBatchNorm2d backbone.

Reference: torchvision's model with the same weights for its archs; for the ResNet-D ones, resnet_fast's own
eager model (checked against timm and a module-by-module forward in test_timm.py / test_models.py).
"""
import functools
import warnings

import pytest
import torch
import torchvision
from torch import fx, nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import resnet_fast
from _models import randomize_bn
from _numerics import max_rel_err
from resnet_fast.ops import dispatch

TV_ARCHS = resnet_fast.models.TORCHVISION_ARCHS
ARCHS = resnet_fast.ARCHS
NUMERIC_ARCHS = ["resnet18", "resnet50", "resnet50d"]
# What detection / retrieval code asks for: stage outputs, a block output, the pooled features, the logits.
RETURN_NODES = {"layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5", "layer3.1": "block",
                "avgpool": "pool", "fc": "logits"}

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")


@functools.lru_cache(maxsize=None)
def _weights(arch: str, seed: int) -> dict:
    """A state_dict with non-trivial conv weights and BN statistics (torchvision's keys); read-only."""
    torch.manual_seed(seed)
    return randomize_bn(getattr(resnet_fast, arch)(num_classes=10), seed).state_dict()


def _reference(arch: str, state_dict: dict) -> nn.Module:
    build = getattr(torchvision.models, arch) if arch in TV_ARCHS else getattr(resnet_fast, arch)
    model = build(num_classes=10)
    model.load_state_dict(state_dict)
    return model.eval()


def _fast(arch: str, seed: int = 0) -> nn.Module:
    model = getattr(resnet_fast, arch)(num_classes=10)
    model.load_state_dict(_weights(arch, seed))
    return model.eval()


def _x(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@functools.lru_cache(maxsize=None)
def _expected(arch: str, seed: int) -> torch.Tensor:
    """The reference's eval output for _x() with weights `seed`."""
    with torch.no_grad():
        return _reference(arch, _weights(arch, seed))(_x())


def _assert_eval_matches(recorded, arch: str, seed: int) -> None:
    """recorded(x) equals the reference with weights `seed`, and no resnet_fast op ran to produce it."""
    with torch.no_grad():
        dispatch.CALLS.clear()
        got = recorded(_x())
        assert not dispatch.CALLS, f"a fused op ran inside the recorded graph: {dict(dispatch.CALLS)}"
    assert max_rel_err(got, _expected(arch, seed)) < 1e-5


def _assert_follows_new_weights(recorded, arch: str) -> None:
    recorded.load_state_dict(_weights(arch, 1))
    _assert_eval_matches(recorded, arch, seed=1)


def _assert_train_step_matches(record, arch: str) -> None:
    """record(model, x) in train mode: one step's output and every buffer (running statistics,
    num_batches_tracked) equal the reference's, run on torch's ops (torchvision's; resnet_fast's eager model
    on the "torch" backend for ResNet-D): the same ops, so float32 needs no slack for ReLU-mask flips.
    Batch 4: a BN over 2 values per channel (layer4 at 1x1) would amplify rounding arbitrarily."""
    x = _x(batch=4)
    recorded = record(_fast(arch).train(), x)
    ref = _reference(arch, {k: v.clone() for k, v in recorded.state_dict().items()}).train()  # a trace steps
    out = recorded(x)
    with resnet_fast.use_backend("torch"):
        want_out = ref(x)
    assert max_rel_err(out["logits"] if isinstance(out, dict) else out, want_out) < 1e-6
    got, want = recorded.state_dict(), ref.state_dict()
    assert list(got) == list(want)
    assert not [k for k in want if not torch.allclose(got[k], want[k], rtol=1e-6, atol=1e-7)]


def _assert_torchvision_ops_only(script_module, model: nn.Module) -> None:
    """The TorchScript graph is torchvision's: one aten::batch_norm per BN module, no fused op."""
    kinds = [node.kind() for node in script_module.inlined_graph.nodes()]
    assert kinds.count("aten::batch_norm") == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not [k for k in kinds if k.startswith(("resnet_fast::", "mkldnn::"))]


# --- every builder: structure, on meta-device models (no weights, no compute) --------------

def _on_meta(build, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return build(num_classes=10, **kwargs)


@pytest.mark.parametrize("arch", TV_ARCHS)
def test_fx_node_names_match_torchvision(arch):
    tv, fast = _on_meta(getattr(torchvision.models, arch)), _on_meta(getattr(resnet_fast, arch))
    assert get_graph_node_names(fast) == get_graph_node_names(tv)  # (train nodes, eval nodes)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_builder_traces_extracts_and_scripts(arch):
    fast = _on_meta(getattr(resnet_fast, arch))
    gm = fx.symbolic_trace(fast)
    called = {node.target for node in gm.graph.nodes if node.op == "call_module"}
    convs_and_bns = {name for name, m in fast.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))}
    assert convs_and_bns <= called  # module by module: each conv and BN is called as itself
    assert not [node for node in gm.graph.nodes if node.op == "get_attr"]  # no tensor baked into the graph

    features = create_feature_extractor(fast, RETURN_NODES)(torch.empty(1, 3, 64, 64, device="meta"))
    width = fast.fc.in_features
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "c2": (1, width // 8, 16, 16), "c3": (1, width // 4, 8, 8), "c4": (1, width // 2, 4, 4),
        "c5": (1, width, 2, 2), "block": (1, width // 2, 4, 4), "pool": (1, width, 1, 1), "logits": (1, 10)}

    _assert_torchvision_ops_only(torch.jit.script(fast), fast)


# --- torch.fx ------------------------------------------------------------------------

@pytest.mark.parametrize("arch", NUMERIC_ARCHS)
def test_fx_symbolic_trace(arch):
    gm = fx.symbolic_trace(_fast(arch))
    _assert_eval_matches(gm, arch, seed=0)
    _assert_follows_new_weights(gm, arch)
    _assert_train_step_matches(lambda model, x: fx.symbolic_trace(model), arch)


@pytest.mark.parametrize("arch", NUMERIC_ARCHS)
def test_create_feature_extractor(arch):
    fast = _fast(arch)
    extractor = create_feature_extractor(fast, RETURN_NODES)
    ref = _reference(arch, _weights(arch, 0))
    seen = {}
    for node, key in RETURN_NODES.items():  # forward hooks on the reference's modules: its features
        ref.get_submodule(node).register_forward_hook(lambda m, args, out, key=key: seen.__setitem__(key, out))
    x = _x()
    with torch.no_grad():
        dispatch.CALLS.clear()
        features = extractor(x)
        assert not dispatch.CALLS
        ref(x)
    assert set(features) == set(seen) == set(RETURN_NODES.values())
    for key, value in features.items():
        assert max_rel_err(value, seen[key]) < 1e-5, key

    # train mode: the extractor holds a train graph too (torchvision's traces both modes)
    _assert_train_step_matches(lambda model, x: create_feature_extractor(model, {"fc": "logits"}), arch)


def test_fx_quantization_matches_torchvision():
    """Post-training static quantization (FX graph mode) fuses conv+BN+ReLU modules: the same model out."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    outputs = []
    for model in (_fast("resnet18"), _reference("resnet18", _weights("resnet18", 0))):
        prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (_x(),))
        with torch.no_grad():
            prepared(_x(batch=4))  # calibration
            outputs.append(convert_fx(prepared)(_x()))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


# --- TorchScript ---------------------------------------------------------------------

@pytest.mark.parametrize("arch", NUMERIC_ARCHS)
def test_jit_script_save_load(arch, tmp_path):
    fast = _fast(arch)
    scripted = torch.jit.script(fast)
    _assert_torchvision_ops_only(scripted, fast)
    _assert_eval_matches(scripted, arch, seed=0)
    path = tmp_path / f"{arch}.pt"
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    _assert_eval_matches(loaded, arch, seed=0)
    _assert_follows_new_weights(loaded, arch)
    _assert_follows_new_weights(scripted, arch)
    _assert_train_step_matches(lambda model, x: torch.jit.script(model), arch)


def test_jit_freeze_folds_bn_as_for_torchvision():
    frozen = torch.jit.freeze(torch.jit.script(_fast("resnet18")))
    assert "aten::batch_norm" not in str(frozen.graph)  # folded into the convs by freeze, when asked to
    _assert_eval_matches(frozen, "resnet18", seed=0)


@pytest.mark.parametrize("arch", NUMERIC_ARCHS)
def test_jit_trace(arch):
    fast = _fast(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # nothing data-dependent was recorded
        # trace's own check reruns the eager model, whose fused kernels round differently (README);
        # the outputs are compared with torchvision's below
        warnings.filterwarnings("ignore", "Output nr .* does not match", torch.jit.TracerWarning)
        traced = torch.jit.trace(fast, _x())
    _assert_torchvision_ops_only(traced, fast)
    _assert_eval_matches(traced, arch, seed=0)
    _assert_follows_new_weights(traced, arch)
    _assert_train_step_matches(_trace_train, arch)


def _trace_train(model, x):
    with warnings.catch_warnings():  # F.batch_norm's batch-size check warns in train mode, for torchvision too
        warnings.filterwarnings("ignore", "Converting a tensor to a Python boolean", torch.jit.TracerWarning,
                                "torch.nn.functional")
        return torch.jit.trace(model, x, check_trace=False)  # (the check: see test_jit_trace)


# --- torch.export, ONNX, torch.compile: the fused ops, folding from the parameters --------

def _conv_and_bn_calls() -> int:
    return sum(n for (op, _), n in dispatch.CALLS.items() if op.endswith("conv_bias_act"))


@pytest.mark.parametrize("arch", NUMERIC_ARCHS)
def test_export_holds_parameters_not_folded_constants(arch):
    fast = _fast(arch)
    dispatch.CALLS.clear()
    with torch.no_grad():
        program = torch.export.export(fast, (_x(),))
    assert _conv_and_bn_calls() > 0  # traced through the fused ops
    assert not program.constants  # no folded weight lifted as a constant
    lifted = {spec.target for spec in program.graph_signature.input_specs if spec.target is not None}
    assert lifted == set(fast.state_dict())
    module = program.module()
    _assert_eval_matches(module, arch, seed=0)
    _assert_follows_new_weights(module, arch)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50d"])
def test_onnx_runtime(arch, tmp_path):
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
    ort = pytest.importorskip("onnxruntime")
    with torch.no_grad():
        program = torch.onnx.export(_fast(arch), (_x(),), dynamo=True, verbose=False)
    path = tmp_path / f"{arch}.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: _x().numpy()})
    assert max_rel_err(torch.from_numpy(got), _expected(arch, 0)) < 1e-5


def test_compile_follows_load_state_dict():
    torch._dynamo.reset()
    fast = _fast("resnet18")
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert max_rel_err(compiled(_x()), _expected("resnet18", 0)) < 1e-5
        fast.load_state_dict(_weights("resnet18", 1))
        assert max_rel_err(compiled(_x()), _expected("resnet18", 1)) < 1e-5


# --- detection: a FrozenBatchNorm2d backbone under Faster R-CNN, one train step -------------

def _faster_rcnn(build) -> nn.Module:
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.misc import FrozenBatchNorm2d
    backbone = BackboneWithFPN(build(norm_layer=FrozenBatchNorm2d), {f"layer{i}": str(i - 1) for i in range(1, 5)},
                               [256, 512, 1024, 2048], out_channels=32)
    return FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64, rpn_batch_size_per_image=32,
                      box_batch_size_per_image=16).train()


def test_faster_rcnn_frozen_bn_backbone_train_step():
    torch.manual_seed(0)
    tv = _faster_rcnn(torchvision.models.resnet50)
    with torch.no_grad():  # non-trivial frozen statistics
        for name, buf in tv.named_buffers():
            buf.uniform_(0.5, 1.5) if name.endswith(("running_var", ".weight")) else buf.normal_(0, 0.1)
    fast = _faster_rcnn(resnet_fast.resnet50)
    fast.load_state_dict(tv.state_dict())
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 48)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 2.0, 30.0, 44.0], [0.0, 0.0, 20.0, 20.0]]),
                "labels": torch.tensor([2, 1])}]
    losses = {}
    for name, model in (("tv", tv), ("fast", fast)):
        torch.manual_seed(1)  # the same proposal and box sampling
        dispatch.CALLS.clear()
        loss = model(images, targets)
        losses[name] = {k: v.item() for k, v in loss.items()}
        sum(loss.values()).backward()
    assert dispatch.CALLS, "the backbone did not run resnet_fast's fused path"
    assert losses["fast"] == pytest.approx(losses["tv"], rel=1e-5)
    grad_tv, grad_fast = (m.backbone.body.layer3[0].conv2.weight.grad for m in (tv, fast))
    assert max_rel_err(grad_fast, grad_tv) < 1e-4
