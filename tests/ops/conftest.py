"""Kernel tests prove that their Triton kernel ran: on a GPU the tuner may find the torch path faster
for a tiny test shape, so these tests run the best validated Triton candidate instead."""
import pytest

from resnet_fast.ops import dispatch


@pytest.fixture(autouse=True)
def best_triton_candidate():
    if not dispatch.triton_status()[0]:
        yield
        return
    from resnet_fast.ops.triton import tuner
    with tuner.triton_only():
        yield
