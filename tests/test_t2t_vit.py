import argparse
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import uvclab
from uvclab.vit import macs as budget
from uvclab.errors import UvclabError
from uvclab.vit.export import export_model, load_pruned, save_pruned
from uvclab.vit.structure import Structure, apply_structure
from uvclab.vit.t2t_vit import T2TViT, load_official_t2t_checkpoint, sinusoid_table

from conftest import random_structure

# T2T-ViT-14 at 224x224 (official README: Performer stem "4.8G MACs, 21.5M params", the paper's model;
# T2T-ViT_t-14 with the Transformer stem "6.1G, 21.5M"). Params include the fixed pos table (and w, Performer).
T2T14_MACS, T2T14_STEM_MACS, T2T14_PARAMS, T2T14_TRAINABLE = 4_783_468_544, 298_973_696, 21_545_550, 21_465_806
T2TT14_MACS, T2TT14_STEM_MACS, T2TT14_PARAMS, T2TT14_TRAINABLE = 6_088_721_920, 1_604_227_072, 21_541_070, 21_465_422
STEMS = ["performer", "transformer"]


def small_t2t(name="t2t_vit_7", seed=0, **kw):
    """A shrunk T2T-ViT-7; tokens_type="transformer" gives the Transformer stem."""
    args = dict(img_size=32, depth=4, num_classes=10)
    args.update(kw)
    torch.manual_seed(seed)
    return uvclab.create_vit(name, **args).eval()


def counter_macs(model, x) -> int:
    with uvclab.explicit_attention(model), FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() // 2


def to_official(sd, prefix=""):
    return {prefix + k.replace("patch_embed.", "tokens_to_token.", 1): v.clone() for k, v in sd.items()}


