"""The Torch-Pruning baseline: DepGraph structured pruning of a timm ViT down to a MACs budget.

Whole attention heads and MLP hidden neurons are ranked globally by torch-pruning's group Taylor importance
(|w * dL/dw| over each coupled group, gradients from the calibration batches, recomputed before every step)
and removed a little at a time until the model, counted with `FlopCounterMode`, fits the budget.
"""
from __future__ import annotations

import copy
import warnings
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

from uvclab.vit import macs as budget_lib
from uvclab.errors import UvclabError
from uvclab.vit.models import input_shape as _image_shape
from uvclab.vit.structure import BlockStructure, Structure

# the linear schedule runs up to this ratio (of heads and of neurons); an MLP is no longer ranked once it has lost
# this much of its width, and torch-pruning never removes a block's last head or neuron
MAX_PRUNING_RATIO = 0.9


def _tp():
    try:
        import torch_pruning
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise UvclabError("The Torch-Pruning baseline needs the torch-pruning package: pip install torch-pruning "
                          "(or pip install 'uvclab[baselines]').") from e
    return torch_pruning


def _accumulate_grads(model: torch.nn.Module, batches: list, loss_fn: Callable) -> None:
    model.zero_grad(set_to_none=False)
    device = next(model.parameters()).device
    for x, y in batches:
        loss_fn(model(x.to(device)), y.to(device)).backward()


def _sync_timm(model: torch.nn.Module, pruner) -> None:
    """Make timm's Attention agree with the pruned qkv widths, and the pruner's head counts too (it decrements
    them even for a head group it then refuses to prune)."""
    for blk in model.blocks:
        a = blk.attn
        a.num_heads = a.qkv.out_features // (3 * a.head_dim)
        a.attn_dim = a.num_heads * a.head_dim
        pruner.num_heads[a.qkv] = pruner.out_channel_groups[a.qkv] = a.num_heads
    model.embed_dim = model.num_features = _embed_width(model)


def _embed_width(model: torch.nn.Module) -> int:
    """Width of the residual stream, read from the stem's output layer (patch conv, or T2T-ViT's projection)."""
    pe = model.patch_embed
    return pe.proj.out_channels if hasattr(pe, "proj") else pe.project.out_features


