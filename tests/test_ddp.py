"""Multi-process training: examples/train_ddp.py under torchrun, 2 processes
(gloo on the CPU unless the machine has a GPU per rank), through sgattn's ops; its gradients equal one process's on the same global
batch. Where each rank goes (GPU per rank or CPU fallback) is checked apart."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn", reason="the example's data are scikit-learn's digits (pip install 'sgattn[viz]')")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available in this torch build", allow_module_level=True)

from sgattn import demo  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STEPS, BATCH, LR, SEED = 3, 8, 0.05, 0


def test_ddp_two_processes_match_one_process(tmp_path):
    dump = tmp_path / "grads.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "examples" / "train_ddp.py"), "--steps", str(STEPS), "--batch", str(BATCH),
                        "--optimizer", "sgd", "--lr", str(LR), "--seed", str(SEED), "--float64", "--dump-grads", str(dump)],
                       capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"step {STEPS}: loss" in r.stdout
    ddp_grads = torch.load(dump)
    assert len(ddp_grads) == STEPS

    # one process, the same initial weights, global batches and optimizer; float64 on both sides, as
    # fp32 rounding differences (batch split, reduction order) can reorder near-tied importance values
    torch.manual_seed(SEED)
    model = demo.tiny_sgformer().double()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    batches = iter(_global_batches())
    for step in range(STEPS):
        x, y = next(batches)
        loss = F.cross_entropy(model(x.double()), y)
        opt.zero_grad()
        loss.backward()
        for name, p in model.named_parameters():
            # DDP's average of two half-batch means vs one full-batch mean: equal up to summation order
            torch.testing.assert_close(ddp_grads[step][name], p.grad, rtol=1e-7, atol=1e-12,
                                       msg=lambda m, n=name, s=step: f"step {s + 1} {n}: {m}")
        opt.step()


def _example():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import train_ddp
    finally:
        sys.path.pop(0)
    return train_ddp


def _global_batches():
    return _example().global_batches(BATCH, SEED)


def test_ddp_placement_needs_a_gpu_per_rank():
    place = _example().placement
    cpu = ("gloo", torch.device("cpu"))
    assert place(1, 2, 1) == cpu  # a one-GPU machine: rank 1 must not ask for cuda:1
    assert place(0, 1, 0) == cpu
    assert place(1, 2, 2) == ("nccl", torch.device("cuda:1"))
    assert place(1, 2, 8, "cpu") == cpu
    with pytest.raises(SystemExit, match="a GPU per rank"):
        place(0, 2, 1, "cuda")