def official_forward(sd, x, num_heads, eps=1e-8):
    """Independent functional transcription of the official T2T-ViT forward (either stem), on official keys."""
    def ln(t, p):
        return F.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps=1e-5)

    def lin(t, p):
        return F.linear(t, sd[p + ".weight"], sd.get(p + ".bias"))

    def mlp(t, p):
        return lin(F.gelu(lin(t, p + ".fc1")), p + ".fc2")

    def token_transformer(t, p):  # Token_transformer: one head, scale from the input width, residual on v
        B, N, C = t.shape
        q, k, v = lin(ln(t, p + ".norm1"), p + ".attn.qkv").reshape(B, N, 3, -1).permute(2, 0, 1, 3)
        a = ((q * C ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        t = v + lin(a @ v, p + ".attn.proj")
        return t + mlp(ln(t, p + ".norm2"), p + ".mlp")

    def token_performer(t, p):  # Token_performer: kqv = (k, q, v); phi(x) = exp(w x - |x|^2 / 2) / sqrt(m)
        k, q, v = lin(ln(t, p + ".norm1"), p + ".kqv").chunk(3, dim=-1)
        w = sd[p + ".w"]

        def phi(z):
            return torch.exp(z @ w.T - (z * z).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])
        kp, qp = phi(k), phi(q)                                       # (B, T, m)
        y = qp @ (kp.transpose(1, 2) @ v) / (qp @ kp.sum(1)[:, :, None] + eps)
        t = v + lin(y, p + ".proj")
        return t + lin(F.gelu(lin(ln(t, p + ".norm2"), p + ".mlp.0")), p + ".mlp.2")

    token = token_performer if "tokens_to_token.attention1.w" in sd else token_transformer

    def refold(t):
        B, N, C = t.shape
        s = int(math.isqrt(N))
        return t.transpose(1, 2).reshape(B, C, s, s)

    t = F.unfold(x, 7, stride=4, padding=2).transpose(1, 2)
    t = token(t, "tokens_to_token.attention1")
    t = F.unfold(refold(t), 3, stride=2, padding=1).transpose(1, 2)
    t = token(t, "tokens_to_token.attention2")
    t = lin(F.unfold(refold(t), 3, stride=2, padding=1).transpose(1, 2), "tokens_to_token.project")
    t = torch.cat([sd["cls_token"].expand(len(t), -1, -1), t], 1) + sd["pos_embed"]
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        p = f"blocks.{i}"
        B, N, D = t.shape
        q, k, v = lin(ln(t, p + ".norm1"), p + ".attn.qkv").reshape(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
        a = ((q * (D // num_heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        t = t + lin((a @ v).transpose(1, 2).reshape(B, N, D), p + ".attn.proj")
        t = t + mlp(ln(t, p + ".norm2"), p + ".mlp")
        i += 1
    return lin(ln(t, "norm")[:, 0], "head")


# ---- architecture ------------------------------------------------------------------------------------

def test_shapes_and_official_hyper_parameters():
    with torch.device("meta"):
        m, mt = uvclab.create_vit("t2t_vit_14"), uvclab.create_vit("t2t_vit_t_14")
    for model, params, trainable in ((m, T2T14_PARAMS, T2T14_TRAINABLE), (mt, T2TT14_PARAMS, T2TT14_TRAINABLE)):
        assert isinstance(model, T2TViT) and len(model.blocks) == 14 and model.embed_dim == 384
        blk = model.blocks[0]
        assert blk.attn.num_heads == 6 and blk.attn.qkv.bias is None and blk.mlp.fc1.out_features == 1152
        pe = model.patch_embed
        assert pe.num_patches == 196 and pe.grid_size == (14, 14) and \
            pe.grids((224, 224)) == [(56, 56), (28, 28), (14, 14)]
        assert model.pos_embed.shape == (1, 197, 384) and not model.pos_embed.requires_grad
        assert sum(p.numel() for p in model.parameters()) == params
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable  # paper: 21.5M
    assert (m.tokens_type, mt.tokens_type) == ("performer", "transformer")
    assert mt.patch_embed.attention1.attn.qkv.in_features == 147 and mt.patch_embed.attention1.attn.out_dim == 64
    assert mt.patch_embed.attention1.attn.scale == 147 ** -0.5 and mt.patch_embed.attention2.attn.scale == 576 ** -0.5
    p1 = m.patch_embed.attention1  # Performer: 147 -> 64, m = 32 random features, kqv with bias
    assert (p1.kqv.in_features, p1.kqv.out_features, p1.m, p1.epsilon) == (147, 192, 32, 1e-8)
    assert p1.kqv.bias is not None and p1.w.shape == (32, 64) and not p1.w.requires_grad
    assert m.patch_embed.attention2.kqv.in_features == 576
    assert [len(uvclab.create_vit(f"t2t_vit_{n}", device="meta").blocks) for n in (7, 10, 12, 19, 24)] == \
        [7, 10, 12, 19, 24]
    m7 = uvclab.create_vit("t2t_vit_7", device="meta")
    assert (m7.embed_dim, len(m7.blocks), m7.blocks[0].attn.num_heads, m7.blocks[0].mlp.fc1.out_features,
            m7.tokens_type) == (256, 7, 4, 512, "performer")
    assert [uvclab.create_vit(f"t2t_vit_t_{n}", device="meta").tokens_type for n in (14, 19, 24)] == ["transformer"] * 3


def test_sinusoid_position_table():
    m = small_t2t(img_size=64)
    torch.testing.assert_close(m.pos_embed.detach(), sinusoid_table(17, 256))
    table = sinusoid_table(5, 8)[0]
    assert table[0, 0::2].abs().max() == 0 and torch.all(table[0, 1::2] == 1)
    assert table[3, 2].item() == pytest.approx(math.sin(3 / 10000 ** (2 / 8)))


@pytest.mark.parametrize("tokens_type", STEMS)
def test_matches_independent_official_forward(tokens_type):
    # float64 and O(1) weights, so the attention scales, LayerNorm eps (1e-5) and the Performer's eps (1e-8)
    # are visible in the output; the Performer's kqv is kept small so its random features do not underflow
    m = small_t2t(img_size=64, num_heads=4, tokens_type=tokens_type).double()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name not in ("pos_embed",) and not name.endswith(".w"):
                p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.05 if "kqv" in name else 0.3)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    sd = to_official(m.state_dict())
    torch.testing.assert_close(m(x), official_forward(sd, x, num_heads=4))
    if tokens_type == "performer":  # the epsilon is not negligible here, so the check above sees it
        assert not torch.allclose(m(x), official_forward(sd, x, num_heads=4, eps=0.0), rtol=1e-9, atol=0)


def test_fused_and_explicit_attention_agree():
    m = small_t2t(img_size=64, tokens_type="transformer")
    x = torch.randn(2, 3, 64, 64)
    ref = m(x)
    with uvclab.explicit_attention(m):
        assert not m.patch_embed.attention1.attn.fused_attn
        torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tokens_type", STEMS)
def test_shrinking_kwargs_and_non_square_input(tokens_type):
    m = small_t2t(img_size=(32, 48), in_chans=1, num_classes=7, depth=2, embed_dim=64, num_heads=2,
                  tokens_type=tokens_type)
    assert m(torch.randn(2, 1, 32, 48)).shape == (2, 7)
    assert m.patch_embed.num_patches == 2 * 3 and len(m.blocks) == 2
    assert m.patch_embed.macs() == counter_macs(m.patch_embed, torch.randn(1, 1, 32, 48))


def test_dynamic_img_size_and_features():
    m = small_t2t(img_size=64, dynamic_img_size=True)
    assert m(torch.randn(1, 3, 48, 80)).shape == (1, 10)
    feats = m.forward_intermediates(torch.randn(1, 3, 64, 64), indices=1, intermediates_only=True)
    assert feats[0].shape == (1, 256, 4, 4)
    m = small_t2t(img_size=32)
    m.set_input_size(img_size=64)  # the fixed table is regenerated for the new grid, not interpolated
    torch.testing.assert_close(m.pos_embed.detach(), sinusoid_table(17, 256))
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 10) and m.patch_embed.macs() == small_t2t(img_size=64).patch_embed.macs()


def test_user_errors():
    with pytest.raises(UvclabError, match="patch size at 16"):
        uvclab.create_vit("t2t_vit_7", img_size=32, patch_size=8)
    with pytest.raises(UvclabError, match="81.5_T2T_ViT_14.pth.tar.*load_official_t2t_checkpoint"):
        uvclab.create_vit("t2t_vit_14", pretrained=True)
    with pytest.raises(UvclabError, match="81.7_T2T_ViTt_14.pth.tar"):
        uvclab.create_vit("t2t_vit_t_14", pretrained=True)
    with pytest.raises(UvclabError, match="choose one of"):
        uvclab.create_vit("t2t_vit_7", img_size=32, tokens_type="convolution")


# ---- uvclab invariants ---------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens_type", STEMS)
def test_gated_model_with_open_gates_equals_plain_model(tokens_type):
    m = small_t2t(img_size=64, tokens_type=tokens_type)
    x = torch.randn(3, 3, 64, 64)
    g = uvclab.gate_vit(copy.deepcopy(m))
    torch.testing.assert_close(g(x), m(x))


@pytest.mark.parametrize("tokens_type", STEMS)
@pytest.mark.parametrize("img_size", [32, 64])
def test_dense_macs_and_params_equal_flop_counter(img_size, tokens_type):
    m = small_t2t(img_size=img_size, tokens_type=tokens_type)
    x = torch.randn(1, 3, img_size, img_size)
    c = budget.count(m)
    assert c["macs"] == counter_macs(m, x)
    assert c["params"] == sum(p.numel() for p in m.parameters())
    pe = m.patch_embed
    assert pe.macs() == counter_macs(pe, x)


@pytest.mark.parametrize("name", ["t2t_vit_14", "t2t_vit_t_14"])
def test_t2t_vit_14_macs_at_224(name):
    with torch.device("meta"):
        m = uvclab.create_vit(name).eval()
        measured = counter_macs(m, torch.empty(1, 3, 224, 224))
        stem = counter_macs(m.patch_embed, torch.empty(1, 3, 224, 224))
    macs, stem_macs, params = ((T2T14_MACS, T2T14_STEM_MACS, T2T14_PARAMS) if name == "t2t_vit_14" else
                               (T2TT14_MACS, T2TT14_STEM_MACS, T2TT14_PARAMS))
    assert budget.count(m) == {"macs": macs, "params": params}
    assert measured == macs and stem == m.patch_embed.macs() == stem_macs
    # closed form of the token modules at n tokens of width c -> t, then the projection, 14 blocks and the head
    n0, n1, n2, t = 56 * 56, 28 * 28, 14 * 14, 64
    if name == "t2t_vit_t_14":  # qkv, q.k, attn.v, proj, fc1, fc2
        token = [n * c * 3 * t + 2 * n * n * t + 3 * n * t * t for n, c in ((n0, 147), (n1, 9 * t))]
    else:  # kqv, w.k and w.q, phi(q).sum phi(k), phi(k)^T v, phi(q).(phi(k)^T v), proj, mlp; m = t / 2 features
        r = t // 2
        token = [n * c * 3 * t + 2 * n * t * r + n * r + 2 * n * t * r + 3 * n * t * t for n, c in ((n0, 147), (n1, 9 * t))]
    N, D, M = 197, 384, 1152
    assert sum(token) + n2 * 9 * t * 384 + 14 * (4 * N * D * D + 2 * N * N * D + 2 * N * D * M) + D * 1000 == macs
    if name == "t2t_vit_14":
        assert round(macs / 1e9, 1) == 4.8  # the paper's and the official README's T2T-ViT-14


@pytest.mark.parametrize("layout", budget.LAYOUTS)
@pytest.mark.parametrize("tokens_type, seed", [("performer", 0), ("performer", 1), ("transformer", 0)])
def test_export_equals_masked_gated_model_and_counter(layout, seed, tokens_type):
    m = small_t2t(img_size=64, tokens_type=tokens_type)
    s = random_structure(m, seed)
    x = torch.randn(3, 3, 64, 64)
    e = export_model(m, s, layout)
    c = budget.count(m, s, layout)
    assert c["macs"] == counter_macs(e, x[:1])
    assert c["params"] == sum(p.numel() for p in e.parameters())
    masked = apply_structure(m, s)
    assert (e(x) - masked(x)).abs().max() < 1e-4


@pytest.mark.parametrize("tokens_type", STEMS)
def test_save_load_bit_identical(tmp_path, tokens_type):
    m = small_t2t(img_size=32, tokens_type=tokens_type)
    e = export_model(m, random_structure(m, 3), "compact")
    save_pruned(e, tmp_path / "exp")
    torch.manual_seed(123)  # the rebuilt skeleton draws another random projection; the file's must win
    loaded = load_pruned(tmp_path / "exp")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), e(x))
    assert not loaded.pos_embed.requires_grad and loaded.tokens_type == tokens_type
    if tokens_type == "performer":
        assert torch.equal(loaded.patch_embed.attention1.w, m.patch_embed.attention1.w)
        assert not loaded.patch_embed.attention1.w.requires_grad


@pytest.mark.parametrize("tokens_type", STEMS)
def test_dense_structure_export_keeps_stem(tokens_type):
    m = small_t2t(img_size=32, tokens_type=tokens_type)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(export_model(m, Structure.dense(m))(x), m(x))


# ---- official checkpoints ------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens_type", STEMS)
def test_official_checkpoint_loads_and_reproduces_outputs(tmp_path, tokens_type):
    release, arch = (("81.5_T2T_ViT_14.pth.tar", "t2t_vit_14") if tokens_type == "performer" else
                     ("81.7_T2T_ViTt_14.pth.tar", "t2t_vit_t_14"))
    src = small_t2t(img_size=64, seed=1, tokens_type=tokens_type)
    noise = small_t2t(img_size=64, seed=2, tokens_type=tokens_type)
    ck = {"epoch": 309, "arch": arch, "args": argparse.Namespace(model=arch, lr=5e-4),
          "state_dict": to_official(noise.state_dict(), "module."),  # EMA weights are preferred
          "state_dict_ema": to_official(src.state_dict())}
    torch.save(ck, tmp_path / release)
    torch.save(to_official(src.state_dict(), "module."), tmp_path / "plain.pth")
    x = torch.randn(2, 3, 64, 64)
    for name in (release, "plain.pth"):  # seed 3: another random projection w, which the file replaces
        dst = load_official_t2t_checkpoint(small_t2t(img_size=64, seed=3, tokens_type=tokens_type), tmp_path / name)
        assert torch.equal(dst(x), src(x))
    dst = load_official_t2t_checkpoint(small_t2t(img_size=64, seed=3, tokens_type=tokens_type), tmp_path / release,
                                       use_ema=False)
    assert torch.equal(dst(x), noise(x))
    dst = uvclab.create_vit("t2t_vit_7", img_size=64, depth=4, num_classes=10, tokens_type=tokens_type,
                            checkpoint=tmp_path / release)  # the same through create_vit(checkpoint=...)
    assert torch.equal(dst.eval()(x), src(x))


def test_mismatching_official_checkpoints_raise(tmp_path):
    m = small_t2t(img_size=64)
    sd = to_official(m.state_dict())
    cases = {
        "wide.pth": (to_official(small_t2t(img_size=64, embed_dim=128, num_heads=4).state_dict()), "shape mismatch"),
        "no_head.pth": ({k: v for k, v in sd.items() if not k.startswith("head.")}, "missing"),
        "extra.pth": ({**sd, "dist_token": torch.zeros(1, 1, 256)}, "unexpected"),
    }
    for name, (state, msg) in cases.items():
        torch.save(state, tmp_path / name)
        with pytest.raises(UvclabError, match=msg):
            load_official_t2t_checkpoint(small_t2t(img_size=64), tmp_path / name)
    # a file of the other stem names the model to create instead of listing keys
    torch.save(sd, tmp_path / "81.5_T2T_ViT_14.pth.tar")
    torch.save(to_official(small_t2t(img_size=64, tokens_type="transformer").state_dict()), tmp_path / "t.pth")
    with pytest.raises(UvclabError, match="performer-stem .* the transformer stem.*t2t_vit_7/10/12/14/19/24"):
        load_official_t2t_checkpoint(small_t2t(img_size=64, tokens_type="transformer"),
                                     tmp_path / "81.5_T2T_ViT_14.pth.tar")
    with pytest.raises(UvclabError, match="transformer-stem .* the performer stem.*t2t_vit_t_14/19/24"):
        load_official_t2t_checkpoint(small_t2t(img_size=64), tmp_path / "t.pth")
    raw = (tmp_path / "wide.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UvclabError, match="corrupt or truncated"):
        load_official_t2t_checkpoint(m, tmp_path / "cut.pth")
    torch.save({"state_dict": sd, "obj": Structure.dense(m)}, tmp_path / "pickled.pth")
    with pytest.raises(UvclabError, match="pickled objects"):  # weights_only refuses arbitrary classes
        load_official_t2t_checkpoint(m, tmp_path / "pickled.pth")
    with pytest.raises(UvclabError, match="does not exist"):
        load_official_t2t_checkpoint(m, tmp_path / "missing.pth")
