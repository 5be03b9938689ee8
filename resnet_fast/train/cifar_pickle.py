"""Reads one CIFAR-10 python batch (a pickled dict with 'data' and 'labels') without trusting the file.

Plain pickle.load, which torchvision uses, runs whatever a crafted file names, and lets numpy allocate
whatever shape a file declares. Here, nothing a file says is believed before it is checked against the
bytes the file holds:

1. the whole file is read (it is refused over MAX_FILE_BYTES; a real batch is ~30 MB) and its opcodes are
   scanned first: every length-prefixed argument must fit in the bytes that follow it, a frame in the
   file's rest, and a memo index must not exceed the opcodes seen so far (the unpickler sizes its memo by
   the largest index: one 5-byte opcode could make it fill gigabytes);
2. the unpickler admits only the globals numpy's array pickles name, and none of them reaches numpy:
   `numpy.ndarray` is a marker that cannot be called, `numpy.dtype` accepts integer types only (no object
   dtype, no records), and `_reconstruct`/`_frombuffer` give placeholders that hold shape, dtype and
   payload. An array is built with np.frombuffer over the payload bytes already read, only once its
   declared size (shape x item size) equals the payload's length;
3. 'data' must be uint8 N x 3072 and 'labels' N integers in 0..9.
"""
from __future__ import annotations

import io
import math
import pickle
import pickletools
from pathlib import Path

import numpy as np

MAX_FILE_BYTES = 256 << 20
IMAGE_BYTES = 3 * 32 * 32
CLASSES = 10
_INTEGER_DTYPES = {f"{kind}{size}" for kind in "ui" for size in (1, 2, 4, 8)}
_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}


class _NdarrayMarker:
    """What `numpy.ndarray` resolves to: accepted as _reconstruct's first argument, never constructed."""

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError("refused a numpy.ndarray(...) call: arrays are read from their pickled "
                                     "payload only")


_NDARRAY = _NdarrayMarker()


class _Dtype:
    """numpy.dtype(spec, align, copy) as a pickle rebuilds it, then its __setstate__ (byte order)."""

    def __init__(self, spec: str):
        self.spec, self.order = spec, "|"

    def __setstate__(self, state):
        # (3, byte order, subarray, names, fields, item size, alignment, flags): a plain scalar type has no
        # subarray, names or fields
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[1] in ("<", ">", "|", "=")
                and state[2:5] == (None, None, None)):
            raise pickle.UnpicklingError(f"refused dtype {self.spec!r} with state {str(state)[:80]}")
        self.order = state[1]

    def numpy(self) -> np.dtype:
        dtype = np.dtype(self.spec)
        return dtype.newbyteorder(self.order) if self.order in "<>" else dtype


class _Array:
    """An array a pickle declares: built only after its declared size was checked against its payload."""

    def __init__(self):
        self.array = None

    def __setstate__(self, state):
        # ndarray's pickled state: (version 1, shape, dtype, Fortran order, payload); very old pickles omit
        # the version
        if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
            state = state[1:]
        if not (isinstance(state, tuple) and len(state) == 4):
            raise pickle.UnpicklingError("an array's state is not (shape, dtype, order, payload)")
        shape, dtype, fortran, payload = state
        self.array = _build(payload, dtype, shape, "F" if fortran else "C")


def _build(payload, dtype, shape, order: str) -> np.ndarray:
    if not isinstance(dtype, _Dtype):
        raise pickle.UnpicklingError(f"an array's dtype is a {type(dtype).__name__}, not a numpy dtype")
    if not (isinstance(shape, tuple) and len(shape) <= 2 and all(type(n) is int and n >= 0 for n in shape)):
        raise pickle.UnpicklingError(f"refused array shape {str(shape)[:80]}: expected at most 2 sizes >= 0")
    if isinstance(payload, str):  # Python 2's str, read as latin1: numpy encodes it back the same way
        payload = payload.encode("latin1")
    if not isinstance(payload, (bytes, bytearray)):
        raise pickle.UnpicklingError(f"an array's payload is a {type(payload).__name__}, not bytes")
    numpy_dtype = dtype.numpy()
    declared = math.prod(shape) * numpy_dtype.itemsize
    if declared != len(payload):
        raise pickle.UnpicklingError(f"an array declared as {shape} {numpy_dtype} ({declared} bytes) holds "
                                     f"{len(payload)} bytes")
    return np.frombuffer(payload, numpy_dtype).reshape(shape, order=order)


