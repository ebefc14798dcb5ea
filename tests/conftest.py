"""Shared fixtures: the device axis of the kernel tests."""

import pytest
import torch


@pytest.fixture(
    params=[
        "cpu",
        pytest.param("cuda", marks=pytest.mark.cuda),
    ]
)
def device(request):
    """``"cpu"``, and ``"cuda"`` when a GPU is visible (skipped otherwise)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device visible")
    return request.param
