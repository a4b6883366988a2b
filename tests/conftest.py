import random

import pytest
import torch

import uvclab
from uvclab.vit.structure import Structure

torch.set_num_threads(2)


def small_vit(name: str = "deit_small_patch16_224", **kw):
    """A real timm architecture shrunk through kwargs, small enough for fast CPU tests."""
    args = dict(img_size=32, patch_size=8, depth=4, num_classes=10)
    args.update(kw)
    torch.manual_seed(0)
    return uvclab.create_vit(name, **args).eval()


def random_structure(model, seed: int = 0, skip=True) -> Structure:
    rng = random.Random(seed)
    s = Structure.dense(model)
    H, Dh, M = s.num_heads, s.head_dim, s.mlp_hidden
    for b in s.blocks:
        b.heads = sorted(rng.sample(range(H), rng.randint(1, H)))
        b.qk_dims = [sorted(rng.sample(range(Dh), rng.randint(1, Dh))) for _ in b.heads]
        b.v_dims = [sorted(rng.sample(range(Dh), rng.randint(1, Dh))) for _ in b.heads]
        b.mlp = sorted(rng.sample(range(M), rng.randint(1, M)))
    if skip and len(s.blocks) >= 4:
        s.blocks[1].keep = False
        s.blocks[2].attn = False
        s.blocks[3].mlp_branch = False
    return s


@pytest.fixture
def vit():
    return small_vit()
