"""Multi-process SG-Former training with torch.distributed (DistributedDataParallel).

    torchrun --nproc_per_node 2 examples/train_ddp.py --steps 100           # CPU: gloo
    torchrun --nproc_per_node 8 examples/train_ddp.py --steps 1000 --amp    # GPUs: nccl, bf16 autocast

Trains the small SG-Former of ``sgattn.demo`` (every block kind, sgattn's
attention ops) on the demo's task: handwritten digits (scikit-learn's bundled
set) pasted at random places on cluttered canvases. Every rank draws the same
global batch from the same seed and keeps its own slice, so a run is
reproducible and its gradients equal those of one process on the global batch
(DDP averages the ranks' gradients). ``--dump-grads FILE`` saves rank 0's
gradients after every step (the CI test compares them with one process).

Works on CPU (gloo) and GPU (nccl: one device per rank via LOCAL_RANK) when
the node has a GPU for every local rank; with fewer GPUs than ranks it falls
back to gloo on the CPU (``--device`` forces one).
Replace ``model`` and ``batches`` with your own (e.g. ``sgformer_s`` and a
DistributedSampler over ImageNet); nothing else changes.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from sgattn import demo


def global_batches(batch, seed):
    """The same global batches on every rank."""
    images, labels = demo._digits()
    gen = torch.Generator().manual_seed(seed)
    while True:
        x, y, _ = demo.make_batch(images, labels, batch, gen)
        yield x, y


def placement(local_rank, local_world, gpus, want="auto"):
    """(process-group backend, device) of one rank: nccl with GPU
    ``local_rank`` when the node has at least one GPU per local rank, gloo on
    the CPU otherwise (or when ``want`` is "cpu")."""
    if want == "cuda" and gpus < local_world:
        raise SystemExit(f"--device cuda needs a GPU per rank: {local_world} ranks on this node, {gpus} GPUs")
    if want != "cpu" and gpus >= local_world:
        return "nccl", torch.device(f"cuda:{local_rank}")
    return "gloo", torch.device("cpu")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=32, help="global batch (split over the ranks)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--float64", action="store_true",
                   help="train in float64 (exact comparisons: SG-Former's importance sort reorders near-ties "
                        "under fp32 rounding differences)")
    p.add_argument("--dump-grads", default=None, metavar="FILE", help="rank 0 saves every step's gradients")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: one GPU per rank when there are enough, else the CPU")
    args = p.parse_args(argv)

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    backend, device = placement(int(os.environ.get("LOCAL_RANK", 0)), local_world, gpus, args.device)
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0 and backend == "gloo" and gpus and args.device == "auto":
        print(f"{local_world} ranks on this node, {gpus} GPU(s): training on the CPU (gloo)", flush=True)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be divisible by the number of processes {world}")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(args.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    dtype = torch.float64 if args.float64 else torch.float32
    model = DDP(demo.tiny_sgformer().to(device, dtype), device_ids=[device.index] if cuda else None)
    opt = (torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05) if args.optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=args.lr))
    per_rank = args.batch // world
    dumped = []
    for step, (x, y) in zip(range(1, args.steps + 1), global_batches(args.batch, args.seed)):
        x = x[rank * per_rank:(rank + 1) * per_rank].to(device, dtype)
        y = y[rank * per_rank:(rank + 1) * per_rank].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces (averages) the gradients here
        if args.dump_grads and rank == 0:
            dumped.append({n: p.grad.detach().cpu().clone() for n, p in model.module.named_parameters()})
        opt.step()
        if rank == 0 and (step % max(1, args.steps // 10) == 0 or step == args.steps):
            avg = loss.detach().clone()
            dist.all_reduce(avg)
            print(f"step {step}: loss {avg.item() / world:.4f}", flush=True)
        elif step % max(1, args.steps // 10) == 0 or step == args.steps:
            avg = loss.detach().clone()
            dist.all_reduce(avg)
    if args.dump_grads and rank == 0:
        torch.save(dumped, args.dump_grads)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
