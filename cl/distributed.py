"""Data parallelism under `torchrun`: the process group and the few collectives the engine needs.

`torchrun --nproc_per_node=N -m cl ...` starts N copies of the run. Every rank holds
the whole stream, draws the same global batch (same seed) and trains on its
contiguous share of it (`shard`); gradients, float buffers (batch-norm statistics)
and the loss are averaged across ranks in one flat all-reduce per optimizer step
(`sync_step`). All ranks therefore hold bit-identical parameters and run every
strategy hook identically, so masks (DST), EMAs (LCIA), merges (MOS) and frozen
halves (HFT) need no distributed code. Replay buffers stay identical on every rank:
each rank adds the gathered global batch (`gather`) and draws the same global replay
batch, keeping its share. Evaluation is sharded by batch and its counts summed
(`all_sum`). Rank 0 alone writes files.

We average gradients ourselves instead of wrapping the model in
`DistributedDataParallel`: strategies call submodules directly (heads, adapters,
`model.features`), run several forwards per step (DER++) and grow heads between
experiences, and DDP's reducer only sees a single root `forward` per backward. The
arithmetic is DDP's (mean of the ranks' gradients); what is given up is overlapping
communication with the backward pass.

With one process every function here is the identity, so single-process runs take
exactly the code path they always did.
"""
from __future__ import annotations

import hashlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor


def launched() -> bool:
    """Whether torchrun (or another launcher setting WORLD_SIZE > 1) started this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the process group torchrun describes (env://): NCCL for CUDA tensors, gloo for CPU ones."""
    if not launched() or dist.is_initialized():
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=int(os.environ.get("CL_DIST_TIMEOUT_MIN", "30"))))


def shutdown(finished: bool) -> None:
    """Leave the process group. After a finished run every rank waits for the others first:
    rank 0 still writes results and plots when the others are done, and a gloo group torn
    down on one rank while a peer is still connected aborts that rank's process
    ("terminate called without an active exception") although its run succeeded. After a
    failure there is no waiting (the other ranks may never arrive)."""
    if not dist.is_initialized():
        return
    if finished and active():
        dist.barrier()
    dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """A CUDA device becomes this process's GPU (`cuda:LOCAL_RANK`)."""
    if device.type == "cuda" and active():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def bounds(n: int, r: int | None = None, w: int | None = None) -> tuple[int, int]:
    """[lo, hi) of rank r's contiguous share of n items; the first n % w ranks get one more."""
    r = rank() if r is None else r
    w = world() if w is None else w
    base, extra = divmod(n, w)
    lo = r * base + min(r, extra)
    return lo, lo + base + (1 if r < extra else 0)


def shard(items):
    """This rank's contiguous share of a tensor or list (everything with one process)."""
    if not active():
        return items
    lo, hi = bounds(len(items))
    return items[lo:hi]


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks of a few numbers (evaluation counts)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)  # init() picked a backend for this device
    dist.all_reduce(t)
    return t.tolist()


def gather(t: Tensor) -> Tensor:
    """The concatenation, in rank order, of every rank's `t` (sizes may differ along dim 0)."""
    if not active():
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    top = max(sizes)
    padded = torch.zeros((top, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not active():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def sync_step(params: list[Tensor], buffers: list[Tensor], loss: float, stop: bool) -> tuple[float, bool]:
    """One flat all-reduce per optimizer step: the gradients of `params` and the loss are
    averaged over ranks, the float `buffers` (batch-norm statistics) become rank 0's (as
    DDP's `broadcast_buffers`), and `stop` is true if any rank was asked to stop.

    A parameter that got no gradient on some rank (a per-task module no sample of its
    share used) counts as zero there; one that got none on any rank keeps `grad=None`,
    so the optimizer skips it as it would in one process. The identity with one process."""
    if not active():
        return loss, stop
    floats = [b for b in buffers if b.is_floating_point()]
    device = params[0].device if params else (floats[0].device if floats else torch.device("cpu"))
    main = rank() == 0
    has = [p.grad is not None for p in params]
    flat = torch.cat([(p.grad if h else torch.zeros_like(p)).detach().reshape(-1).float() for p, h in zip(params, has)]
                     + [(b if main else torch.zeros_like(b)).detach().reshape(-1).float() for b in floats]
                     + [torch.tensor(has + [loss, float(stop)], dtype=torch.float32, device=device)])
    dist.all_reduce(flat)
    tail = flat[-(len(params) + 2):].tolist()
    offset = 0
    for p, anywhere in zip(params, tail[: len(params)]):
        n = p.numel()
        if anywhere:
            avg = (flat[offset: offset + n] / world()).view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = avg
            else:
                p.grad.copy_(avg)
        offset += n
    for b in floats:
        n = b.numel()
        b.copy_(flat[offset: offset + n].view_as(b))
        offset += n
    return tail[-2] / world(), tail[-1] > 0


def check_in_sync(model: torch.nn.Module, where: str) -> None:
    """Ranks must hold identical parameters (every hook runs identically on every rank);
    raise if a strategy made them diverge."""
    if not active():
        return
    h = hashlib.sha1()
    for name, p in sorted(model.state_dict().items()):
        if isinstance(p, Tensor):
            h.update(name.encode())
            h.update(p.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    digests = gather_objects(h.hexdigest())
    if len(set(digests)) > 1:
        from cl.errors import UserError

        raise UserError(
            f"The ranks' models differ {where} (a strategy hook used randomness or data that is not the same on "
            "every rank); seed its generators from the run seed, or run it in one process."
        )
