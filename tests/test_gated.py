import pytest
import torch

import uvclab
from uvclab.errors import UvclabError
from uvclab.vit.gated import gate_vit, is_gated, open_all_gates
from uvclab.vit.structure import Structure, apply_structure

from conftest import random_structure, small_vit

MODELS = [("deit_tiny_patch16_224", {}), ("deit_small_distilled_patch16_224", {}),
          ("vit_small_patch16_224", {}), ("vit_base_patch16_224", dict(embed_dim=96, num_heads=4)),
          ("deit_base_patch16_224", dict(in_chans=1, img_size=48, patch_size=16, num_heads=6, embed_dim=192))]


@pytest.mark.parametrize("name,kw", MODELS)
@pytest.mark.parametrize("fused", [True, False])
def test_all_gates_open_equals_timm(name, kw, fused):
    plain = small_vit(name, **kw)
    x = torch.randn(2, *uvclab.vit.models.input_shape(plain))
    for m in plain.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    ref = plain(x)
    gated = gate_vit(plain)
    assert is_gated(gated)
    torch.testing.assert_close(gated(x), ref)


def test_gating_keeps_state_dict_keys_and_loads_timm_weights():
    plain = small_vit()
    keys = list(plain.state_dict())
    gated = gate_vit(small_vit())
    assert list(gated.state_dict()) == keys
    gated.load_state_dict(plain.state_dict())


def test_gates_change_output_and_reopen():
    m = gate_vit(small_vit())
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    blk = m.blocks[0]
    for attr, obj, shape in [("head_gate", blk.attn, (6,)), ("v_gate", blk.attn, (6, 64)),
                             ("qk_gate", blk.attn, (6, 64)), ("neuron_gate", blk.mlp, (1536,)),
                             ("block_gate", blk, ()), ("attn_gate", blk, ()), ("mlp_gate", blk, ())]:
        setattr(obj, attr, torch.zeros(shape))
        assert not torch.allclose(m(x), ref), attr
        open_all_gates(m)
        torch.testing.assert_close(m(x), ref)


def test_closed_block_gate_is_identity():
    m = gate_vit(small_vit())
    x = torch.randn(1, 17, m.embed_dim)
    m.blocks[0].block_gate = torch.tensor(0.0)
    assert torch.equal(m.blocks[0](x), x)


def test_soft_block_gate_interpolates_and_has_gradient():
    m = gate_vit(small_vit())
    x = torch.randn(1, 17, m.embed_dim)
    full = m.blocks[0](x)
    g = torch.tensor(0.3, requires_grad=True)
    m.blocks[0].block_gate = g
    out = m.blocks[0](x)
    torch.testing.assert_close(out, x + 0.3 * (full - x))
    out.sum().backward()
    assert g.grad is not None and g.grad.abs() > 0


def test_structure_json_round_trip(tmp_path):
    m = small_vit()
    s = random_structure(m)
    s.save(tmp_path / "s.json")
    assert Structure.load(tmp_path / "s.json") == s


def test_structure_mismatch_is_a_clear_error():
    s = Structure.dense(small_vit(depth=4))
    with pytest.raises(UvclabError, match="depth 4 vs model 6"):
        s.validate(small_vit(depth=6))
    with pytest.raises(UvclabError, match="num_heads"):
        apply_structure(small_vit(num_heads=3, embed_dim=384), s)


@pytest.mark.parametrize("bad", ['{"blocks": []}', "{not json", ""])
def test_corrupt_structure_file(tmp_path, bad):
    p = tmp_path / "s.json"
    p.write_text(bad)
    with pytest.raises(UvclabError):
        Structure.load(p)


def test_structure_with_out_of_range_indices_rejected():
    m = small_vit()
    d = Structure.dense(m).to_dict()
    d["blocks"][0]["mlp"] = [0, 99999]
    with pytest.raises(UvclabError, match="sorted unique indices"):
        Structure.from_dict(d)


def test_unknown_model_suggests_names():
    with pytest.raises(UvclabError, match="deit_tiny_patch16_224"):
        uvclab.create_vit("deit_tiny_patch16_244")


def test_unsupported_architecture_rejected():
    with pytest.raises(UvclabError, match="not a timm VisionTransformer"):
        uvclab.create_vit("resnet18")


def test_local_checkpoint_loads_and_mismatch_is_clear(tmp_path):
    from safetensors.torch import save_file
    src = small_vit()
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(src.state_dict(), tmp_path / "w.pth")
    x = torch.randn(1, 3, 32, 32)
    for f in ("w.safetensors", "w.pth"):
        m = uvclab.create_vit("deit_small_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=10,
                              checkpoint=tmp_path / f).eval()
        torch.testing.assert_close(m(x), src(x))
    with pytest.raises(UvclabError, match="does not fit the model"):
        uvclab.create_vit("deit_small_patch16_224", img_size=32, patch_size=8, depth=5, num_classes=10,
                          checkpoint=tmp_path / "w.safetensors")
    (tmp_path / "bad.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:1000])
    with pytest.raises(UvclabError, match="corrupt or truncated"):
        uvclab.create_vit("deit_small_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=10,
                          checkpoint=tmp_path / "bad.safetensors")


def test_pretrained_path_through_timm_with_local_file(tmp_path):
    # The online path is timm's pretrained=True; timm can point it at a local file, which is what we test here.
    from safetensors.torch import save_file
    src = small_vit("deit_tiny_patch16_224")
    save_file(src.state_dict(), str(tmp_path / "deit.safetensors"))
    m = uvclab.create_vit("deit_tiny_patch16_224", pretrained=True, img_size=32, patch_size=8, depth=4,
                          num_classes=10, pretrained_cfg_overlay=dict(file=str(tmp_path / "deit.safetensors")))
    x = torch.randn(1, 3, 32, 32)
    # timm re-initialises the classifier when num_classes differs from the hub's 1000: compare features
    torch.testing.assert_close(gate_vit(m.eval()).forward_features(x), src.forward_features(x))
