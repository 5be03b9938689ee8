"""resnet_fast's tuner (resnet_fast.ops.triton.tuner): every candidate is checked against the references
before it can be chosen, a wrong or failing one is discarded with a warning, a key with no Triton
survivor runs the torch path, and choices persist in a cache that survives damage and concurrent writers.

Without CUDA the candidates run under the Triton interpreter; RESNET_FAST_TUNE_TARGET=sm90 makes the
tuner go through Hopper's whole list (TMA variants included) on CPU too.
"""
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from _backends import DEVICE, launched, rand_nhwc, require_triton_here
from _numerics import assert_2x, fp32_precision
from resnet_fast import numerics
from resnet_fast.ops import reference

require_triton_here()
import triton  # noqa: E402
from resnet_fast.ops.triton import _common, conv, pool, tuner  # noqa: E402
from resnet_fast.ops.triton.conv import ConvKey  # noqa: E402
from resnet_fast.ops.triton.tuner import Candidate, TuningWarning  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ON_CPU = DEVICE.type == "cpu"
GOOD = conv.CANDIDATES["interpreter"][0]


@pytest.fixture(autouse=True)
def ieee_fp32():
    with fp32_precision("ieee", "ieee"):  # fp32 keys judged at fp32's floor, as run_and_check does
        yield


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty tuning cache in tmp_path, nothing chosen in memory, the interpreter's list."""
    monkeypatch.setenv(tuner.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(tuner.TARGET_ENV, raising=False)
    tuner.clear()
    yield tmp_path
    tuner.clear()


def resnet_key(**change) -> ConvKey:
    """A ResNet-50 layer1 1x1 64 -> 256 conv + residual + ReLU at batch 256, bf16, dense NHWC."""
    fields = dict(n=256, cin=64, h=56, w=56, cout=256, kh=1, kw=1, stride_h=1, stride_w=1, pad_h=0, pad_w=0,
                  dil_h=1, dil_w=1, dtype="bfloat16", mode="gemm", has_res=True, relu=True, precision="tf32",
                  x_cl=True, w_cl=True, r_cl=True, tma=True)
    return ConvKey(**{**fields, **change})


def conv_case(dtype=torch.float32, n=2, cin=64, cout=24, h=7, w=9, k=3, residual=True):
    """Cin = 64: the interpreter's 32x64x64 config fits without pruning, so injected ones are tried beside it."""
    x = rand_nhwc(n, cin, h, w, dtype=dtype)
    weight = rand_nhwc(cout, cin, k, k, dtype=dtype, scale=(cin * k * k) ** -0.5)
    r = rand_nhwc(n, cout, h, w, dtype=dtype) if residual else None
    return x, weight, rand_nhwc(cout), r


def run_and_check(x, weight, bias, r, padding=1):
    out = conv.conv_bias_act(x, weight, bias, r, 1, padding, 1, True)
    args = (x, weight, bias, r, 1, padding, 1, True)
    double = [t.double() if t is not None else None for t in (x, weight, bias, r)]
    assert_2x(out, reference.conv_bias_act(*args), reference.conv_bias_act(*double, 1, padding, 1, True))
    return out


def the_record(family=conv.FAMILY, **key_fields):
    """The one record of `family` in memory (with these key fields)."""
    (record,) = [rec for (name, key, *_), rec in tuner._RECORDS.items()
                 if name == family.name and all(getattr(key, k) == v for k, v in key_fields.items())]
    return record


# --- candidate lists ---------------------------------------------------------------------

def test_candidate_lists_per_target():
    sm90, sm80 = tuner.candidates("sm90", resnet_key()), tuner.candidates("sm80", resnet_key())
    for listed in (sm90, sm80):
        assert listed[-1].is_torch and not any(c.is_torch for c in listed[:-1])
    assert any(c.kernel == "conv" and c.num_warps == 8 for c in sm90)
    assert any(c.kernel == "conv_tma_gemm" for c in sm90) == conv.conv_tma.AVAILABLE
    assert not any(c.kernel == "conv_tma_implicit" for c in sm90)  # 1x1 stride 1 dense: the GEMM mode
    assert all(c.kernel == "conv" and c.num_warps == 4 for c in sm80[:-1])  # no Hopper tiles, no TMA
    for c in sm80[:-1]:  # what is kept fits an A100's shared memory
        p = c.kwargs
        assert c.num_stages * (p["BLOCK_M"] + p["BLOCK_N"]) * p["BLOCK_K"] * 2 <= tuner.TARGET_SMEM["sm80"]
    assert all(c.kwargs["BLOCK_N"] <= 64 for c in tuner.candidates("sm90", resnet_key(cout=64))[:-1])
    implicit = dict(kh=3, kw=3, pad_h=1, pad_w=1, mode="implicit")
    assert any(c.kernel == "conv_tma_implicit" for c in tuner.candidates("sm90", resnet_key(**implicit))) \
        == conv.conv_tma.AVAILABLE
    strided = tuner.candidates("sm90", resnet_key(**implicit, stride_h=2, stride_w=2))
    unaligned = tuner.candidates("sm90", resnet_key(tma=False))
    assert not any(c.kernel.startswith("conv_tma") for c in strided + unaligned)
    assert tuner.candidates("interpreter", resnet_key()) == [GOOD, tuner.TORCH_CANDIDATE]
    with pytest.raises(ValueError, match="unknown tuning target 'sm70'"):
        tuner.candidates("sm70", resnet_key())


def test_candidates_are_the_tiles_the_static_report_proves():
    """benchmarks/static_report.py compiles every candidate spill-free, with wgmma on Hopper: these are the
    rules that make it so."""
    def kept(target, **change):
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps)
                for c in tuner.candidates(target, resnet_key(**change)) if not c.is_torch]

    hopper = kept("sm90", cin=256)
    assert hopper and all(bm >= 16 * warps and bk >= 32 for bm, _, bk, warps in hopper)  # wgmma, no K=16
    stem = dict(cin=3, h=224, w=224, cout=64, kh=7, kw=7, stride_h=2, stride_w=2, pad_h=3, pad_w=3, mode="stem",
                has_res=False, tma=False)
    for target, tile in (("sm90", (256, 64, 16, 8)), ("sm80", (128, 64, 16, 4))):
        packed = kept(target, **stem)  # 16 channels per packed pixel: one K step of 16
        assert tile in packed and all(bk == 16 for _, _, bk, _ in packed), packed
    for target, precision in (("sm80", "tf32"), ("sm90", "ieee"), ("sm80", "ieee")):
        fp32 = kept(target, dtype="float32", precision=precision, cin=256)  # fp32 operands in registers
        per_thread = 64 if precision == "tf32" else 32  # accumulator values per thread
        assert fp32 and all(bm * bn <= per_thread * 32 * warps for bm, bn, _, warps in fp32)
        assert precision == "tf32" or all(bk <= 32 for _, _, bk, _ in fp32)