def _dtype(spec, align=False, copy=True) -> _Dtype:
    # a function, not the class: pickle's NEWOBJ, which skips __init__, takes classes only
    spec = spec.decode("latin1") if isinstance(spec, bytes) else spec
    if spec not in _INTEGER_DTYPES:
        raise pickle.UnpicklingError(f"refused dtype {str(spec)[:20]!r}: a CIFAR-10 batch holds integer arrays only")
    return _Dtype(spec)


def _reconstruct(subtype, shape, typecode):
    # numpy.core.multiarray._reconstruct(ndarray, (0,), b'b'): an empty array that __setstate__ then fills
    if subtype is not _NDARRAY:
        raise pickle.UnpicklingError("_reconstruct of something other than numpy.ndarray")
    return _Array()


def _frombuffer(payload, dtype, shape, order):
    # protocol 5's form: numpy.core.numeric._frombuffer(buffer, dtype, shape, order)
    if order not in ("C", "F"):
        raise pickle.UnpicklingError(f"refused array order {str(order)[:20]!r}")
    placeholder = _Array()
    placeholder.array = _build(payload, dtype, shape, order)
    return placeholder


def _latin1_bytes(text, encoding="latin1"):
    # protocol-2 pickles written by Python 3 spell bytes as _codecs.encode(str, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not allowed")
    return text.encode("latin1")


_ALLOWED = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1_bytes,
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _reconstruct for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _frombuffer for core in ("core", "_core")},
}


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR-10 batch holds: dicts, lists, tuples, bytes, str, ints and integer arrays.
    Any other global (os.system, builtins.eval, ...) is refused before it can be called."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refused {module}.{name}: a CIFAR-10 batch holds only dicts, lists, "
                                         "bytes, str, ints and numpy arrays")
        return _ALLOWED[(module, name)]


def _check_opcodes(blob: bytes) -> None:
    """Every size the opcodes declare fits in the file (pickletools reads each argument from a BytesIO,
    which never allocates more than the bytes that remain)."""
    try:
        for count, (op, arg, pos) in enumerate(pickletools.genops(io.BytesIO(blob))):
            if op.name in _MEMO_PUTS and arg > count:
                raise pickle.UnpicklingError(f"memo index {arg} at byte {pos} exceeds the {count} opcodes before it")
            if op.name == "FRAME" and arg > len(blob) - pos:
                raise pickle.UnpicklingError(f"a frame of {arg} bytes at byte {pos} overruns the file "
                                             f"({len(blob)} bytes)")
    except ValueError as exc:  # pickletools: an argument that overruns the file, an unknown opcode
        raise pickle.UnpicklingError(str(exc)) from None


def load(path: Path) -> dict:
    """The batch's dict, its arrays as numpy arrays (read-only views of the file's bytes)."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise pickle.UnpicklingError(f"{size} bytes; a CIFAR-10 batch is ~30 MB (at most {MAX_FILE_BYTES} read)")
    blob = path.read_bytes()
    _check_opcodes(blob)
    entry = _CifarUnpickler(io.BytesIO(blob), encoding="latin1").load()  # py2 pickles, as torchvision reads them
    if not isinstance(entry, dict):
        raise pickle.UnpicklingError(f"a {type(entry).__name__}, not a dict")
    return {k: v.array if isinstance(v, _Array) else v for k, v in entry.items()}


def images_and_labels(entry: dict) -> tuple[np.ndarray, list[int]]:
    """(N x 3 x 32 x 32 uint8 planes, N labels in 0..9) of a loaded batch."""
    data, labels = entry.get("data"), entry.get("labels")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == IMAGE_BYTES):
        what = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"'data' is {what}, not N x {IMAGE_BYTES} uint8")
    if isinstance(labels, np.ndarray) and labels.ndim == 1:
        labels = labels.tolist()
    if not (isinstance(labels, list) and all(type(v) is int for v in labels)):
        raise ValueError(f"'labels' is a {type(labels).__name__}, not a list of ints")
    if len(labels) != len(data):
        raise ValueError(f"{len(data)} images but {len(labels)} labels")
    if labels and not 0 <= min(labels) <= max(labels) < CLASSES:
        raise ValueError(f"labels span {min(labels)}..{max(labels)}, not 0..{CLASSES - 1}")
    return data.reshape(-1, 3, 32, 32), labels
