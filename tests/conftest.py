import math
import os

import torch

# Triton's interpreter must be chosen before any @triton.jit function is
# defined, i.e. before sgattn's Triton kernels are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poison(monkeypatch):
    """A context in which every float tensor from torch.empty is NaN."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(math.nan)
        return t

    class Poisoned:
        def __enter__(self):
            monkeypatch.setattr(torch, "empty", empty)

        def __exit__(self, *exc):
            monkeypatch.setattr(torch, "empty", real_empty)
    return Poisoned
