"""The one training loop: used by the UVC search, the fine-tune and teacher training.

`train_one_epoch` runs a loss closure over a loader (clip, optimiser and scheduler step, an `after_step`
hook: UVC's primal-dual update lives there), `evaluate` gives top-1 and restores the model's mode
(`masked_top1`: of a gated model under a structure's masks),
`seeded_loader` shuffles from its own seed (identical after a resume) and shards across torchrun ranks.
Follows timm's `train_one_epoch` / `validate` split; parameter groups come from `timm.optim`.
"""
from __future__ import annotations

import itertools
import math
import os
import random
import time
import uuid
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from timm.optim import param_groups_weight_decay
from tqdm.auto import tqdm

from uvclab.engine.precision import TrainStep
from uvclab.errors import UvclabError
from uvclab.ranks import rank, world
from uvclab.vit.structure import Structure, masked


# ---- distributed ----------------------------------------------------------------------------------

def restart_count() -> int:
    """How often torchrun has restarted the workers (`--max-restarts`); 0 on the first start."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


_job_store = []


def job_store() -> Optional[dist.Store]:
    """The torchrun agent's key-value store: it lives as long as the torchrun job, across restarts (None when
    not launched by torchrun, or when torchrun does not share its store)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if not _job_store:
        _job_store.append(dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                        is_master=False, timeout=dist.constants.default_pg_timeout))
    return _job_store[0]


def init_distributed(device: str) -> None:
    """Join the torchrun process group when launched with WORLD_SIZE > 1, under a key prefix of its own."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if job_store() is None:
        dist.init_process_group(backend)
        return
    rank_, world_ = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.PrefixStore(_attempt_prefix(job_store(), rank_, world_), job_store())
    dist.init_process_group(backend, store=store, rank=rank_, world_size=world_)


def _attempt_prefix(store: dist.Store, rank_: int, world_: int) -> str:
    """A key prefix new for this start of the workers and the same on every rank.

    torchrun's agent store outlives a restart (one store serves the whole job, static and c10d rendezvous)
    while the keys gloo pairs ranks with carry no attempt number: a restarted rank that reaches the pairing
    before its peer reads the dead worker's address ('Gloo connectFullMesh failed ... Connection refused')
    or waits on it. TORCHELASTIC_RESTART_COUNT cannot name the attempt (each machine's agent counts its own),
    so rank 0 draws a token and every other rank takes it once rank 0 has answered its own fresh token
    (a token left by an earlier attempt's rank 0 is never answered)."""
    me = uuid.uuid4().hex
    if rank_ == 0:
        store.set("uvclab/attempt", me)
        for r in range(1, world_):
            store.wait([f"uvclab/{me}/ack{r}"])
            store.set(f"uvclab/{me}/go/{store.get(f'uvclab/{me}/ack{r}').decode()}", "1")
        return f"uvclab/{me}/"
    deadline = time.monotonic() + dist.constants.default_pg_timeout.total_seconds()
    while time.monotonic() < deadline:
        token = store.get("uvclab/attempt").decode()
        store.set(f"uvclab/{token}/ack{rank_}", me)
        if store.check([f"uvclab/{token}/go/{me}"]):
            return f"uvclab/{token}/"
        time.sleep(0.05)
    raise RuntimeError("rank 0 did not start within the process-group timeout")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # timm's Mixup/CutMix and RandAugment draw from numpy's global RNG
    torch.manual_seed(seed)


# ---- data order -----------------------------------------------------------------------------------

def seeded_loader(dataset, batch_size: int, seed: int, shuffle: bool = True, num_workers: int = 0,
                  drop_last: Optional[bool] = None, skip_batches: int = 0,
                  pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """Shuffle order fixed by `seed` alone (a resumed epoch sees the same batches); under torchrun each rank
    gets its shard (DistributedSampler). drop_last defaults to `shuffle` (training drops the ragged batch).
    skip_batches: start after that many batches of the same order (a mid-epoch resume; nothing is loaded)."""
    drop_last = shuffle if drop_last is None else drop_last
    if world() > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        # a generator of its own: without one the loader draws its base seed from the global RNG (the Gumbel
        # noise's), at a place in the random stream a mid-epoch resume would not reproduce
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=SkipSampler(
            sampler, skip_batches * batch_size), num_workers=num_workers, drop_last=drop_last,
            generator=torch.Generator().manual_seed(seed), pin_memory=pin_memory)
    g = torch.Generator().manual_seed(seed)
    # what DataLoader(shuffle=True, generator=g) builds, so the order is the same with and without a skip
    sampler = torch.utils.data.RandomSampler(dataset, generator=g) if shuffle else \
        torch.utils.data.SequentialSampler(dataset)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=SkipSampler(
        sampler, skip_batches * batch_size), generator=g, num_workers=num_workers, drop_last=drop_last,
        persistent_workers=num_workers > 0, pin_memory=pin_memory)


class SkipSampler(torch.utils.data.Sampler):
    """A sampler's indices after the first `skip` (drawn, not loaded: the same generator calls as in full)."""

    def __init__(self, sampler, skip: int = 0):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def steps_per_epoch(dataset, batch_size: int, cap: Optional[int] = None) -> int:
    """Full batches per rank in one epoch, at most `cap`."""
    n = len(dataset) // (batch_size * world())
    return max(1, min(n, cap or n))


# ---- optimiser ------------------------------------------------------------------------------------

def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """timm/DeiT convention: no weight decay on 1-d parameters (norms, biases) and on pos_embed / tokens."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.01) -> Callable[[int], float]:
    """lr multiplier per step for LambdaLR: linear ramp to 1 over warm-up, then cosine down to `min_ratio`.
    (timm's CosineLRScheduler steps on its own counter; a LambdaLR keeps the schedule in the optimiser's
    checkpointed state, which resume relies on.)"""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return factor


def adamw_with_schedule(model: torch.nn.Module, lr: float, weight_decay: float, total_steps: int,
                        warmup_steps: int):
    """AdamW over timm's parameter groups with a per-step warm-up + cosine LambdaLR."""
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(max(1, total_steps), warmup_steps))
    return opt, sched


