"""Every backend present against the float64 reference, over one table of cases
(``sgattn.testing.CASES``: odd, tile-edge and plan-edge sizes, head dims,
layouts, global and window attention, padded windows and windows larger than
the grid, numerically hard values, hybrid-scale and self-guided compositions,
the sgattn.nn modules, aggregation), each in its dtypes, forward (outputs and
importance) and backward, judged by the rule of ``sgattn.testing`` (``sgattn
check`` runs a subset of the same rows through it).

The GPU backends run where a GPU is (skipped with the reason otherwise), the
Triton one under the interpreter on the CPU. Every float tensor allocated
through torch.empty while a backend runs is poisoned with NaN, so an element a
kernel forgets to write fails. The reference backend is held to float64
rounded to each dtype.
"""
import pytest
import torch

import sgattn
from sgattn.backends import get_backend
from sgattn.testing import CASES, Skipped, compare
from conftest import DEVICE

BACKENDS = list(sgattn.available_backends())
ROWS = [pytest.param(case, dtype, id=f"{case.name}-{str(dtype)[6:]}") for case in CASES for dtype in case.dtypes]


def _device(backend):
    return "cpu" if backend == "cpu" else ("cuda" if backend == "cuda" else DEVICE)


def check_row(backend, case, dtype, poison):
    """One row on one backend (shared with tests/test_fuzz.py)."""
    why = sgattn.available_backends()[backend]
    if why is not None:
        pytest.skip(f"{backend}: {why}")
    try:
        verdicts = compare(case, backend, dtype, _device(backend), around=poison)
    except Skipped as exc:
        pytest.skip(f"{backend}: {exc}")
    assert verdicts
    bad = [str(v) for v in verdicts if not v.ok]
    assert not bad, f"{backend} {case.name} {dtype}:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("case,dtype", ROWS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_agrees_with_float64(backend, case, dtype, poison):
    check_row(backend, case, dtype, poison)


@pytest.mark.parametrize("fault", ["output", "gradient", "unwritten"])
def test_the_runner_rejects_a_wrong_backend(fault, monkeypatch, poison):
    """A backend off by a little more than the bound, one with a wrong gradient,
    and one that leaves an element of its output unwritten all fail."""
    cpu = get_backend("cpu")
    if sgattn.available_backends()["cpu"] is not None:
        pytest.skip("the cpu backend stands in for the wrong one")
    real = type(cpu).attention

    def attention(self, q, k, v, **options):
        out, imp = real(self, q, k, v, **options)
        if fault == "output":
            out = out + 2 ** -14 * out.detach().abs().max()
        elif fault == "gradient":
            out = out + (q - q.detach())[..., :1] * 1e-3  # dq gains 1e-3 * dO[..., :1]
        else:
            # rows from a poisoned allocation (their gradients are lost too)
            out = torch.cat([out[..., :1, :], torch.empty(out[..., 1:, :].shape, dtype=out.dtype)], dim=-2)
        return out, imp
    monkeypatch.setattr(cpu, "attention", attention.__get__(cpu))
    case = next(c for c in CASES if c.name == "g-97x49-d24")
    verdicts = compare(case, "cpu", torch.float32, "cpu", around=poison)
    bad = {v.what: v.note for v in verdicts if not v.ok}
    if fault == "unwritten":
        assert bad["out"] == "not finite", bad
    else:
        assert set(bad) == {"output": {"out"}, "gradient": {"dq"}}[fault], [str(v) for v in verdicts]
