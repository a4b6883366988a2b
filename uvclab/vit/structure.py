"""`Structure`: what a compressed ViT keeps. The one output of UVC's search, the input of export.

Per block: whether the block, its attention branch and its MLP branch run; the kept heads; for each kept
head its kept query/key dims and value dims (UVC's `r` prunes only the value side); the kept MLP neurons.
Indices refer to the dense model. JSON round trip, validation against a model, masks for a gated model,
and a per-layer pandas summary (the method doc's recommendation 9, saved explicitly); `masked` applies a
structure's masks to a gated model for the length of a `with` block.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch

from uvclab.errors import UvclabError
from uvclab.vit.gated import gate_vit, open_all_gates


@dataclass
class BlockStructure:
    heads: list[int]                 # kept head indices
    qk_dims: list[list[int]]         # per kept head: kept query/key dims (indices in 0..Dh-1)
    v_dims: list[list[int]]          # per kept head: kept value/output dims
    mlp: list[int]                   # kept MLP hidden neurons
    keep: bool = True                # False: the whole block is skipped
    attn: bool = True                # False: the attention branch is skipped
    mlp_branch: bool = True          # False: the MLP branch is skipped

    @property
    def runs_attn(self) -> bool:
        return self.keep and self.attn and len(self.heads) > 0

    @property
    def runs_mlp(self) -> bool:
        return self.keep and self.mlp_branch and len(self.mlp) > 0


@dataclass
class Structure:
    embed_dim: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    blocks: list[BlockStructure] = field(default_factory=list)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def dense(cls, model: torch.nn.Module) -> "Structure":
        """Everything kept: the structure of the uncompressed model."""
        blk0 = model.blocks[0]
        H, Dh, M = blk0.attn.num_heads, blk0.attn.head_dim, blk0.mlp.fc1.out_features
        full = list(range(Dh))
        blocks = [BlockStructure(list(range(H)), [full[:] for _ in range(H)], [full[:] for _ in range(H)],
                                 list(range(M))) for _ in model.blocks]
        return cls(model.embed_dim, H, Dh, M, blocks)

    @property
    def depth(self) -> int:
        return len(self.blocks)

    # ---- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Structure":
        try:
            blocks = [BlockStructure(**b) for b in d["blocks"]]
            s = cls(int(d["embed_dim"]), int(d["num_heads"]), int(d["head_dim"]), int(d["mlp_hidden"]), blocks)
        except (KeyError, TypeError) as e:
            raise UvclabError(f"Not a uvclab structure ({e}). A structure JSON has the keys embed_dim, num_heads, "
                              "head_dim, mlp_hidden and blocks; write one with Structure.save().") from e
        s.check_consistent()
        return s

    def save(self, path: str | Path) -> None:
        from uvclab.io_utils import atomic_write_text
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Structure":
        path = Path(path)
        if not path.is_file():
            raise UvclabError(f"Structure file '{path}' does not exist.")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UvclabError(f"Structure file '{path}' is not valid JSON ({e}); it is corrupt or truncated.") from e
        return cls.from_dict(d)

    # ---- validation ---------------------------------------------------------------------------
    def check_consistent(self) -> None:
        """Indices in range, sorted and unique; every kept head keeps >= 1 q/k dim and >= 1 v dim."""
        def bad(msg: str) -> UvclabError:
            return UvclabError(f"Invalid structure: {msg}.")
        for l, b in enumerate(self.blocks):
            if len(b.qk_dims) != len(b.heads) or len(b.v_dims) != len(b.heads):
                raise bad(f"block {l} lists {len(b.heads)} heads but {len(b.qk_dims)} qk / {len(b.v_dims)} v dim lists")
            for name, idx, n in [("heads", b.heads, self.num_heads), ("mlp", b.mlp, self.mlp_hidden)] + \
                    [(f"qk dims of head {h}", d, self.head_dim) for h, d in zip(b.heads, b.qk_dims)] + \
                    [(f"v dims of head {h}", d, self.head_dim) for h, d in zip(b.heads, b.v_dims)]:
                if sorted(set(idx)) != list(idx) or (idx and (idx[0] < 0 or idx[-1] >= n)):
                    raise bad(f"block {l} {name} must be sorted unique indices in [0, {n})")
            if b.heads and (min(map(len, b.qk_dims)) == 0 or min(map(len, b.v_dims)) == 0):
                raise bad(f"block {l} keeps a head with no q/k or v dims; drop the head instead")

    def validate(self, model: torch.nn.Module) -> None:
        """Raise a clear error if this structure was not made for `model`'s shape."""
        ref = Structure.dense(model)
        mine = (self.depth, self.embed_dim, self.num_heads, self.head_dim, self.mlp_hidden)
        theirs = (ref.depth, ref.embed_dim, ref.num_heads, ref.head_dim, ref.mlp_hidden)
        if mine != theirs:
            names = ("depth", "embed_dim", "num_heads", "head_dim", "mlp_hidden")
            diff = ", ".join(f"{n} {a} vs model {b}" for n, a, b in zip(names, mine, theirs) if a != b)
            raise UvclabError(f"Structure does not fit the model ({diff}). Use the structure produced for this "
                              "architecture, or create the model with matching arguments.")
        self.check_consistent()

    # ---- derived views ------------------------------------------------------------------------
    def masks(self, device=None, dtype=torch.float32) -> list[dict[str, torch.Tensor]]:
        """Per block 0/1 gate tensors: head (H,), qk (H, Dh), v (H, Dh), neuron (M,), block/attn/mlp ()."""
        out = []
        for b in self.blocks:
            head = torch.zeros(self.num_heads, dtype=dtype)
            qk = torch.zeros(self.num_heads, self.head_dim, dtype=dtype)
            v = torch.zeros(self.num_heads, self.head_dim, dtype=dtype)
            for h, q_idx, v_idx in zip(b.heads, b.qk_dims, b.v_dims):
                head[h] = 1
                qk[h, q_idx] = 1
                v[h, v_idx] = 1
            neuron = torch.zeros(self.mlp_hidden, dtype=dtype)
            neuron[b.mlp] = 1
            flags = {k: torch.tensor(float(x), dtype=dtype) for k, x in
                     (("block", b.keep), ("attn", b.runs_attn), ("mlp_branch", b.runs_mlp))}
            out.append({k: t.to(device) for k, t in dict(head=head, qk=qk, v=v, neuron=neuron, **flags).items()})
        return out

    def summary(self) -> pd.DataFrame:
        """One row per block: kept heads, mean kept q/k and v dims per kept head, kept neurons, skips."""
        rows = []
        for l, b in enumerate(self.blocks):
            rows.append(dict(block=l, keep=b.keep, attn=b.runs_attn, mlp_branch=b.runs_mlp,
                             heads=len(b.heads) if b.runs_attn else 0,
                             qk_dims=sum(map(len, b.qk_dims)) / max(len(b.heads), 1) if b.runs_attn else 0.0,
                             v_dims=sum(map(len, b.v_dims)) / max(len(b.heads), 1) if b.runs_attn else 0.0,
                             mlp=len(b.mlp) if b.runs_mlp else 0))
        return pd.DataFrame(rows).set_index("block")


def apply_structure(model: torch.nn.Module, structure: Structure) -> torch.nn.Module:
    """Set a gated model's gates to the structure's hard 0/1 masks (the 'masked gated model')."""
    structure.validate(model)
    gate_vit(model)
    p = next(model.parameters())
    for blk, m in zip(model.blocks, structure.masks(device=p.device, dtype=p.dtype)):
        blk.attn.head_gate, blk.attn.qk_gate, blk.attn.v_gate = m["head"], m["qk"], m["v"]
        blk.mlp.neuron_gate = m["neuron"]
        blk.block_gate, blk.attn_gate, blk.mlp_gate = m["block"], m["attn"], m["mlp_branch"]
    return model


@contextmanager
def masked(model: torch.nn.Module, structure: Structure):
    """Temporarily apply a structure's hard masks to a gated model (all gates open afterwards)."""
    apply_structure(model, structure)
    try:
        yield model
    finally:
        open_all_gates(model)