# ---- the loop -------------------------------------------------------------------------------------

def train_one_epoch(model: torch.nn.Module, loader, opt, sched, loss_fn: Callable, *, steps: int,
                    desc: str = "train", progress: bool = True, clip_grad: Optional[float] = 1.0,
                    after_step: Optional[Callable[[int, torch.Tensor], Optional[dict]]] = None,
                    on_nonfinite: Optional[Callable[[int, torch.Tensor], None]] = None,
                    log: Optional[Callable[[str], None]] = None, start: int = 0, step_fn=None) -> float:
    """One pass of at most `steps` batches; returns the mean loss (of the steps run here).

    loss_fn(x, y) -> scalar loss (it runs the forward pass: gates, teacher, distillation are the caller's).
    after_step(step, loss) runs after the optimiser and scheduler step and may return values for the
    progress bar. on_nonfinite(step, loss) is called before a non-finite loss is back-propagated (it should
    raise). Without progress bars, `log` gets a line every quarter epoch (background runs).
    start: the steps of this epoch already done (a mid-epoch resume; `loader` starts after them).
    step_fn: a `precision.TrainStep` (autocast forward + loss, scaled backward, clip, step); None: float32."""
    model.train()
    device = next(model.parameters()).device
    step_fn = step_fn or TrainStep(device=device)
    total, n = 0.0, 0
    show = progress and rank() == 0
    bar = tqdm(loader, total=steps, initial=start, desc=desc, leave=False, disable=not show)
    for step, (x, y) in enumerate(bar, start=start):
        if step >= steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = step_fn.loss(loss_fn, x, y)
        if not torch.isfinite(loss):
            if on_nonfinite is not None:
                on_nonfinite(step, loss)
            raise UvclabError(f"Non-finite loss ({loss.item()}) at {desc} step {step}; lower the learning rate.")
        step_fn.update(loss, model, opt, clip_grad)  # zero_grad, backward, clip, optimiser step
        sched.step()  # outside autocast, like after_step (UVC's float32 dual / count updates)
        extra = after_step(step, loss) if after_step is not None else None
        total, n = total + loss.item(), n + 1
        bar.set_postfix(loss=f"{loss.item():.3f}", **(extra or {}))
        if log is not None and not show and (step + 1) % max(1, steps // 4) == 0 and step + 1 < steps:
            log(f"  {desc} step {step + 1}/{steps}  train_loss {total / n:.4f}")
    return total / max(n, 1)


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy (%) on a dataset, in eval mode, on the model's device; the model's mode is restored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for x, y in _eval_loader(dataset, batch_size):
        correct += (model(x.to(device)).argmax(-1).cpu() == y).sum().item()
        total += len(y)
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


def masked_top1(model: torch.nn.Module, structure: Structure, dataset) -> float:
    """Top-1 of a gated model with a structure's hard masks applied (no export, no training)."""
    with masked(model, structure):
        return evaluate(model, dataset)


def _eval_loader(dataset, batch_size: int) -> torch.utils.data.DataLoader:
    """In-order, unsharded batches (every rank evaluates the whole set). Its own generator: a DataLoader
    without one draws its base seed from the global RNG, which would shift the search's Gumbel noise."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                       generator=torch.Generator().manual_seed(0))
