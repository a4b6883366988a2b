"""torchrun for every layer: who this process is, how many there are, "rank 0 decides" (`from_rank0`), and
the UVC optimiser's tensor collectives. Outside torchrun there is one rank, 0, and every helper is the identity.
"""
from __future__ import annotations

import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def from_rank0(obj):
    """rank 0's `obj` on every rank: decisions one rank takes for all (the others pass e.g. None)."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def same_on_all_ranks(obj) -> bool:
    """Whether every rank holds an equal (picklable) `obj`; True outside torchrun."""
    if world() == 1:
        return True
    objs = [None] * world()
    dist.all_gather_object(objs, obj)
    return all(o == objs[0] for o in objs)


def broadcast_(*tensors) -> None:
    """Every rank holds rank 0's values (in place)."""
    for t in tensors if world() > 1 else ():
        dist.broadcast(t, 0)


def mean_(t):
    """The mean over ranks, in place."""
    if world() > 1:
        dist.all_reduce(t)
        t /= world()
    return t