def test_pool_candidates_per_target():
    key = pool.PoolKey(pool.MAX, 256, 64, 112, 112, "bfloat16", True)
    assert len(tuner.candidates("sm90", key)) > 2 and tuner.candidates("sm90", key)[-1].is_torch
    assert len(tuner.candidates("interpreter", key)) == 2


def test_fp32_torch_path_only_where_torch_keeps_the_requested_precision():
    from _numerics import fp32_precision
    with fp32_precision("ieee", "tf32"):
        assert tuner.candidates("sm80", resnet_key(dtype="float32", precision="ieee"))[-1].is_torch
        assert not tuner.candidates("sm80", resnet_key(dtype="float32", precision="tf32"))[-1].is_torch


def test_bad_target_env_is_a_clear_error(fresh, monkeypatch):
    monkeypatch.setenv(tuner.TARGET_ENV, "hopper")
    with pytest.raises(ValueError, match="RESNET_FAST_TUNE_TARGET='hopper': expected one of sm90, sm80"):
        run_and_check(*conv_case())


# --- validation -------------------------------------------------------------------------------

def sabotage(monkeypatch, bad, error=0.01):
    """Launches of the candidates in `bad` add `error` to the bias: a small, systematic wrong answer."""
    real = conv.kernel_call

    def call(candidate, key, x, weight, bias, *rest):
        return real(candidate, key, x, weight, bias + error if candidate in bad else bias, *rest)
    monkeypatch.setattr(conv, "kernel_call", call)