def torch_pruning_to_budget(model: torch.nn.Module, macs_ratio: float, batches: Iterable, *,
                            input_shape: Optional[tuple[int, ...]] = None, iterative_steps: int = 40,
                            prune_embed: bool = False, loss_fn: Optional[Callable] = None,
                            isomorphic: bool = False) -> torch.nn.Module:
    """A pruned deep copy of the timm `VisionTransformer` `model` with at most `macs_ratio` of its MACs.

    Heads and MLP neurons are pruned together by torch-pruning (global ranking, Taylor importance from
    `loss_fn(model(x), y)` summed over the (x, y) `batches`, cross-entropy by default) on a linear schedule of
    `iterative_steps` steps up to MAX_PRUNING_RATIO, stopping at the first step within the budget. With
    `isomorphic=True` groups are ranked only against groups of the same graph structure (Isomorphic Pruning,
    Fang et al., ECCV 2024: heads against heads, MLP neurons against neurons). The embedding
    width (residual stream) is kept unless `prune_embed`. The result carries
    `uvclab_tp = {"macs", "dense_macs", "macs_ratio", "steps"}` (MACs per image); all its parameters require grad."""
    macs_ratio = budget_lib.check_budget(macs_ratio)
    tp = _tp()
    batches = list(batches)
    if not batches:
        raise UvclabError("torch_pruning_to_budget needs at least one (images, labels) calibration batch.")
    if not (hasattr(model, "blocks") and hasattr(model, "patch_embed") and hasattr(model, "head")):
        raise UvclabError(f"torch_pruning_to_budget expects a timm VisionTransformer, got {type(model).__name__}.")
    loss_fn = loss_fn or F.cross_entropy
    shape = tuple(input_shape) if input_shape is not None else (1, *_image_shape(model))
    image = shape[1:]  # MACs are per image (FlopCounterMode with explicit attention, as for every benchmark model)

    pruned = copy.deepcopy(model)
    was_training = pruned.training
    pruned.eval().requires_grad_(True)
    dense = budget_lib.flop_counter_macs(pruned, image)
    budget = macs_ratio * dense

    # ignoring patch_embed drops every group that would prune its output channels: that group is the residual
    # stream (norms, cls/pos tokens, qkv/fc1 inputs, proj/fc2 outputs, head input), so only heads and neurons remain
    ignored = [pruned.head] + ([] if prune_embed else [pruned.patch_embed])
    importance_cls = getattr(tp.importance, "GroupTaylorImportance", None) or tp.importance.TaylorImportance
    pruner_cls = getattr(tp.pruner, "BasePruner", None) or tp.pruner.MetaPruner
    example = torch.zeros(shape, device=next(pruned.parameters()).device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")  # cls/pos: last dim is right
        pruner = pruner_cls(
            pruned, example, importance=importance_cls(), global_pruning=True, isomorphic=isomorphic,
            pruning_ratio=MAX_PRUNING_RATIO, head_pruning_ratio=MAX_PRUNING_RATIO,
            max_pruning_ratio=MAX_PRUNING_RATIO, iterative_steps=iterative_steps, ignored_layers=ignored,
            num_heads={blk.attn.qkv: blk.attn.num_heads for blk in pruned.blocks},
            prune_num_heads=True, prune_head_dims=False)

    attns = [blk.attn for blk in pruned.blocks]
    head_schedule = list(pruner.per_step_head_pruning_ratio)
    macs, steps = dense, 0
    while macs > budget:
        if steps >= iterative_steps:
            raise UvclabError(
                f"Torch-Pruning stopped at {macs / dense:.3f} of the dense MACs after {steps} steps and cannot reach "
                f"macs_ratio={macs_ratio} (each head/neuron group keeps at least {1 - MAX_PRUNING_RATIO:.0%} of its "
                "width). Use a larger budget" + ("." if prune_embed else " or prune_embed=True."))
        _accumulate_grads(pruned, batches, loss_fn)
        # torch-pruning 1.6 raises UnboundLocalError (head_thres) when global head pruning is on for a step whose
        # head target rounds to no removal: turn head pruning off for such steps. `ranked`: the heads it would rank
        k, r = pruner.current_step + 1, head_schedule[pruner.current_step + 1]
        ranked = sum(a.num_heads for a in attns
                     if a.qkv.out_features >= (1 - MAX_PRUNING_RATIO) * pruner.layer_init_out_ch[a.qkv])
        pruner.per_step_head_pruning_ratio[k] = r if ranked > int(pruner.initial_total_heads * (1 - r)) else 0.0
        pruner.step()  # a block's head group that would lose every head is skipped whole by torch-pruning
        _sync_timm(pruned, pruner)
        steps += 1
        macs = budget_lib.flop_counter_macs(pruned, image)

    pruned.zero_grad(set_to_none=True)
    pruned.train(was_training)
    pruned.uvclab_tp = {"macs": int(macs), "dense_macs": int(dense), "macs_ratio": macs / dense, "steps": steps}
    return pruned


def kept_structure(dense: torch.nn.Module, pruned: torch.nn.Module) -> Structure:
    """The uvclab Structure of a Torch-Pruning result: which heads and MLP neurons of `dense` survive, found by
    their exact weight rows (torch-pruning slices weights, it never rewrites them). The embedding width must be
    unchanged. Exporting `dense` with this structure gives the same model as `pruned`."""
    s = budget_lib.vit_shape(dense)
    H, Dh, D = s.num_heads, s.head_dim, s.embed_dim
    if _embed_width(pruned) != D:
        raise UvclabError("The Torch-Pruning model changed the embedding width; only head and neuron pruning "
                          "(prune_embed=False) maps onto a uvclab Structure.")

    def index_of(rows: torch.Tensor) -> dict[bytes, int]:
        return {r.numpy().tobytes(): i for i, r in enumerate(rows.detach().float().cpu())}

    blocks = []
    for bd, bp in zip(dense.blocks, pruned.blocks):
        q_rows = index_of(bd.attn.qkv.weight[:H * Dh])
        pq = bp.attn.qkv.weight[:bp.attn.qkv.out_features // 3].detach().float().cpu()
        heads = sorted({q_rows[pq[i].numpy().tobytes()] // Dh for i in range(0, pq.shape[0], Dh)})
        fc1 = index_of(bd.mlp.fc1.weight)
        mlp = sorted(fc1[r.numpy().tobytes()] for r in bp.mlp.fc1.weight.detach().float().cpu())
        full = list(range(Dh))
        blocks.append(BlockStructure(heads, [full[:] for _ in heads], [full[:] for _ in heads], mlp))
    return Structure(D, H, Dh, s.mlp_hidden, blocks)


def torch_pruning_structure(model: torch.nn.Module, macs_ratio: float, batches: Iterable, **kwargs) -> Structure:
    """`torch_pruning_to_budget` expressed as a uvclab Structure of `model` (see `kept_structure`)."""
    return kept_structure(model, torch_pruning_to_budget(model, macs_ratio, batches, **kwargs))
