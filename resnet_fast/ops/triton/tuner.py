"""resnet_fast's kernel tuner: no Triton config reaches a user's output before it was checked on this GPU.

Replaces @triton.autotune for the conv and pool kernels. A kernel family (conv.py, pool.py) describes
its shape keys, its candidates per target, how to run one, and its references; for each new key the
tuner, on first use:

  1. makes random inputs of the key's shape, dtype and layout (a private generator: the user's RNG
     state is untouched; the inputs are never the user's, so a cached choice holds for any data);
  2. computes two references once: eager PyTorch in the key's dtype and PyTorch in float64;
  3. runs every candidate (Triton configs, TMA variants on sm_90, and the torch path: cuDNN/oneDNN plus
     the fused epilogue) and judges each output by the 2x rule (resnet_fast.numerics); a candidate that
     disagrees or fails to compile or launch is discarded with a one-line TuningWarning naming the
     kernel, shape and config;
  4. times the survivors on CUDA (GPU time per call: CUDA events around back-to-back calls that the host
     queued during a GPU sleep, median of 7 samples) and ranks them. Under the Triton interpreter
     timing means nothing: survivors keep list order, and the record says so;
  5. keeps the ranking in memory and in the on-disk cache (cache_dir()).

The launcher then runs the best survivor. The torch path is a timed candidate like the others, so a
layer runs on cuDNN wherever cuDNN is faster, and it is the fallback (with a warning) when no Triton
candidate survives. `triton_only()` makes the launcher skip the torch path whenever a Triton candidate
survived (kernel tests, which must prove a kernel ran).

Targets: "sm90" (Hopper: 8-warp wgmma tiles, TMA variants), "sm80" (Ampere), "interpreter" (one fixed
config). RESNET_FAST_TUNE_TARGET=sm90|sm80 forces a GPU's list, also under TRITON_INTERPRET=1 (CI tunes
through every Hopper candidate on CPU that way).

Cache: one JSON file per key, cache_dir()/tuning/<identity>/<kernel>/<key hash>.json, written atomically
(temp file + os.replace) under a per-key file lock, so processes and DDP ranks share it: one rank tunes
a key, the others wait and read its result. The identity (device name and capability or "interpreter",
target, triton and torch versions, a hash of every source a choice depends on: the kernels, the tuner, the
2x rule, the references, the torch path's epilogue) is repeated in the file and checked on load; a corrupt,
truncated or foreign file is ignored with a warning and rewritten. Where a source cannot be read (a zipped
install), the disk cache is off for that family, with a warning: its choices are tuned in every process.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional

import torch
import triton

from ... import numerics
from ...numerics import within_2x
from .. import _op_meta, ext, reference
from ..dispatch import interpreter_enabled
from . import _common

TARGETS = ("sm90", "sm80")
TARGET_ENV = "RESNET_FAST_TUNE_TARGET"
CACHE_ENV = "RESNET_FAST_CACHE_DIR"
FORMAT = "resnet_fast.tuning/1"
TORCH = "torch"  # the candidate kernel name of the torch path
# Shared memory per block (opt-in maximum) of the reference GPU of each target: H100/H200, A100.
TARGET_SMEM = {"sm90": 232448, "sm80": 166912, "interpreter": 232448}


class TuningWarning(UserWarning):
    """A candidate was discarded, or a key fell back to the torch path, or the cache was unusable."""


@dataclass(frozen=True)
class Candidate:
    """One way to run a key: a kernel and its launch parameters, or the torch path."""
    kernel: str  # "conv", "conv_tma_gemm", "conv_tma_implicit", "pool", ... or TORCH
    params: tuple = ()  # ((name, value), ...): the kernel's tile constexprs
    num_warps: int = 4
    num_stages: int = 1

    @classmethod
    def make(cls, kernel: str, num_warps: int = 4, num_stages: int = 1, **params: int) -> "Candidate":
        return cls(kernel, tuple(params.items()), num_warps, num_stages)

    @property
    def kwargs(self) -> dict:
        return dict(self.params)

    @property
    def is_torch(self) -> bool:
        return self.kernel == TORCH

    def __str__(self) -> str:
        if self.is_torch:
            return "torch (cuDNN/oneDNN + fused epilogue)"
        tiles = " ".join(f"{k}={v}" for k, v in self.params)
        return f"{self.kernel} {tiles} warps={self.num_warps} stages={self.num_stages}"

    def to_json(self) -> dict:
        return {"kernel": self.kernel, "params": dict(self.params), "num_warps": self.num_warps,
                "num_stages": self.num_stages}

    @classmethod
    def from_json(cls, data: dict) -> "Candidate":
        return cls(str(data["kernel"]), tuple((str(k), int(v)) for k, v in data["params"].items()),
                   int(data["num_warps"]), int(data["num_stages"]))


TORCH_CANDIDATE = Candidate(TORCH)


class Family:
    """What the tuner needs to know about one kernel family. Subclasses set name, key_type, sources."""
    name: str  # e.g. "conv_bias_act"
    key_type: type  # the NamedTuple of its shape keys (fields: ints, bools, strings)
    sources: tuple  # its kernels' files, beside COMMON_SOURCES (all hashed into the cache identity)

    def candidates(self, target: str, key, smem: int) -> list[Candidate]:
        """Every candidate to try, in preference order, TORCH_CANDIDATE last."""
        raise NotImplementedError

    def inputs(self, key, device: torch.device, generator: torch.Generator) -> tuple:
        raise NotImplementedError

    def run(self, candidate: Candidate, inputs: tuple) -> torch.Tensor:
        raise NotImplementedError

    def references(self, inputs: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """(eager PyTorch in the key's dtype, PyTorch in float64)."""
        raise NotImplementedError

    def rule_dtype(self, key) -> torch.dtype:
        """The precision whose floor the 2x rule uses."""
        raise NotImplementedError

    def describe(self, key) -> str:
        """The shape in a few words, for warnings and `resnet-fast tune`."""
        raise NotImplementedError


_FAMILIES: dict[type, Family] = {}


def register(family: Family) -> Family:
    _FAMILIES[family.key_type] = family
    return family


def candidates(target: str, key) -> list[Candidate]:
    """Exactly the candidates the tuner tries for `key` on `target` ("sm90", "sm80" or "interpreter"), in
    the order it tries them, the torch path last. key: a conv.ConvKey or pool.PoolKey. Shared memory is
    that of the target's reference GPU (H100/H200, A100), as the tuner finds it there."""
    if target not in TARGETS + ("interpreter",):
        raise ValueError(f"unknown tuning target {target!r}; expected one of {', '.join(TARGETS)} or interpreter")
    return family_of(key).candidates(target, key, TARGET_SMEM[target])


def family_of(key) -> Family:
    from . import conv, pool  # noqa: F401  registers the families
    try:
        return _FAMILIES[type(key)]
    except KeyError:
        raise TypeError(f"not a tuning key: {key!r}") from None


# --- where and for what ------------------------------------------------------------------

def target(device: torch.device) -> str:
    """Whose candidate list the tuner uses for tensors on `device`."""
    forced = os.environ.get(TARGET_ENV, "")
    if forced:
        if forced not in TARGETS:
            raise ValueError(f"{TARGET_ENV}={forced!r}: expected one of {', '.join(TARGETS)}")
        return forced
    if device.type != "cuda":
        return "interpreter"
    return "sm90" if torch.cuda.get_device_capability(device) >= (9, 0) else "sm80"


def device_smem(device: torch.device, target_name: str) -> int:
    if device.type != "cuda":
        return TARGET_SMEM[target_name]
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block


def cache_dir() -> Path:
    """$RESNET_FAST_CACHE_DIR, else $XDG_CACHE_HOME/resnet_fast, else ~/.cache/resnet_fast."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "resnet_fast"


# What every family's choices depend on besides its kernels: this tuner (inputs, checks), the 2x rule, the
# references and their accumulation dtypes, the launch helpers, the torch path's fused epilogue (ext.py, and
# the compiled extension where it loaded).
COMMON_SOURCES = (__file__, numerics.__file__, reference.__file__, _op_meta.__file__, _common.__file__, ext.__file__)


def _extension_binary() -> tuple:
    extension = sys.modules.get("resnet_fast._C")
    return (extension.__file__,) if extension is not None else ()


_SOURCE_HASHES: dict[str, Optional[str]] = {}
_CACHE_OFF: dict[str, str] = {}  # family name -> why its choices stay off the disk


def source_hash(family: Family) -> Optional[str]:
    """A hash of every source a cached choice of `family` depends on; None when one cannot be read (a path
    would not say whether the code changed: the disk cache is then off for the family)."""
    if family.name not in _SOURCE_HASHES:
        digest = hashlib.sha256()
        for path in (*COMMON_SOURCES, *_extension_binary(), *family.sources):
            try:
                digest.update(Path(path).read_bytes())
            except OSError as exc:
                _SOURCE_HASHES[family.name] = None
                _CACHE_OFF[family.name] = f"cannot read {path} ({exc.strerror or exc})"
                break
        else:
            _SOURCE_HASHES[family.name] = digest.hexdigest()[:16]
    return _SOURCE_HASHES[family.name]


def disk_cache_off() -> str:
    """Why the disk cache is off for some family used so far ("" when it is on for all of them)."""
    return "; ".join(f"{name}: {why}" for name, why in sorted(_CACHE_OFF.items()))


def identity(family: Family, device: torch.device, target_name: str) -> dict:
    """What a cached choice is only valid for."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name, capability = torch.cuda.get_device_name(device), f"{major}.{minor}"
    else:
        name, capability = "interpreter", None
    return {"format": FORMAT, "device": name, "capability": capability, "target": target_name,
            "triton": triton.__version__, "torch": torch.__version__, "kernel": family.name,
            "source": source_hash(family)}


def _digest(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


def cache_path(family: Family, key, ident: dict) -> Path:
    slug = "".join(c if c.isalnum() or c in "-." else "_" for c in f"{ident['device']}-{ident['target']}")
    return (cache_dir() / "tuning" / f"{slug}-{_digest(ident, 12)}" / family.name
            / f"{_digest(key._asdict())}.json")


# --- records ---------------------------------------------------------------------------------

class Ranked(NamedTuple):
    candidate: Candidate
    ms: Optional[float]  # median time; None when untimed (interpreter)


@dataclass
class Record:
    """The outcome of tuning one key."""
    ranking: list  # [Ranked]: the survivors, best first
    rejected: list  # [(Candidate, reason)]
    timed: bool
    tune_s: float

    def best(self, triton_only: bool = False) -> Ranked:
        for ranked in self.ranking:
            if not (triton_only and ranked.candidate.is_torch):
                return ranked
        torch_ranked = [r for r in self.ranking if r.candidate.is_torch]
        return torch_ranked[0] if torch_ranked else Ranked(TORCH_CANDIDATE, None)

    def to_json(self) -> dict:
        return {"timed": self.timed, "tune_s": self.tune_s,
                "ranking": [{"candidate": r.candidate.to_json(), "ms": r.ms} for r in self.ranking],
                "rejected": [{"candidate": c.to_json(), "reason": why} for c, why in self.rejected]}

    @classmethod
    def from_json(cls, data: dict) -> "Record":
        ranking = [Ranked(Candidate.from_json(r["candidate"]), None if r["ms"] is None else float(r["ms"]))
                   for r in data["ranking"]]
        rejected = [(Candidate.from_json(r["candidate"]), str(r["reason"])) for r in data["rejected"]]
        return cls(ranking, rejected, bool(data["timed"]), float(data["tune_s"]))


class Event(NamedTuple):
    """One lookup seen by recording(): which key, what runs, and where the choice came from."""
    family: str
    key: tuple
    description: str
    candidate: Candidate
    ms: Optional[float]
    origin: str  # "tuned" (now), "cache" (disk), "memory" (earlier in this process)
    record: Record


# --- state -----------------------------------------------------------------------------------

_RECORDS: dict = {}  # (family, key, device, target) -> Record
_CHOICES: dict = {}  # (family, key, device, target env, triton_only) -> Candidate: the hot path
_LOCK = threading.RLock()
_STATE = {"triton_only": False, "events": None, "cache_warned": False, "source_warned": {}}
STATS = {"tuned": 0, "from_cache": 0, "candidate_runs": 0}


def clear() -> None:
    """Forget every choice made in this process (the disk cache stays)."""
    with _LOCK:
        _RECORDS.clear()
        _CHOICES.clear()


@contextlib.contextmanager
def triton_only() -> Iterator[None]:
    """Inside the block, run the best Triton survivor even where the torch path was faster (kernel tests).
    A key with no Triton survivor still runs the torch path."""
    saved = _STATE["triton_only"]
    _STATE["triton_only"] = True
    try:
        yield
    finally:
        _STATE["triton_only"] = saved


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Collect an Event for every lookup made inside the block (`resnet-fast tune`, bench)."""
    saved = _STATE["events"]
    events: list = []
    _STATE["events"] = events
    try:
        yield events
    finally:
        _STATE["events"] = saved


def choose(family: Family, key, device: torch.device) -> Candidate:
    """The candidate that runs `key` on `device`: a dict lookup once the key was resolved."""
    state = (family.name, key, device, os.environ.get(TARGET_ENV), _STATE["triton_only"])
    choice = _CHOICES.get(state)
    if choice is None or _STATE["events"] is not None:
        choice = _resolve(family, key, device, state)
    return choice


def _resolve(family: Family, key, device: torch.device, state: tuple) -> Candidate:
    with _LOCK:
        target_name = target(device)
        record_key = (family.name, key, device, target_name)
        record, origin = _RECORDS.get(record_key), "memory"
        if record is None:
            record, origin = _load_or_tune(family, key, device, target_name)
            _RECORDS[record_key] = record
        best = record.best(_STATE["triton_only"])
        _CHOICES[state] = best.candidate
        events = _STATE["events"]
        if events is not None:
            events.append(Event(family.name, key, family.describe(key), best.candidate, best.ms, origin, record))
        return best.candidate


# --- the disk cache ---------------------------------------------------------------------------

def _warn(message: str) -> None:
    warnings.warn(message, TuningWarning, stacklevel=3)


def _load_or_tune(family: Family, key, device: torch.device, target_name: str) -> tuple[Record, str]:
    ident = identity(family, device, target_name)
    if ident["source"] is None:
        if not _STATE["source_warned"].get(family.name):
            _STATE["source_warned"][family.name] = True
            _warn(f"resnet_fast tuner: the tuning cache is off for {family.name}: {_CACHE_OFF[family.name]}; its "
                  "choices are tuned in every process")
        return tune(family, key, device, target_name), "tuned"
    path = cache_path(family, key, ident)
    allowed = set(family.candidates(target_name, key, device_smem(device, target_name)))
    record = _load(path, ident, key, allowed)
    if record is not None:
        STATS["from_cache"] += 1
        return record, "cache"
    with _file_lock(path):
        record = _load(path, ident, key, allowed, quiet=True)  # another process may have tuned it meanwhile
        if record is not None:
            STATS["from_cache"] += 1
            return record, "cache"
        record = tune(family, key, device, target_name)
        _store(path, {"identity": ident, "key": key._asdict(), "description": family.describe(key),
                      "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **record.to_json()})
    return record, "tuned"


def _load(path: Path, ident: dict, key, allowed: set, quiet: bool = False) -> Optional[Record]:
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as exc:
        if not quiet:
            _warn(f"resnet_fast tuner: cannot read cache file {path} ({exc}); re-tuning")
        return None
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("identity") != ident or data.get("key") != key._asdict():
            if not quiet:
                _warn(f"resnet_fast tuner: ignoring foreign cache file {path} (made for another device, "
                      "version, kernel source or shape); re-tuning")
            return None
        record = Record.from_json(data)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        if not quiet:
            _warn(f"resnet_fast tuner: ignoring corrupt cache file {path} ({type(exc).__name__}: {exc}); re-tuning")
        return None
    unknown = [r.candidate for r in record.ranking if r.candidate not in allowed]
    if unknown or not record.ranking:
        if not quiet:
            _warn(f"resnet_fast tuner: ignoring cache file {path}: it names candidates this version does not "
                  f"try ({', '.join(map(str, unknown)) or 'none survived'}); re-tuning")
        return None
    return record


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on path + ".lock" across processes (DDP ranks); none where that is impossible."""
    try:
        import fcntl
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(f"{path}.lock", "a")
    except (ImportError, OSError):
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass  # e.g. a file system without locks: the atomic write alone still keeps files whole
        yield


def _store(path: Path, payload: dict) -> None:
    """Write path atomically: a reader sees the old file or the new one, never a part."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if not _STATE["cache_warned"]:
            _STATE["cache_warned"] = True
            _warn(f"resnet_fast tuner: cannot write the tuning cache in {cache_dir()} ({exc}); choices are kept "
                  f"in memory for this process only (set {CACHE_ENV} to a writable folder)")


# --- tuning -------------------------------------------------------------------------------------

def tune(family: Family, key, device: torch.device, target_name: str) -> Record:
    """Validate every candidate of `key` against the references, time the survivors, rank them."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"resnet_fast tuner: {family.name} {family.describe(key)} was not tuned before CUDA "
                           "graph capture began; run the model once outside the capture first (resnet_fast."
                           "cuda_graphed does), or tune ahead of time with `resnet-fast tune`")
    start = time.perf_counter()
    where = f"{family.name} {family.describe(key)}"
    generator = torch.Generator(device=device).manual_seed(int(_digest(key._asdict(), 8), 16))
    # No autograd, and no autocast: the float64 reference must stay float64, every candidate its key's dtype.
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        inputs = family.inputs(key, device, generator)
        eager, exact = family.references(inputs)
        rule = family.rule_dtype(key)
        survivors, rejected = [], []
        for candidate in family.candidates(target_name, key, device_smem(device, target_name)):
            reason = _check(family, candidate, inputs, eager, exact, rule)
            if reason:
                rejected.append((candidate, reason))
                _warn(f"resnet_fast tuner: discarded {where} {candidate}: {reason}")
            else:
                survivors.append(candidate)
        timed = device.type == "cuda" and not interpreter_enabled()
        if timed:
            ranking = sorted((Ranked(c, _median_ms(lambda c=c: family.run(c, inputs), device)) for c in survivors),
                             key=lambda r: r.ms)
        else:  # the interpreter's timings mean nothing: keep the list's order
            ranking = [Ranked(c, None) for c in survivors]
    if not any(not r.candidate.is_torch for r in ranking):
        _warn(f"resnet_fast tuner: no Triton candidate survived for {where}; it runs on the torch path "
              "(cuDNN/oneDNN + fused epilogue)")
    STATS["tuned"] += 1
    return Record(ranking, rejected, timed, time.perf_counter() - start)


def _check(family: Family, candidate: Candidate, inputs: tuple, eager, exact, rule) -> str:
    """Why the candidate is unusable ("" if it agrees with the references)."""
    STATS["candidate_runs"] += 1
    try:
        out = family.run(candidate, inputs)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
    except Exception as exc:  # a compile error, too many resources, a launch failure: not this candidate
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return f"failed: {type(exc).__name__}: {first}"
    verdict = within_2x(out, eager, exact, rule)
    return "" if verdict.ok else f"wrong: {verdict.why}"


def _median_ms(fn: Callable[[], Any], device: torch.device, samples: int = 7, sample_ms: float = 1.0) -> float:
    """GPU milliseconds per call: the median over `samples` samples of back-to-back calls, each timed with
    CUDA events behind a GPU sleep long enough for the host to queue every call (so Python's launch
    overhead, which CUDA graphs remove, does not decide the ranking)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    sleep = getattr(torch.cuda, "_sleep", None)

    def sample(calls: int) -> float:
        if sleep is not None:
            sleep(100_000 * calls)  # ~50 us of GPU clock per call to queue
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls

    fn()  # warm: caches, clocks
    torch.cuda.synchronize(device)
    calls = max(1, min(100, int(sample_ms / max(sample(1), 1e-4))))
    return statistics.median(sample(calls) for _ in range(samples))