@pytest.mark.skipif(not ON_CPU, reason="injects into the interpreter's candidate list")
def test_a_wrong_candidate_is_discarded(fresh, monkeypatch):
    wrong = Candidate.make("conv", 4, 1, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)
    monkeypatch.setitem(conv.CANDIDATES, "interpreter", [wrong, GOOD])
    sabotage(monkeypatch, {wrong})
    runs = tuner.STATS["candidate_runs"]
    with pytest.warns(TuningWarning, match=r"discarded conv_bias_act 3x3/1 64->24 7x9 n2 fp32\+res\+relu "
                                           r"\(implicit\) conv BLOCK_M=32 BLOCK_N=64 BLOCK_K=64 GROUP_M=8 "
                                           r"warps=4 stages=1: wrong: error"):
        with launched("conv_bias_act.implicit"):
            run_and_check(*conv_case())
    assert tuner.STATS["candidate_runs"] == runs + 3  # wrong, good, torch: each checked once
    record = the_record()
    assert [c for c, _ in record.rejected] == [wrong]
    assert [r.candidate for r in record.ranking] == [GOOD, tuner.TORCH_CANDIDATE]
    assert not record.timed  # the interpreter keeps list order


@pytest.mark.skipif(not ON_CPU, reason="injects into the interpreter's candidate list")
def test_a_failing_candidate_is_discarded(fresh, monkeypatch):
    broken = Candidate.make("conv", 4, 1, BLOCK_M=32, BLOCK_N=64, BLOCK_K=48, GROUP_M=4)  # tl.arange(0, 48)
    monkeypatch.setitem(conv.CANDIDATES, "interpreter", [broken, GOOD])
    with pytest.warns(TuningWarning, match=r"discarded conv_bias_act .* BLOCK_K=48 .*: failed: "):
        run_and_check(*conv_case())
    assert [c for c, _ in the_record().rejected] == [broken]


@pytest.mark.skipif(not ON_CPU, reason="injects into the interpreter's candidate list")
def test_a_key_whose_candidates_all_fail_runs_the_torch_path(fresh, monkeypatch):
    sabotage(monkeypatch, {GOOD}, error=1.0)
    torch_runs, kernels = _common.TORCH_PATH["conv_bias_act"], sum(_common.LAUNCHES.values())
    with pytest.warns(TuningWarning) as caught:
        run_and_check(*conv_case())
    messages = [str(w.message) for w in caught]
    assert any("discarded conv_bias_act" in m and "wrong: error 1 >" in m for m in messages), messages
    assert any("no Triton candidate survived for conv_bias_act" in m and "torch path" in m for m in messages)
    with tuner.triton_only():  # nothing Triton to prefer: still the torch path
        run_and_check(*conv_case())
    assert _common.TORCH_PATH["conv_bias_act"] == torch_runs + 2
    assert sum(_common.LAUNCHES.values()) == kernels


@pytest.mark.skipif(not ON_CPU, reason="injects into the interpreter's candidate list")
def test_autocast_neither_loosens_validation_nor_changes_the_torch_paths_dtype(fresh, monkeypatch):
    """Under autocast, eager's conv would run in bf16: a loose bar that lets a wrong fp32 candidate pass."""
    wrong = Candidate.make("conv", 4, 1, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)
    monkeypatch.setitem(conv.CANDIDATES, "interpreter", [wrong, GOOD])
    sabotage(monkeypatch, {wrong})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.warns(TuningWarning, match="discarded .* GROUP_M=8 .*: wrong: error"):
            conv.conv_bias_act(*conv_case()[:4], 1, 1, 1, True)
    sabotage(monkeypatch, {wrong, GOOD}, error=1.0)
    x, weight, bias, r = conv_case(h=5)  # a new key, on the torch path
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(TuningWarning):
        out = conv.conv_bias_act(x, weight, bias, r, 1, 1, 1, True)
    assert out.dtype == torch.float32 and the_record(h=5).ranking[0].candidate.is_torch
    run_and_check(x, weight, bias, r)


