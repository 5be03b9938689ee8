"""Crafted CIFAR-10 batch files (resnet_fast/train/cifar_pickle.py): each is refused by `resnet-fast train` with
one line, and reading all of them stays within a few MB of memory, whatever sizes they declare. Real batches
(numpy arrays pickled by numpy 1.x and 2.x, protocols 2 and 5) still load."""
import json
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from train_data import FAST, train, write_cifar10

from resnet_fast.train import cifar_pickle

_RECONSTRUCT = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct
PIXELS = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)


class Declared:
    """Pickles as numpy pickles an array (multiarray._reconstruct, then the array's __setstate__), but with
    whatever shape, dtype and payload it is given: what a crafted file can declare."""

    def __init__(self, shape, dtype, payload):
        self.shape, self.dtype, self.payload = shape, np.dtype(dtype), payload

    def __reduce__(self):
        return _RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, self.shape, self.dtype, False, self.payload)


class Calls:
    """Pickles as a call of `fn(*args)` (REDUCE)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _dump(entry) -> bytes:
    return pickle.dumps(entry, protocol=2)


# name -> (the file's bytes, what the one-line error says). The sizes are what the issue found allocated
# (2.9 GB, 4.4 GB) and more; the unpickler must refuse them without trying.
CRAFTED = {
    "object dtype": (_dump({"data": Declared((360_000_000,), "O", []), "labels": []}), "refused dtype 'O8'"),
    "labels longer than the file": (
        _dump({"data": PIXELS, "labels": Declared((550_000_000,), "<i8", b"\0" * 16)}),
        "declared as (550000000,) int64 (4400000000 bytes) holds 16 bytes"),
    "huge shape": (_dump({"data": Declared((1 << 40, 3072), "u1", b"\0" * 8), "labels": [0]}), "holds 8 bytes"),
    "ndarray constructor": (_dump({"data": Calls(np.ndarray, (1 << 33,), "u1"), "labels": []}),
                            "refused a numpy.ndarray(...) call"),
    "fewer labels than images": (_dump({"data": PIXELS, "labels": [1]}), "2 images but 1 labels"),
    "labels out of range": (_dump({"data": PIXELS, "labels": [3, 10]}), "labels span 3..10, not 0..9"),
    "images not 3072 bytes": (_dump({"data": np.zeros((2, 3000), np.uint8), "labels": [0, 1]}),
                              "'data' is uint8 (2, 3000), not N x 3072 uint8"),
    # LONG_BINPUT 2**30: CPython's unpickler would grow its memo to 2**31 entries (16 GB) and zero them
    "memo index": (b"\x80\x02}r" + struct.pack("<I", 1 << 30) + b".", "memo index 1073741824"),
    # BINBYTES8 declaring 1 TB, then 3 bytes
    "bytes longer than the file": (b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"abc.", "but only 4 remain"),
    "frame longer than the file": (b"\x80\x04\x95" + struct.pack("<Q", 1 << 40) + b"}.", "overruns the file"),
}


def _cifar_with(root: Path, blob: bytes) -> Path:
    write_cifar10(root)
    (root / "cifar-10-batches-py" / "data_batch_2").write_bytes(blob)
    return root


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_batch_is_one_line_error(capsys, tmp_path, case):
    blob, message = CRAFTED[case]
    assert len(blob) < 100_000
    root = _cifar_with(tmp_path / "data", blob)
    rc, _, err = train(capsys, *FAST, "--data", f"cifar10:{root}", "--output-dir", tmp_path / "out")
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "data_batch_2 is unreadable (" in err and message in err, err
    assert not (tmp_path / "out").exists()


# Loads every file in a fresh process and prints, per file, the error and how far the peak RSS grew; the
# module is loaded alone (numpy, not torch), so the peak before loading is the process's own small one. The
# address space is capped 1 GB above what the process holds, so a regression fails with MemoryError here
# instead of taking the machine.
_MEASURE = r"""
import importlib.util, json, resource, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("cifar_pickle", sys.argv[1])
cifar_pickle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cifar_pickle)

def vm_bytes():
    return int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()

def peak_mb():  # VmHWM: getrusage's ru_maxrss would still count the peak of the process that forked this one
    return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024

