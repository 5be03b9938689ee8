"""Test setup: run Triton kernels under the interpreter when there is no GPU, and keep the tuner's
cache in a private folder.

TRITON_INTERPRET must be set before anything imports triton, so this happens
at conftest import, ahead of every test module. The tuning cache goes to a fresh
temporary folder for the session: tests never read or write the user's cache.
"""
import os
import shutil
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
_TUNING_CACHE = tempfile.mkdtemp(prefix="resnet-fast-test-cache.")
os.environ["RESNET_FAST_CACHE_DIR"] = _TUNING_CACHE
os.environ.pop("RESNET_FAST_TUNE_TARGET", None)  # tests that force a target set it themselves

import pytest  # noqa: E402

torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_TUNING_CACHE, ignore_errors=True)