@pytest.mark.skipif(not ON_CPU, reason="injects into the interpreter's candidate list")
def test_the_2x_rule_discards_a_bf16_candidate_at_3x_eagers_error_and_keeps_one_at_1_5x(fresh, monkeypatch):
    """Planted candidates whose output is the float64 reference plus eager bf16's own error times 3 (a near
    miss: over 2x) and times 1.5. The inputs make the residual cancel a conv output of order 100, so eager's
    bf16 rounding (~0.2) dwarfs the rule's floor (2^-6 of |ref| ~ 1) and the 2x term alone decides."""
    near_miss = Candidate.make("conv", 4, 1, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=2)
    within = Candidate.make("conv", 4, 1, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=4)
    monkeypatch.setitem(conv.CANDIDATES, "interpreter", [near_miss, within, GOOD])
    family, real_inputs, real_run = conv.FAMILY, conv.FAMILY.inputs, conv.FAMILY.run

    def cancelling_inputs(key, device, generator):
        (x, weight, bias, _, stride, padding, dilation, relu), tf32 = real_inputs(key, device, generator)
        weight = (weight.float() * 64).to(weight.dtype).contiguous(memory_format=torch.channels_last)
        y = reference.conv_bias_act(x.double(), weight.double(), bias.double(), None, stride, padding, dilation,
                                    False)
        noise = torch.randn(y.shape, generator=generator, device=device, dtype=torch.float64)
        residual = (noise - y).to(x.dtype).contiguous(memory_format=torch.channels_last)
        return (x, weight, bias, residual, stride, padding, dilation, relu), tf32

    ratios = {}

    def run(candidate, inputs):
        if candidate not in (near_miss, within):
            return real_run(candidate, inputs)
        eager, exact = family.references(inputs)
        k = 3.0 if candidate == near_miss else 1.5
        out = (exact + k * (eager.double() - exact)).to(torch.bfloat16)
        ratios[candidate] = numerics.error(out, exact) / numerics.error(eager, exact)
        floor = numerics.FLOOR[torch.bfloat16] * max(1.0, numerics.error(exact, torch.zeros_like(exact)))
        assert numerics.error(eager, exact) > 5 * floor  # the floor does not decide
        return out

    monkeypatch.setattr(family, "inputs", cancelling_inputs)
    monkeypatch.setattr(family, "run", run)
    x, weight, _, r = conv_case(torch.bfloat16)
    key = conv.shape_key(x, weight, r, None, [1, 1], [1, 1], [1, 1], True, "tf32")
    with pytest.warns(TuningWarning, match=r"discarded .* GROUP_M=2 .*: wrong: error .* > 2 x eager's"):
        record = tuner.tune(family, key, DEVICE, "interpreter")
    assert [c for c, _ in record.rejected] == [near_miss]
    assert [r.candidate for r in record.ranking] == [within, GOOD, tuner.TORCH_CANDIDATE]
    assert 2.9 < ratios[near_miss] < 3.1 and 1.4 < ratios[within] < 1.6, ratios


def test_tuning_leaves_the_callers_random_state_alone(fresh):
    case = conv_case()
    states = [torch.get_rng_state()] + ([torch.cuda.get_rng_state(DEVICE)] if DEVICE.type == "cuda" else [])
    run_and_check(*case)
    assert torch.equal(torch.get_rng_state(), states[0])
    if DEVICE.type == "cuda":
        assert torch.equal(torch.cuda.get_rng_state(DEVICE), states[1])


