"""torchrun ranks for every layer: who this process is, how many there are, and "rank 0 decides".

Outside torchrun (no process group) there is one rank, 0, and every helper is the identity.
"""
from __future__ import annotations

import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def from_rank0(obj):
    """rank 0's `obj` on every rank (itself outside torchrun): decisions one rank takes for all (the other
    ranks pass anything, e.g. None, and skip computing it)."""
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