resource.setrlimit(resource.RLIMIT_AS, (vm_bytes() + (1 << 30), resource.RLIM_INFINITY))
out = {}
for path in sys.argv[2:]:
    before = peak_mb()
    try:
        cifar_pickle.images_and_labels(cifar_pickle.load(Path(path)))
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    out[Path(path).name] = [error, peak_mb() - before]
print(json.dumps(out))
"""


needs_proc = pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads memory use from /proc")


def _measure(paths: list) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _MEASURE, cifar_pickle.__file__, *map(str, paths)],
                          capture_output=True, text=True, timeout=300)


@needs_proc
def test_crafted_batches_are_refused_within_bounded_memory(tmp_path):
    paths = []
    for i, (blob, _) in enumerate(CRAFTED.values()):
        paths.append(tmp_path / f"crafted_{i}")
        paths[-1].write_bytes(blob)
    proc = _measure(paths)
    assert proc.returncode == 0, proc.stderr
    measured = json.loads(proc.stdout)
    for (case, (_, message)), path in zip(CRAFTED.items(), paths):
        error, grown_mb = measured[path.name]
        assert error is not None and message in error, (case, error)
        assert grown_mb < 20, f"{case}: peak RSS grew {grown_mb:.0f} MB"


@needs_proc
def test_a_full_size_batch_loads_within_a_few_copies_of_its_size(tmp_path):
    """A real-size batch (10000 images, 30 MB) loads, and its peak is a few times the file, not more."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (10_000, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, 10_000)]
    blob = pickle.dumps({"batch_label": "training batch 1 of 5", "labels": labels, "data": pixels,
                         "filenames": [f"img_{i}.png" for i in range(10_000)]}, protocol=2)
    path = tmp_path / "data_batch_1"
    path.write_bytes(blob.replace(b"numpy._core.", b"numpy.core."))  # as numpy 1.x wrote the official files
    proc = _measure([path])
    assert proc.returncode == 0, proc.stderr
    error, grown_mb = json.loads(proc.stdout)[path.name]
    assert error is None and grown_mb < 6 * len(blob) / 2**20, (error, grown_mb)
    planes, got = cifar_pickle.images_and_labels(cifar_pickle.load(path))
    assert got == labels and np.array_equal(planes.reshape(10_000, 3072), pixels)


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("dtype", ["<i8", ">i4", "u1"])
def test_numpy_arrays_of_numpy_1_and_2_load(tmp_path, protocol, dtype):
    """The official batches were pickled by numpy 1.x (numpy.core.multiarray) as protocol 2; protocol 5
    rebuilds arrays with numpy's _frombuffer. Labels may be an integer array in any byte order."""
    labels = np.array([3, 1], dtype=dtype)
    blob = pickle.dumps({"data": PIXELS, "labels": labels, "batch_label": b"x"}, protocol=protocol)
    path = tmp_path / "batch"
    path.write_bytes(blob.replace(b"numpy._core.", b"numpy.core.") if protocol == 2 else blob)
    entry = cifar_pickle.load(path)
    assert np.array_equal(entry["data"], PIXELS) and entry["batch_label"] == b"x"
    planes, got = cifar_pickle.images_and_labels(entry)
    assert got == [3, 1] and planes.shape == (2, 3, 32, 32)


def test_python2_pickles_with_str_payloads_load(tmp_path):
    """Python 2's cPickle wrote the payload as a str (BINSTRING), which latin1 decoding turns into text."""
    text = PIXELS.tobytes().decode("latin1")
    blob = pickle.dumps({"data": Declared((2, 3072), "u1", text), "labels": [0, 9]}, protocol=2)
    path = tmp_path / "batch"
    path.write_bytes(blob)
    planes, got = cifar_pickle.images_and_labels(cifar_pickle.load(path))
    assert got == [0, 9] and np.array_equal(planes.reshape(2, 3072), PIXELS)


def test_opcode_scan_accepts_what_pickle_writes():
    for protocol in (2, 4, 5):
        cifar_pickle._check_opcodes(pickle.dumps({"data": PIXELS, "labels": list(range(300))}, protocol=protocol))
    with pytest.raises(pickle.UnpicklingError, match="memo index 5 at byte 3 exceeds the 2 opcodes"):
        cifar_pickle._check_opcodes(b"\x80\x02}q\x05.")