@pytest.mark.skipif(not ON_CPU, reason="the forced Hopper list under the interpreter")
def test_forced_sm90_target_tunes_through_every_hopper_candidate(fresh, monkeypatch):
    monkeypatch.setenv(tuner.TARGET_ENV, "sm90")
    x, weight, bias, r = conv_case(torch.float16, n=4, cin=64, cout=128, h=8, w=8, k=1)
    out = conv.conv_bias_act(x, weight, bias, r, 1, 0, 1, True)
    record = the_record()
    key = conv.shape_key(x, weight, r, None, [1, 1], [0, 0], [1, 1], True, "tf32")
    tried = tuner.candidates("sm90", key)
    assert len(tried) >= 8 and not record.rejected, record.rejected
    assert [r.candidate for r in record.ranking] == tried
    assert any(c.kernel == "conv_tma_gemm" for c in tried) == conv.conv_tma.AVAILABLE
    args = (x, weight, bias, r, 1, 0, 1, True)
    assert_2x(out, reference.conv_bias_act(*args), reference.conv_bias_act(*(t.double() for t in args[:4]),
                                                                               1, 0, 1, True))


# --- the cache -----------------------------------------------------------------------------------

def cache_files(root: Path) -> list[Path]:
    return sorted(root.glob("tuning/*/conv_bias_act/*.json"))


def test_choices_persist_in_the_cache(fresh):
    case = conv_case()
    with tuner.recording() as events:
        run_and_check(*case)
    (path,) = cache_files(fresh)
    data = json.loads(path.read_text())
    device = "interpreter" if ON_CPU else torch.cuda.get_device_name(DEVICE)
    assert data["identity"]["kernel"] == "conv_bias_act" and data["identity"]["device"] == device
    assert data["key"] == events[0].key._asdict() and events[0].origin == "tuned"
    assert tuner.Candidate.from_json(data["ranking"][0]["candidate"]) == events[0].candidate
    tuner.clear()  # as a new process would start
    runs = tuner.STATS["candidate_runs"]
    with tuner.recording() as events:
        run_and_check(*case)
        run_and_check(*case)
    assert [e.origin for e in events] == ["cache", "memory"]
    assert tuner.STATS["candidate_runs"] == runs


DAMAGE = {
    "corrupt": lambda text: "{not json",
    "truncated": lambda text: text[: len(text) // 2],
    "foreign": lambda text: text.replace(f'"triton": "{triton.__version__}"', '"triton": "0.0.1"'),
    "stale candidate": lambda text: re.sub(r'"BLOCK_M": \d+', '"BLOCK_M": 7', text, count=1),
    "not an object": lambda text: "[]",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_cache_file_is_ignored_with_a_warning_and_rewritten(fresh, damage):
    case = conv_case()
    run_and_check(*case)
    (path,) = cache_files(fresh)
    good = path.read_text()
    damaged = DAMAGE[damage](good)
    assert damaged != good
    path.write_text(damaged)
    tuner.clear()
    with pytest.warns(TuningWarning, match=rf"{path}.*re-tuning|ignoring .*{path}"):
        run_and_check(*case)
    assert json.loads(path.read_text())["ranking"] == json.loads(good)["ranking"]


def test_the_cache_key_hashes_every_source_a_choice_depends_on(monkeypatch, tmp_path):
    """The kernels, the tuner, the 2x rule, the references (and their accumulation dtypes), the launch helpers
    and the torch path's epilogue: a change to any of them is a new key."""
    hashed = {Path(p).name for p in (*tuner.COMMON_SOURCES, *conv.FAMILY.sources)}
    assert {"conv.py", "conv_tma.py", "_common.py", "tuner.py", "numerics.py", "reference.py", "_op_meta.py",
            "ext.py"} <= hashed
    assert {"pool.py", "numerics.py", "reference.py"} <= {Path(p).name for p in (*tuner.COMMON_SOURCES,
                                                                                    *pool.FAMILY.sources)}
    copies = []
    for i, path in enumerate(tuner.COMMON_SOURCES):
        copies.append(tmp_path / f"{i}_{Path(path).name}")
        copies[-1].write_bytes(Path(path).read_bytes())
    monkeypatch.setattr(tuner, "COMMON_SOURCES", tuple(map(str, copies)))
    monkeypatch.setattr(tuner, "_SOURCE_HASHES", {})
    before = tuner.source_hash(conv.FAMILY)
    for copy in copies:
        text = copy.read_bytes()
        copy.write_bytes(text + b"\n# changed\n")
        tuner._SOURCE_HASHES.clear()
        assert tuner.source_hash(conv.FAMILY) != before, copy.name
        copy.write_bytes(text)
    tuner._SOURCE_HASHES.clear()
    assert tuner.source_hash(conv.FAMILY) == before


def test_an_unreadable_source_turns_the_disk_cache_off(fresh, monkeypatch):
    missing = fresh / "gone" / "numerics.py"
    monkeypatch.setattr(tuner, "COMMON_SOURCES", (*tuner.COMMON_SOURCES, str(missing)))
    for state in ("_SOURCE_HASHES", "_CACHE_OFF"):
        monkeypatch.setattr(tuner, state, {})
    monkeypatch.setitem(tuner._STATE, "source_warned", {})
    case = conv_case()
    with pytest.warns(TuningWarning, match=rf"the tuning cache is off for conv_bias_act: cannot read {missing} "
                                           r"\(No such file or directory\); its choices are tuned in every process"):
        run_and_check(*case)
    assert not cache_files(fresh) and str(missing) in tuner.disk_cache_off()
    tuner.clear()  # as a new process would start: it tunes again, since nothing was cached
    runs = tuner.STATS["candidate_runs"]
    run_and_check(*case)
    assert tuner.STATS["candidate_runs"] > runs and not cache_files(fresh)


def test_an_unwritable_cache_warns_and_keeps_choices_in_memory(fresh, monkeypatch):
    blocker = fresh / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(tuner.CACHE_ENV, str(blocker / "cache"))  # a folder inside a file: cannot exist
    monkeypatch.setitem(tuner._STATE, "cache_warned", False)
    case = conv_case()
    with pytest.warns(TuningWarning, match="cannot write the tuning cache"):
        run_and_check(*case)
    runs = tuner.STATS["candidate_runs"]
    run_and_check(*case)
    assert tuner.STATS["candidate_runs"] == runs


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(tuner.CACHE_ENV, str(tmp_path / "mine"))
    assert tuner.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(tuner.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuner.cache_dir() == tmp_path / "xdg" / "resnet_fast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert tuner.cache_dir() == Path.home() / ".cache" / "resnet_fast"


def test_concurrent_writes_never_leave_a_torn_file(tmp_path):
    path = tmp_path / "k.json"
    payloads = [{"writer": i, "data": list(range(2000))} for i in range(4)]
    seen, stop = [], threading.Event()

    def write(payload):
        for _ in range(25):
            tuner._store(path, payload)

    def read():
        while not stop.is_set():
            if path.exists():
                seen.append(json.loads(path.read_text())["writer"])  # raises on a torn file

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    reader.join()
    assert json.loads(path.read_text())["writer"] in range(4) and seen
    assert not list(tmp_path.glob("*.tmp"))


RANK = """
import os, sys, torch
sys.path.insert(0, {tests!r})
from resnet_fast.ops.triton import conv, tuner
torch.manual_seed(int(sys.argv[1]))
x = torch.randn(2, 20, 7, 9).to(memory_format=torch.channels_last)
conv.conv_bias_act(x, torch.randn(24, 20, 3, 3), torch.randn(24), None, 1, 1, 1, True)
print("tuned", tuner.STATS["tuned"], "from_cache", tuner.STATS["from_cache"])
"""


@pytest.mark.skipif(not ON_CPU, reason="the ranks run on the interpreter")
def test_two_ranks_tuning_one_key_at_once_tune_it_once(tmp_path):
    env = {**os.environ, tuner.CACHE_ENV: str(tmp_path), "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    script = RANK.format(tests=str(ROOT / "tests"))
    ranks = [subprocess.Popen([sys.executable, "-c", script, str(rank)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), outputs
    counts = sorted(out.split()[1:4:2] for out, _ in outputs)
    assert counts == [["0", "1"], ["1", "0"]], outputs  # one tuned it, the other read its result
    assert len(cache_files(tmp_path)) == 1
