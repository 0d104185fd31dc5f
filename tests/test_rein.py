"""Tests of rein.py: Rein layer equations, parameter counts, query linking, backbone, official key
maps, augmentation, schedule, sliding window, the command line (presets, bad inputs, divergence,
resume, fast path) end to end, and the Mask2Former block. CPU only, random weights, tiny sizes
except where a full-size module is cheap to build."""

from __future__ import annotations

import copy
import json
import math
import pathlib
import re
import shutil
import sys
import time

import pytest
import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conftest import max_tensor_diff, torchrun  # noqa: E402

import common  # noqa: E402
import rein  # noqa: E402

m2f = rein  # the Mask2Former block lives in rein.py's namespace


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests run many small ops: one intra-op thread is faster on a shared 2-core machine
    and makes the in-process and subprocess runs (--cpu-threads 1) use the same kernels."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny_model(seed: int = 0, **kw) -> rein.ReinSegmentor:
    torch.manual_seed(seed)
    return rein.ReinSegmentor("test", 64, **kw)


# ================================================================================================
# Rein module: counts, init, equations
# ================================================================================================


def test_rein_parameter_counts_match_the_paper_and_official_module():
    # [C reins.py::LoRAReins, counted on the official module built on CPU] ViT-L: 2.53M
    # (paper Fig. 5) / 2,990,081 with the linking layers
    counts = rein.rein_parameter_counts(rein.Reins(24, 1024))
    assert counts == {
        "rein": 2_530_817,
        "linking": 262_400 + 196_864,
        "rein_with_linking": 2_990_081,
    }
    assert rein.rein_parameter_counts(rein.Reins(12, 384))["rein_with_linking"] == 684_033
    assert (
        rein.rein_parameter_counts(rein.Reins(12, 384, lora_dim=None))["rein_with_linking"]
        == 1_051_905
    )
    # ViT-B by hand: A 12·100·16 + B 12·16·768 + 2 MLPs (768² + 768) + scale;
    # linking: transform 768·256 + 256, merge 768·256 + 256
    vit_b = 12 * 100 * 16 + 12 * 16 * 768 + 2 * (768 * 768 + 768) + 1
    counts_b = rein.rein_parameter_counts(rein.Reins(12, 768))
    assert counts_b["rein"] == vit_b == 1_347_841
    assert counts_b["linking"] == (768 * 256 + 256) + (768 * 256 + 256)


def test_segmentor_counts_and_freezing_on_meta_device():
    with torch.device("meta"):
        model = rein.ReinSegmentor("dinov2_l", 512)
    counts = rein.describe_parameters(model)
    assert counts["rein"] == 2_530_817 and counts["rein_with_linking"] == 2_990_081
    assert counts["frozen_vfm"] == 304_198_656  # ViT-L/16 at 512 (no mask_token)
    assert counts["trainable"] == counts["rein_with_linking"] + counts["head"]
    assert counts["total"] == counts["trainable"] + counts["frozen_vfm"]
    assert all(not p.requires_grad for p in model.backbone.vfm.parameters())
    # no learned query embeddings in the head; querys2feat instead [C rein_mask2former.py]
    assert not hasattr(model.decode_head.m2f.transformer_decoder, "query_feat")
    assert count(model.decode_head.querys2feat) == 256 * 256 + 256


def test_initial_values_scale_and_token_bounds():
    torch.manual_seed(0)
    low = rein.Reins(24, 1024)
    assert low.scale.item() == pytest.approx(1e-3)
    bound = math.sqrt(6 / (3 * 16 * 16 + math.sqrt(1024 * 16)))  # 0.0818 [C reins.py::create_model]
    assert bound == pytest.approx(0.0818, abs=1e-4)
    for t in (low.learnable_tokens_a, low.learnable_tokens_b):
        assert t.abs().max() <= bound
        assert t.abs().max() > 0.99 * bound  # uniform over the whole interval
    full = rein.Reins(24, 1024, lora_dim=None)
    bound_full = math.sqrt(6 / (3 * 16 * 16 + 1024))  # 0.0579
    assert bound_full == pytest.approx(0.0579, abs=1e-4)
    assert bound_full * 0.99 < full.learnable_tokens.abs().max() <= bound_full
    assert full.learnable_tokens.shape == (24, 100, 1024)


def test_low_rank_tokens_equal_a_times_b():
    torch.manual_seed(0)
    r = rein.Reins(3, 8, token_length=5, lora_dim=2)
    assert r.learnable_tokens_a.shape == (3, 5, 2) and r.learnable_tokens_b.shape == (3, 2, 8)
    for i in range(3):
        assert torch.allclose(r.get_tokens(i), r.learnable_tokens_a[i] @ r.learnable_tokens_b[i])
        assert torch.allclose(r.get_tokens()[i], r.get_tokens(i))


def test_rein_layer_hand_computed_small_case():
    """C = 2, m = 3 tokens, N = 2 patch tokens: Δ uses tokens 1..2, token 0 only normalises."""
    r = rein.Reins(1, 2, token_length=3, lora_dim=None, query_dims=4)
    with torch.no_grad():
        r.learnable_tokens.copy_(torch.tensor([[[3.0, 0.0], [1.0, 0.0], [0.0, 1.0]]]))
        r.mlp_token2feat.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        r.mlp_token2feat.bias.copy_(torch.tensor([0.5, 0.0]))
        r.mlp_delta_f.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
        r.mlp_delta_f.bias.copy_(torch.tensor([0.0, -1.0]))
        r.scale.fill_(0.1)
    cls = torch.tensor([[7.0, -7.0]])
    f = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    x = torch.cat([cls, f])[None]  # (1, 3, 2)
    out = r(x, 0)[0]
    assert torch.equal(out[0], cls[0])  # class token untouched
    tokens = [(3.0, 0.0), (1.0, 0.0), (0.0, 1.0)]
    for n, (a, b) in enumerate(f.tolist()):
        logits = [(a * t0 + b * t1) / math.sqrt(2) for t0, t1 in tokens]
        z = sum(math.exp(v) for v in logits)  # token 0 in the normaliser
        s = [math.exp(v) / z for v in logits]
        # value of token k: mlp_token2feat(T_k) = (2 T_k0 + 0.5, T_k1); token 0 dropped
        v1, v2 = (2 * 1.0 + 0.5, 0.0), (2 * 0.0 + 0.5, 1.0)
        d = (s[1] * v1[0] + s[2] * v2[0] + a, s[1] * v1[1] + s[2] * v2[1] + b)  # + f inside
        delta = (d[0] + d[1], d[1] - 1.0)  # mlp_delta_f
        expected = (a + 0.1 * delta[0], b + 0.1 * delta[1])
        assert out[1 + n].tolist() == pytest.approx(expected, abs=1e-6)


def test_link_queries_pooling_on_hand_built_tokens():
    """transform = identity on 256-d tokens; merge picks max / mean / last of channel j from the
    channel-major flattening [(c0 max, c0 mean, c0 last), (c1 max, ...), ...] of the code."""
    torch.manual_seed(0)
    r = rein.Reins(4, 256, token_length=6, lora_dim=None)
    tokens = torch.randn(4, 6, 256)
    with torch.no_grad():
        r.learnable_tokens.copy_(tokens)
        r.transform.weight.copy_(torch.eye(256))
        r.transform.bias.zero_()
        r.merge.bias.zero_()
        expected = {0: tokens.amax(0), 1: tokens.mean(0), 2: tokens[-1]}
        for which, want in expected.items():
            r.merge.weight.zero_()
            r.merge.weight[torch.arange(256), torch.arange(256) * 3 + which] = 1.0
            q = r.link_queries()
            assert q.shape == (6, 256)
            assert torch.allclose(q, want, atol=1e-6)


def test_queries_are_image_independent_and_shaped():
    model = tiny_model().eval()
    with torch.no_grad():
        f1, q1 = model.backbone(torch.randn(1, 3, 64, 64))
        f3, q3 = model.backbone(torch.randn(3, 3, 64, 96))
    assert q1.shape == (100, 256) and torch.equal(q1, q3)
    assert [tuple(f.shape) for f in f1] == [
        (1, 32, 16, 16),
        (1, 32, 8, 8),
        (1, 32, 4, 4),
        (1, 32, 2, 2),
    ]
    assert [tuple(f.shape) for f in f3] == [
        (3, 32, 16, 24),
        (3, 32, 8, 12),
        (3, 32, 4, 6),
        (3, 32, 2, 3),
    ]


def test_vit_l_pyramid_shapes_on_meta_device():
    with torch.device("meta"):
        model = rein.ReinSegmentor("dinov2_l", 512)
        features, queries = model.backbone(torch.empty(2, 3, 512, 512))
    assert [tuple(f.shape) for f in features] == [
        (2, 1024, 128, 128),
        (2, 1024, 64, 64),
        (2, 1024, 32, 32),
        (2, 1024, 16, 16),
    ]
    assert queries.shape == (100, 256)


def manual_frozen_features(model: rein.ReinSegmentor, images: torch.Tensor) -> list[torch.Tensor]:
    """The VFM alone: same tokens, blocks without any Rein layer, same taps and rescaling."""
    bb = model.backbone
    x, (h, w), _ = bb.embed(images)
    out = []
    for i, block in enumerate(bb.vfm.blocks):
        x = block(x)
        if i in bb.out_indices:
            out.append(x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, h, w))
    return [
        F.interpolate(f, scale_factor=s, mode="bilinear", align_corners=False) if s != 1 else f
        for f, s in zip(out, rein.PYRAMID_SCALES)
    ]


def test_zeroed_delta_mlp_gives_the_frozen_backbone_and_rein_changes_it_otherwise():
    model = tiny_model().eval()
    images = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        reference = manual_frozen_features(model, images)
        changed, _ = model.backbone(images)
        assert not torch.allclose(changed[0], reference[0])
        model.backbone.reins.mlp_delta_f.weight.zero_()
        model.backbone.reins.mlp_delta_f.bias.zero_()
        same, _ = model.backbone(images)
    for a, b in zip(same, reference):
        assert torch.equal(a, b)


def test_gradients_reach_only_rein_and_head_and_vfm_stays_in_eval():
    model = tiny_model().train()
    assert not model.backbone.vfm.training and model.backbone.reins.training
    assert model.decode_head.training
    out = model(torch.randn(2, 3, 64, 64))
    targets = rein.semantic_to_targets(torch.randint(0, 5, (2, 64, 64)))
    sum(rein.build_criterion(64)(out, targets).values()).backward()
    for name, p in model.named_parameters():
        if name.startswith("backbone.vfm."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad and p.grad is not None, name
    assert model.backbone.reins.learnable_tokens_a.grad.abs().sum() > 0
    assert model.backbone.reins.scale.grad.abs() > 0


SECTIONS_1_2_CODE = """
import json

torch.manual_seed(0)
reins = Reins(4, 32, token_length=10)  # the `test` VFM's 4 layers of width 32, 10 tokens
x = torch.randn(2, 1 + 16, 32)  # (B, 1+N, C): class token first
out = reins(x, 2)
tokens = reins.get_tokens(2)
attn = torch.softmax(x[:, 1:] @ tokens.t() / 32**0.5, dim=-1)
delta = reins.mlp_delta_f(attn[..., 1:] @ reins.mlp_token2feat(tokens[1:]) + x[:, 1:])
known = torch.cat([x[:, :1], x[:, 1:] + 1e-3 * delta], dim=1)  # the value at init, s = 1e-3
(out.square().sum() + reins.link_queries().square().sum()).backward()
grads = [reins.learnable_tokens_a.grad, reins.learnable_tokens_b.grad, reins.scale.grad]
with torch.no_grad():
    reins.mlp_delta_f.weight.zero_()
    reins.mlp_delta_f.bias.zero_()
    zeroed = reins(x, 2)
backbone = ReinsBackbone("test", 64, Reins(4, 32, token_length=10)).train()
features, queries = backbone(torch.randn(2, 3, 64, 48))
sum(f.sum() for f in features).backward()
print(json.dumps({
    "shape": list(out.shape), "known": torch.allclose(out, known, atol=1e-6),
    "cls_kept": torch.equal(out[:, 0], x[:, 0]), "moved": bool((out != x).any()),
    "grads": [[bool(g.isfinite().all()), g.abs().sum().item()] for g in grads],
    "zeroed_is_identity": torch.equal(zeroed, x),
    "pyramid": [list(f.shape) for f in features], "queries": list(queries.shape),
    "vfm_eval": not backbone.vfm.training,
    "vfm_grads": [p.grad for p in backbone.vfm.parameters()].count(None),
    "vfm_params": len(list(backbone.vfm.parameters())),
    "token_grad": backbone.reins.learnable_tokens_a.grad.abs().sum().item(),
    "counts": rein_parameter_counts(Reins(24, 1024)),
}))
"""


def test_sections_1_2_run_without_common(tmp_path):
    """Sections 1-2 pasted into a file of their own (torch and timm only, common.py cannot be
    imported): the Rein layer forward and backward on random tokens, then inside the tiny VFM."""
    from conftest import run_sections_1_2

    got = json.loads(run_sections_1_2("rein.py", SECTIONS_1_2_CODE, tmp_path).splitlines()[-1])
    assert got["shape"] == [2, 17, 32] and got["cls_kept"] and got["moved"]
    assert got["known"]  # f + s · MLP_delta(S[:, 1:] · MLP_token(T[1:]) + f), s = 1e-3 at init
    for finite, size in got["grads"]:  # A, B and s all learn
        assert finite and size > 0
    assert got["zeroed_is_identity"]  # MLP_delta = 0: Rein leaves the features as they are
    assert got["pyramid"] == [[2, 32, 16, 12], [2, 32, 8, 6], [2, 32, 4, 3], [2, 32, 2, 1]]
    assert got["queries"] == [10, 256] and got["vfm_eval"] and got["token_grad"] > 0
    assert got["vfm_grads"] == got["vfm_params"] > 0  # the VFM stays frozen
    assert got["counts"] == {"rein": 2_530_817, "linking": 459_264, "rein_with_linking": 2_990_081}


def test_top_of_the_file_names_nothing_of_common():
    """Docstring, imports, constants, sections 1 and 2: no `common.` name (STYLE: pasteable)."""
    lines = (ROOT / "rein.py").read_text().splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("# 3. "))
    top = "\n".join(lines[:end])
    assert "common." not in top and "# 2. Model" in top


def test_pos_embed_interpolation_rule():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 4 * 4, 8)
    assert rein.interpolate_pos_embed(pos, (4, 4)) is pos  # trained grid: used as is
    out = rein.interpolate_pos_embed(pos, (3, 6))
    grid = pos[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    want = F.interpolate(grid, scale_factor=(3.1 / 4, 6.1 / 4), mode="bicubic", align_corners=False)
    assert out.shape == (1, 1 + 18, 8)
    assert torch.equal(out[:, 0], pos[:, 0])
    assert torch.allclose(out[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 18, 8))
    # same token count but not square (4x4 = 2x8) is interpolated too, as in DINOv2
    assert rein.interpolate_pos_embed(pos, (2, 8)).shape == (1, 17, 8)
    assert not torch.equal(rein.interpolate_pos_embed(pos, (2, 8)), pos)


# ================================================================================================
# Official weights: DINOv2 / EVA02 into timm, released Rein checkpoints (mmdet names)
# ================================================================================================


def dinov2_original_state(
    dim: int, depth: int, grid: int, swiglu: bool = False, hidden: int = 0
) -> dict[str, torch.Tensor]:
    """A state dict in facebookresearch/dinov2 naming and shapes (patch 14, 1 + grid² positions)"""
    g = torch.Generator().manual_seed(1)
    sd = {
        "cls_token": torch.randn(1, 1, dim, generator=g),
        "pos_embed": torch.randn(1, 1 + grid * grid, dim, generator=g),
        "mask_token": torch.randn(1, dim, generator=g),
        "patch_embed.proj.weight": torch.randn(dim, 3, 14, 14, generator=g),
        "patch_embed.proj.bias": torch.randn(dim, generator=g),
        "norm.weight": torch.randn(dim, generator=g),
        "norm.bias": torch.randn(dim, generator=g),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        for n in ("norm1", "norm2"):
            sd[p + n + ".weight"] = torch.randn(dim, generator=g)
            sd[p + n + ".bias"] = torch.randn(dim, generator=g)
        sd[p + "attn.qkv.weight"] = torch.randn(3 * dim, dim, generator=g)
        sd[p + "attn.qkv.bias"] = torch.randn(3 * dim, generator=g)
        sd[p + "attn.proj.weight"] = torch.randn(dim, dim, generator=g)
        sd[p + "attn.proj.bias"] = torch.randn(dim, generator=g)
        sd[p + "ls1.gamma"] = torch.randn(dim, generator=g)
        sd[p + "ls2.gamma"] = torch.randn(dim, generator=g)
        if swiglu:  # SwiGLUFFNFused: w12 (2·hidden, dim), w3 (dim, hidden)
            sd[p + "mlp.w12.weight"] = torch.randn(2 * hidden, dim, generator=g)
            sd[p + "mlp.w12.bias"] = torch.randn(2 * hidden, generator=g)
            sd[p + "mlp.w3.weight"] = torch.randn(dim, hidden, generator=g)
            sd[p + "mlp.w3.bias"] = torch.randn(dim, generator=g)
        else:
            sd[p + "mlp.fc1.weight"] = torch.randn(4 * dim, dim, generator=g)
            sd[p + "mlp.fc1.bias"] = torch.randn(4 * dim, generator=g)
            sd[p + "mlp.fc2.weight"] = torch.randn(dim, 4 * dim, generator=g)
            sd[p + "mlp.fc2.bias"] = torch.randn(dim, generator=g)
    return sd


def test_load_original_dinov2_weights_resamples_patch_and_positions(tmp_path):
    sd = dinov2_original_state(32, 4, grid=5)
    path = tmp_path / "dinov2_test.pth"
    torch.save(sd, path)
    model = tiny_model()
    rein.load_vfm_weights(model, path, "test", 64)
    vfm = model.backbone.vfm.state_dict()
    want_patch = F.interpolate(
        sd["patch_embed.proj.weight"], size=(16, 16), mode="bicubic", align_corners=False
    )
    assert torch.equal(vfm["patch_embed.proj.weight"], want_patch)
    grid = sd["pos_embed"][:, 1:].reshape(1, 5, 5, 32).permute(0, 3, 1, 2)
    want_pos = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
    assert torch.equal(vfm["pos_embed"][:, 0], sd["pos_embed"][:, 0])
    assert torch.equal(vfm["pos_embed"][:, 1:], want_pos.permute(0, 2, 3, 1).reshape(1, 16, 32))
    for k, v in sd.items():
        if k not in ("patch_embed.proj.weight", "pos_embed", "mask_token"):
            assert torch.equal(vfm[k], v), k
    # a Rein-converted file (already patch 16, 4x4 positions) loads unchanged
    converted = {k: vfm[k].clone() for k in vfm}
    torch.save(converted, tmp_path / "converted.pth")
    other = tiny_model(seed=5)
    rein.load_vfm_weights(other, tmp_path / "converted.pth", "test", 64)
    assert all(torch.equal(other.backbone.vfm.state_dict()[k], v) for k, v in converted.items())


def test_load_dinov2_giant_style_swiglu_names(tmp_path, monkeypatch):
    size = dict(family="dinov2", embed_dim=48, depth=2, num_heads=2, swiglu=True,
                out_indices=(0, 1), weights=None)  # fmt: skip
    monkeypatch.setitem(rein.VFM_SIZES, "tiny_g", size)
    model = rein.ReinSegmentor("tiny_g", 64)
    hidden = model.backbone.vfm.blocks[0].mlp.fc2.weight.shape[1]
    sd = dinov2_original_state(48, 2, grid=5, swiglu=True, hidden=hidden)
    torch.save(sd, tmp_path / "g.pth")
    rein.load_vfm_weights(model, tmp_path / "g.pth", "tiny_g", 64)
    assert torch.equal(model.backbone.vfm.blocks[1].mlp.fc1.weight, sd["blocks.1.mlp.w12.weight"])
    assert torch.equal(model.backbone.vfm.blocks[1].mlp.fc2.bias, sd["blocks.1.mlp.w3.bias"])


def test_load_eva02_weights_in_timm_naming(tmp_path, monkeypatch):
    from timm.models.eva import Eva

    size = dict(family="eva02", embed_dim=32, depth=4, num_heads=2, swiglu=True,
                out_indices=(0, 1, 2, 3), weights=None)  # fmt: skip
    monkeypatch.setitem(rein.VFM_SIZES, "tiny_eva", size)
    torch.manual_seed(3)
    source = Eva(
        img_size=70,
        patch_size=14,
        embed_dim=32,
        depth=4,
        num_heads=2,
        mlp_ratio=4 * 2 / 3,
        qkv_fused=False,
        swiglu_mlp=True,
        scale_mlp=True,
        use_rot_pos_emb=True,
        ref_feat_shape=(16, 16),
        num_classes=0,
    )
    sd = {k: v for k, v in source.state_dict().items() if "rope" not in k}
    torch.save(sd, tmp_path / "eva.pth")
    model = rein.ReinSegmentor("tiny_eva", 64)
    rein.load_vfm_weights(model, tmp_path / "eva.pth", "tiny_eva", 64)
    vfm = model.backbone.vfm
    assert torch.equal(vfm.blocks[1].attn.q_proj.weight, sd["blocks.1.attn.q_proj.weight"])
    assert vfm.patch_embed.proj.weight.shape[-1] == 16 and vfm.pos_embed.shape[1] == 17
    with torch.no_grad():
        features, _ = model.backbone(torch.randn(1, 3, 64, 80))  # RoPE on a 4x5 grid
    assert features[2].shape == (1, 32, 4, 5)


def mmdet_head_names(in_channels: int) -> dict[str, tuple[int, ...]]:
    """The decode_head keys of a released Rein checkpoint, written from mmdet's classes
    (Mask2FormerHead, MSDeformAttnPixelDecoder with ConvModule(.conv/.gn), mmcv
    MultiheadAttention (.attn), FFN (layers.0.0 / layers.1)) plus Rein's querys2feat."""
    d, names = 256, {}
    for i in range(3):
        names[f"pixel_decoder.input_convs.{i}.conv.weight"] = (d, in_channels, 1, 1)
        names[f"pixel_decoder.input_convs.{i}.conv.bias"] = (d,)
        names[f"pixel_decoder.input_convs.{i}.gn.weight"] = (d,)
        names[f"pixel_decoder.input_convs.{i}.gn.bias"] = (d,)
    for i in range(6):
        p = f"pixel_decoder.encoder.layers.{i}."
        for n, shape in (
            ("sampling_offsets", 192),
            ("attention_weights", 96),
            ("value_proj", d),
            ("output_proj", d),
        ):
            names[p + f"self_attn.{n}.weight"] = (shape, d)
            names[p + f"self_attn.{n}.bias"] = (shape,)
        names[p + "ffn.layers.0.0.weight"], names[p + "ffn.layers.0.0.bias"] = (1024, d), (1024,)
        names[p + "ffn.layers.1.weight"], names[p + "ffn.layers.1.bias"] = (d, 1024), (d,)
        for k in range(2):
            names[p + f"norms.{k}.weight"] = names[p + f"norms.{k}.bias"] = (d,)
    names["pixel_decoder.level_encoding.weight"] = (3, d)
    names["pixel_decoder.lateral_convs.0.conv.weight"] = (d, in_channels, 1, 1)
    names["pixel_decoder.output_convs.0.conv.weight"] = (d, d, 3, 3)
    for n in ("lateral_convs", "output_convs"):
        names[f"pixel_decoder.{n}.0.gn.weight"] = names[f"pixel_decoder.{n}.0.gn.bias"] = (d,)
    names["pixel_decoder.mask_feature.weight"], names["pixel_decoder.mask_feature.bias"] = (
        (d, d, 1, 1),
        (d,),
    )
    for i in range(9):
        p = f"transformer_decoder.layers.{i}."
        for a in ("self_attn", "cross_attn"):
            names[p + f"{a}.attn.in_proj_weight"] = (3 * d, d)
            names[p + f"{a}.attn.in_proj_bias"] = (3 * d,)
            names[p + f"{a}.attn.out_proj.weight"], names[p + f"{a}.attn.out_proj.bias"] = (
                (d, d),
                (d,),
            )
        names[p + "ffn.layers.0.0.weight"], names[p + "ffn.layers.0.0.bias"] = (2048, d), (2048,)
        names[p + "ffn.layers.1.weight"], names[p + "ffn.layers.1.bias"] = (d, 2048), (d,)
        for k in range(3):
            names[p + f"norms.{k}.weight"] = names[p + f"norms.{k}.bias"] = (d,)
    names["transformer_decoder.post_norm.weight"] = names["transformer_decoder.post_norm.bias"] = (
        d,
    )
    names["level_embed.weight"] = (3, d)
    names["querys2feat.weight"], names["querys2feat.bias"] = (d, d), (d,)
    names["cls_embed.weight"], names["cls_embed.bias"] = (20, d), (20,)
    for k in (0, 2, 4):
        names[f"mask_embed.{k}.weight"], names[f"mask_embed.{k}.bias"] = (d, d), (d,)
    return {"decode_head." + k: v for k, v in names.items()}


def rein_names(layers: int, dim: int) -> dict[str, tuple[int, ...]]:
    p = "backbone.reins."
    return {
        p + "learnable_tokens_a": (layers, 100, 16),
        p + "learnable_tokens_b": (layers, 16, dim),
        p + "scale": (),
        p + "mlp_token2feat.weight": (dim, dim),
        p + "mlp_token2feat.bias": (dim,),
        p + "mlp_delta_f.weight": (dim, dim),
        p + "mlp_delta_f.bias": (dim,),
        p + "transform.weight": (256, dim),
        p + "transform.bias": (256,),
        p + "merge.weight": (256, 768),
        p + "merge.bias": (256,),
    }


def test_official_key_map_covers_exactly_the_released_names():
    model = tiny_model()
    mapped = rein.official_key_map(model)
    shapes = model.state_dict()
    expected = {**mmdet_head_names(32), **rein_names(4, 32)}
    assert set(mapped.values()) == set(expected)
    for ours, official in mapped.items():
        assert tuple(shapes[ours].shape) == expected[official], (ours, official)


def test_released_checkpoint_loads_with_no_missing_keys_and_same_outputs(tmp_path):
    source = tiny_model(seed=1).eval()
    official = {v: source.state_dict()[k] for k, v in rein.official_key_map(source).items()}
    torch.save({"meta": {"iter": 40000}, "state_dict": official}, tmp_path / "release.pth")
    target = tiny_model(seed=2).eval()  # same frozen VFM (seed-independent below), other Rein/head
    target.backbone.vfm.load_state_dict(source.backbone.vfm.state_dict())
    rein.load_official_rein(target, tmp_path / "release.pth", "test", 64)
    images = torch.randn(1, 3, 64, 64)
    assert torch.equal(rein.segment(source, images), rein.segment(target, images))
    # full weights (generate_full_weights.py): DINOv2 keys as backbone.* load too
    full = dict(official)
    full.update({f"backbone.{k}": v for k, v in source.backbone.vfm.state_dict().items()})
    full["backbone.mask_token"] = torch.zeros(1, 32)
    torch.save({"state_dict": full}, tmp_path / "full.pth")
    third = tiny_model(seed=3).eval()
    rein.load_official_rein(third, tmp_path / "full.pth", "test", 64)
    assert torch.equal(rein.segment(source, images), rein.segment(third, images))
    # a missing key or a wrong shape is one clear error
    broken = dict(official)
    broken.pop("decode_head.querys2feat.bias")
    torch.save({"state_dict": broken}, tmp_path / "broken.pth")
    with pytest.raises(common.UsageError, match="1 missing"):
        rein.load_official_rein(third, tmp_path / "broken.pth", "test", 64)
    with pytest.raises(common.UsageError, match="another shape"):
        rein.load_official_rein(
            rein.ReinSegmentor("test", 64, lora_dim=8), tmp_path / "release.pth", "test", 64
        )


def test_param_groups_follow_the_official_no_decay_keys():
    model = tiny_model()
    decay, no_decay = rein.param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert {
        "backbone.reins.learnable_tokens_a",
        "backbone.reins.learnable_tokens_b",
        "backbone.reins.scale",
        "decode_head.m2f.transformer_decoder.level_embed.weight",
        "decode_head.m2f.pixel_decoder.input_proj.0.1.weight",  # GroupNorm
        "decode_head.m2f.transformer_decoder.decoder_norm.bias",
    } <= nd
    assert {
        "backbone.reins.mlp_delta_f.weight",
        "backbone.reins.mlp_delta_f.bias",
        "decode_head.querys2feat.weight",
        "decode_head.m2f.pixel_decoder.level_embed",
        "decode_head.m2f.transformer_decoder.class_embed.bias",
    } <= d
    assert not any(n.startswith("backbone.vfm.") for n in nd | d)
    assert len(nd) + len(d) == sum(1 for p in model.parameters() if p.requires_grad)


def test_lr_schedule_values():
    # GTA5 512: PolyLR power 0.9 over 40k, mmengine T = end - begin - 1
    assert rein.lr_at(0, 1e-4, 40000, 0) == pytest.approx(1e-4)
    assert rein.lr_at(20000, 1e-4, 40000, 0) == pytest.approx(1e-4 * (1 - 20000 / 39999) ** 0.9)
    assert rein.lr_at(39999, 1e-4, 40000, 0) == 0.0
    # Cityscapes -> ACDC: LinearLR 1e-6 -> 1 over iterations 0..9999, then poly over 10000..39999
    assert rein.lr_at(0, 6e-5, 40000, 10000) == pytest.approx(6e-11)
    assert rein.lr_at(5000, 6e-5, 40000, 10000) == pytest.approx(
        6e-5 * (1e-6 + (1 - 1e-6) * 5000 / 9999)
    )
    assert rein.lr_at(9999, 6e-5, 40000, 10000) == pytest.approx(6e-5)
    assert rein.lr_at(10000, 6e-5, 40000, 10000) == pytest.approx(6e-5)
    assert rein.lr_at(25000, 6e-5, 40000, 10000) == pytest.approx(6e-5 * (1 - 15000 / 29999) ** 0.9)


# ================================================================================================
# Augmentation
# ================================================================================================


def test_photometric_distortion_is_seeded_and_keeps_shape():
    image = torch.randint(0, 256, (3, 9, 7), dtype=torch.uint8)
    outs = [rein.photometric_distortion(image, torch.Generator().manual_seed(s)) for s in range(12)]
    assert all(o.dtype == torch.uint8 and o.shape == image.shape for o in outs)
    again = rein.photometric_distortion(image, torch.Generator().manual_seed(3))
    assert torch.equal(again, outs[3])
    assert any(not torch.equal(o, image) for o in outs) and len({o.sum().item() for o in outs}) > 3


def test_train_transform_shapes_padding_and_scales():
    t = rein.ReinTrainTransform(64)
    assert t.short_sides == [int(64 * x * 0.1) for x in range(5, 21)] and t.max_long == 256
    assert rein.ReinTrainTransform(512).short_sides == [
        256,
        307,
        358,
        409,
        460,
        512,
        563,
        614,
        665,
        716,
        768,
        819,
        870,
        921,
        972,
        1024,
    ]
    image = torch.randint(0, 256, (3, 10, 10), dtype=torch.uint8)
    label = torch.randint(0, 19, (10, 10))
    padded = 0
    for seed in range(8):
        x, y = t(image, label, torch.Generator().manual_seed(seed))
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and y.shape == (64, 64)
        pad = y == 255  # only padding is 255 here
        padded += int(pad.any())
        assert torch.all(x[:, pad] == 0)  # padded after normalisation: 0 = mean colour
    assert padded > 0


# ================================================================================================
# Sliding window
# ================================================================================================


def test_slide_windows_arithmetic():
    windows = common.slide_windows(
        512, 1024, 512, 341
    )  # Cityscapes at 1024x512 [C configs test_cfg]
    assert [(x1, x2) for _, _, x1, x2 in windows] == [(0, 512), (341, 853), (512, 1024)]
    assert all((y1, y2) == (0, 512) for y1, y2, _, _ in windows)
    bdd = common.slide_windows(720, 1280, 512, 341)
    assert len(bdd) == 8 and {(y1, y2) for y1, y2, _, _ in bdd} == {(0, 512), (208, 720)}
    odd = common.slide_windows(515, 700, 512, 341)
    assert {(y1, y2) for y1, y2, _, _ in odd} == {(0, 512), (3, 515)}
    assert {(x1, x2) for _, _, x1, x2 in odd} == {(0, 512), (188, 700)}


class PixelwiseModel(torch.nn.Module):
    """Position-independent stand-in: per-pixel mask logits (a 1x1 conv at full resolution) and
    constant class logits, in the output format of the Rein segmentor."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 5, 1)
        self.logits = torch.nn.Parameter(torch.randn(5, 20))

    def forward(self, images: torch.Tensor) -> dict:
        return {
            "pred_logits": self.logits[None].expand(images.shape[0], -1, -1),
            "pred_masks": self.conv(images),
        }


def test_slide_equals_whole_for_a_position_independent_model():
    model = PixelwiseModel()
    image = torch.randn(2, 3, 80, 144)
    whole = rein.segment(model, image)
    for window_batch in (1, 8):
        slide = rein.slide_segment(model, image, 64, 43, window_batch=window_batch)
        assert slide.shape == (2, 19, 80, 144)
        assert torch.allclose(slide, whole, atol=1e-6)


def test_segment_pads_sides_that_are_not_patch_multiples():
    model = tiny_model().eval()
    out = rein.segment(model, torch.randn(1, 3, 40, 70))
    assert out.shape == (1, 19, 40, 70) and torch.isfinite(out).all()


def test_eval_protocol_on_real_layouts(data_root, mapillary_tree):
    """Rein's per-target test resize [C configs/_base_/datasets/*.py]: Mapillary halved (image and
    label) then fit into (1024, 512); BDD fit into (1280, 720); Cityscapes into (1024, 512);
    labels keep their stored size; Mapillary uses Rein's 66 -> 19 table."""
    args = rein.parse_args(["--data", str(data_root)])
    ds = rein.eval_dataset("mapillary", args)
    assert len(ds) == 3
    for i in range(len(ds)):
        image, label, name = ds[i]
        h0, w0 = mapillary_tree.images[name].shape[:2]
        half = (h0 // 2, w0 // 2)
        assert tuple(label.shape) == half
        assert tuple(image.shape[-2:]) == common.fit_size(*half, 1024, 512)
        # [C mapillary_resize.py, then Resize (1024, 512)] 4:3 and portrait -> 683 x 512,
        # 16:9 -> 910 x 512
        assert min(image.shape[-2:]) == 512
        assert max(image.shape[-2:]) == (910 if w0 * 9 == h0 * 16 else 683)
        rein_ids = torch.from_numpy(mapillary_tree.extra["rein"][name]).long()
        _, want = common.resize_pair(torch.zeros(3, h0, w0, dtype=torch.uint8), rein_ids, half)
        assert torch.equal(label, want)
    for target, scale in (("bdd", (1280, 720)), ("cityscapes", (1024, 512))):
        raw = common.build_dataset(target, data_root, "val")
        image, label, _ = rein.eval_dataset(target, args)[0]
        raw_image, raw_label, _ = raw[0]
        assert torch.equal(label, raw_label)
        assert tuple(image.shape[-2:]) == common.fit_size(*raw_image.shape[-2:], *scale)


# ================================================================================================
# Command line: presets, validated numbers, what each source trains on
# ================================================================================================


def test_recipe_and_toy_presets_are_real_defaults():
    args = rein.parse_args(["--source", "gta"])
    assert (args.crop, args.batch_size, args.lr, args.warmup_iters, args.stride) == (
        512,
        4,
        1e-4,
        0,
        341,
    )
    assert args.targets == "cityscapes,bdd,mapillary" and args.backbone == "dinov2_l"
    assert args.iters == 40000 and args.num_points == 12544 and not args.amp
    acdc = rein.parse_args(["--recipe", "citys2acdc"])
    assert (acdc.source, acdc.crop, acdc.batch_size, acdc.lr, acdc.warmup_iters, acdc.stride) == (
        "cityscapes",
        1024,
        8,
        6e-5,
        10000,
        683,
    )
    assert acdc.targets.startswith("acdc-fog") and not hasattr(acdc, "find_unused")
    assert rein.FIND_UNUSED == {"gta512": False, "citys2acdc": True}
    # the stride follows the crop in force, also when the crop written equals another default
    assert rein.parse_args(["--recipe", "citys2acdc", "--crop", "512"]).stride == 341
    assert rein.parse_args(["--source", "toy", "--crop", "512"]).stride == 341
    assert rein.parse_args(["--source", "toy", "--crop", "64"]).stride == 43
    assert rein.parse_args(["--crop", "512", "--stride", "100"]).stride == 100
    toy = rein.parse_args(["--source", "toy", "--iters", "7"])
    got = (toy.backbone, toy.crop, toy.iters, toy.num_points, toy.lr, toy.inference, toy.stride)
    assert got == ("dinov2_s", 48, 7, 144, 5e-4, "whole", 32)
    assert (toy.rein_tokens, toy.fast, args.rein_tokens, args.fast) == (50, "on", 100, "auto")
    assert (toy.cpu_threads, toy.log_every, args.cpu_threads, args.log_every) == (0, 10, 0, 50)
    assert (toy.eval_batch_size, args.eval_batch_size) == (16, 1)
    assert toy.targets == "toy-city,toy-fog,toy-night"
    assert rein.parse_args(["--source", "toy", "--lr", "1e-4"]).lr == 1e-4
    assert rein.parse_args(["--recipe", "citys2acdc", "--source", "toy"]).crop == 48


def test_help_shows_the_defaults_of_the_chosen_preset(run_script):
    run = run_script("rein.py", "--recipe", "citys2acdc", "--help")
    assert run.returncode == 0
    text = " ".join(run.stdout.split())
    assert (
        "(default 683 = 2/3 of --crop" in text
        and "--crop CROP training crop size (default 1024" in text
    )
    toy = " ".join(run_script("rein.py", "--source", "toy", "--help").stdout.split())
    assert "(default 32 = 2/3 of --crop" in toy and "(default dinov2_s;" in toy


def one_error_line(run) -> str:
    """The run failed with exit code 2 and said why in one line of stderr, no traceback. (An
    open progress bar may precede the line on the terminal: split at carriage returns too.)"""
    assert run.returncode == 2, (run.stdout[-2000:], run.stderr[-2000:])
    assert "Traceback" not in run.stderr
    parts = re.split(r"[\r\n]", run.stderr)
    lines = [p[p.index("error: ") :] for p in parts if "error: " in p]
    assert len(lines) == 1, run.stderr
    return lines[0]


@pytest.mark.parametrize(
    "flags, expect",
    [
        (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["--iters", "-3"], "argument --iters: must be >= 1, got -3"),
        (["--rein-tokens", "0"], "argument --rein-tokens: must be >= 1, got 0"),
        (["--rein-rank", "0"], "argument --rein-rank: must be >= 1, got 0"),
        (["--stride", "0"], "argument --stride: must be >= 1, got 0"),
        (["--num-points", "-1"], "argument --num-points: must be >= 1, got -1"),
        (["--warmup-iters", "-1"], "argument --warmup-iters: must be >= 0, got -1"),
        (["--lr", "0"], "argument --lr: must be > 0.0, got 0"),
        (["--crop", "100"], "--crop 100 is not a multiple of the patch size 16; use e.g. 96"),
        (["--crop", "64", "--stride", "65"], "--stride 65 is larger than --crop 64"),
        (["--weight-decay", "-0.1"], "argument --weight-decay: must be >= 0.0, got -0.1"),
        (["--targets", ","], "--targets is empty"),
        (["--resume", "x.pt", "--official-ckpt", "y.pth"], "pass one of them"),
    ],
)
def test_impossible_numbers_and_flags_fail_in_one_line(run_script, tmp_path, flags, expect):
    run = run_script("rein.py", "--out", tmp_path / "out", *flags, cwd=tmp_path)
    assert expect in one_error_line(run)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_source_splits_rein_trains_on(data_root, gta5_tree, synthia_tree):
    """GTA5: every frame of images/ (list "all": 00003's label has another size and is skipped);
    Cityscapes: the train split; SYNTHIA: every frame, the val list notwithstanding."""

    def names(source: str) -> list[str]:
        args = rein.parse_args(["--source", source, "--data", str(data_root), "--crop", "64"])
        return sorted(image.stem for image, _ in rein.build_source(args).pairs)

    assert names("gta") == ["00001", "00002", "15188"]
    assert names("cityscapes") == ["aachen_000000_000019_leftImg8bit"]
    assert names("synthia") == sorted(synthia_tree.images)
    assert rein.SOURCE_SPLITS == {"gta": "train", "cityscapes": "train", "synthia": "all",
                                  "toy": "train"}  # fmt: skip


# ================================================================================================
# The script end to end on the toy data: train, checkpoint, evaluate, resume, fast path
# ================================================================================================

FAST = ["--source", "toy", "--pretrained", "none", "--device", "cpu", "--backbone", "test",
        "--crop", "64", "--batch-size", "2", "--num-points", "64", "--workers", "0",
        "--targets", "toy-night", "--cpu-threads", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def small_toy(toy_data, tmp_path_factory) -> pathlib.Path:
    """A --data root with the toy's marker and a few of its frames: 8 source images, 2 toy-night
    ones (the script checks the marker, then reads what the folders hold)."""
    src, dst = toy_data / "toy", tmp_path_factory.mktemp("small_toy") / "toy"
    names = [f"{i:05d}.png" for i in range(1, 9)]
    for folder in ("images", "labels"):
        (dst / "source" / folder).mkdir(parents=True)
        for name in names:
            shutil.copy(src / "source" / folder / name, dst / "source" / folder / name)
    (dst / "source" / "gtav_split_train.txt").write_text("\n".join(names) + "\n")
    for folder, suffix in (("leftImg8bit", "leftImg8bit"), ("gtFine", "gtFine_labelIds")):
        (dst / "night" / folder / "val" / "toy").mkdir(parents=True)
        for i in range(2):
            name = f"toy/toy_{i:06d}_000019_{suffix}.png"
            shutil.copy(
                src / "night" / folder / "val" / name, dst / "night" / folder / "val" / name
            )
    shutil.copy(src / "toy.json", dst / "toy.json")
    return dst.parent


def test_toy_targets_are_evaluated_at_half_size_like_cityscapes(small_toy):
    """gta512 evaluates Cityscapes at 1024x512, half its size; the Cityscapes-like toy targets
    (256x128) likewise at 128x64, scored against their full-size labels; citys2acdc at full size."""
    for recipe, size in (("gta512", (64, 128)), ("citys2acdc", (128, 256))):
        args = rein.parse_args(["--source", "toy", "--recipe", recipe, "--data", str(small_toy)])
        image, label, _ = rein.eval_dataset("toy-night", args)[0]
        raw_image, raw_label, _ = common.build_dataset("toy-night", small_toy, "val")[0]
        assert tuple(image.shape[-2:]) == size and torch.equal(label, raw_label)
        assert torch.equal(image, rein.mmcv_resize(raw_image, None, size)[0])


def trained(path: pathlib.Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def train_records(out: pathlib.Path) -> list[dict]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == "train"]


def test_script_trains_evaluates_resumes_exactly_and_fast_path_matches(
    run_script, small_toy, tmp_path, monkeypatch
):
    """The script as a process (the toy preset's --fast on: fused AdamW), 3 iterations; the same
    run in two pieces in-process; the plain path (--fast off) against it."""
    a = tmp_path / "a"
    full = run_script("rein.py", *FAST, "--data", small_toy, "--iters", "3", "--log-every", "1",
                      "--out", a)  # fmt: skip
    assert full.returncode == 0, full.stderr[-3000:]
    assert "Rein 388,609" not in full.stdout  # the test backbone, not ViT-S
    assert "trainable" in full.stdout and "toy-night 2 images" in full.stdout
    results = json.loads((a / "results.json").read_text())
    assert set(results) == {"toy-night"}
    assert 0 <= results["toy-night"]["miou"] <= 100
    assert set(results["toy-night"]["per_class_iou"]) == set(common.CLASS_NAMES)
    header = json.loads((a / "log.jsonl").read_text().splitlines()[0])
    toy_reins = rein.Reins(4, 32, token_length=50)  # the test VFM, the toy's 50 tokens
    assert header["parameters"]["rein"] == rein.rein_parameter_counts(toy_reins)["rein"]
    ckpt_a = trained(a / "last.pt")
    assert ckpt_a["method"] == "rein" and ckpt_a["iter"] == 3
    assert not any(k.startswith("backbone.vfm.") for k in ckpt_a["model"])

    # 1 iteration whose evaluation fails: its checkpoint was written before evaluating
    b = [*FAST, "--data", str(small_toy), "--log-every", "1", "--out", str(tmp_path / "b")]
    with monkeypatch.context() as patch:
        patch.setattr(rein, "evaluate", lambda *args: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            rein.main([*b, "--iters", "1"])
    assert trained(tmp_path / "b" / "last.pt")["iter"] == 1
    # resumed to 3 (in-process): bit-identical to the straight run
    last = str(tmp_path / "b" / "last.pt")
    rein.main([*b, "--iters", "3", "--resume", last])
    ckpt_b = trained(tmp_path / "b" / "last.pt")
    assert ckpt_b["iter"] == 3 and set(ckpt_b["model"]) == set(ckpt_a["model"])
    for k, v in ckpt_a["model"].items():
        assert torch.equal(v, ckpt_b["model"][k]), k
    losses = [r["loss"] for r in train_records(a)]
    assert [r["loss"] for r in train_records(tmp_path / "b")] == losses

    # resuming with another model-shaping flag, another frozen VFM, or nothing left to train
    with pytest.raises(common.CheckpointError, match="trained with --rein-tokens 50, this run"):
        rein.main([*b, "--iters", "4", "--resume", last, "--rein-tokens", "20"])
    with pytest.raises(common.UsageError, match="is at iteration 3 of --iters 3: nothing to train"):
        rein.main([*b, "--iters", "3", "--resume", last])
    with pytest.raises(common.CheckpointError, match="frozen VFM differs"):
        rein.main([*b, "--iters", "4", "--resume", last, "--seed", "1"])

    # The plain path: the first loss comes before any optimizer step and is equal. Later ones
    # may differ by rel 1e-2: fused AdamW's rounding (1e-9 of the weights, see the next test)
    # changes discrete choices downstream, which points PointRend's top-k keeps and which query
    # the Hungarian matcher picks among near-identical ones; each such choice moves the loss by
    # ~1e-3. Evaluating the fast run's checkpoint on the plain path gives the fast run's numbers.
    c = tmp_path / "c"
    rein.main([*FAST, "--data", str(small_toy), "--iters", "3", "--log-every", "1",
               "--fast", "off", "--out", str(c)])  # fmt: skip
    plain = [r["loss"] for r in train_records(c)]
    assert len(plain) == 3 and plain[0] == losses[0]
    assert losses == pytest.approx(plain, rel=1e-2)
    assert plain[2] < 0.95 * plain[0] and losses[2] < 0.95 * losses[0]  # both learn
    rein.main([*FAST, "--data", str(small_toy), "--eval-only", "--fast", "off",
               "--resume", str(a / "last.pt"), "--out", str(c)])  # fmt: skip
    assert json.loads((c / "results.json").read_text()) == results


def test_two_processes_equal_one(run_script, small_toy, tmp_path):
    """Global batch 2 as 1 process x 2 images and as 2 processes x 1 (Gloo): A2 = 1 process, 2
    iterations; A4 = A2 resumed to 4 on 1 process; B3 = A2 resumed to 3 on 2 processes; C4 = B3
    resumed to 4 on 1 process. A4 = C4: 2 processes train as 1, and checkpoints move between 1
    and 2 processes; B3 and C4 log the losses of A4. All 4 iterations are warm-up, whose lr does
    not depend on --iters (PolyLR's does: 2 -> 3 -> 4 would not be 2 -> 4). Two properties of the
    model at init set the flags: (1) Q/K projections of attention over near-identical queries get
    near-zero gradients, whose ~1e-7 float differences (a batch of 2 against 2 of 1, the
    all-reduce's sum) AdamW's normalisation turns into steps of up to ~lr: a small --lr keeps
    those under 1e-5; (2) LoRA tokens' queries start alike within ~1e-4, so their Hungarian
    matching would hang on such differences: full-rank tokens differ more."""
    flags = [*FAST, "--data", small_toy, "--crop", "32", "--num-points", "16", "--full-rank",
             "--warmup-iters", "10", "--lr", "1e-5", "--log-every", "1"]  # fmt: skip

    def one(out, iters, *more):
        run = run_script("rein.py", *flags, "--iters", iters, "--out", tmp_path / out, *more)
        assert run.returncode == 0, run.stderr[-3000:]
        return tmp_path / out

    a2 = one("a2", 2)
    a4 = one("a4", 4, "--resume", a2 / "last.pt")
    b = torchrun("rein.py", *flags, "--iters", 3, "--resume", a2 / "last.pt", "--out", "b3",
                 cwd=tmp_path)  # fmt: skip
    assert b.returncode == 0, b.stderr[-3000:]
    assert "(1 per process x 2)" in b.stdout
    c4 = one("c4", 4, "--resume", tmp_path / "b3" / "last.pt")
    assert max_tensor_diff(a4 / "last.pt", c4 / "last.pt") <= 1e-5
    # the Rein layer's tensors (no attention over queries) agree to ~1e-3 of their ~6e-6 steps
    rein_a, rein_c = (trained(x / "last.pt")["model"] for x in (a4, c4))
    assert all((rein_a[k] - rein_c[k]).abs().max() <= 1e-7 for k in rein_a if ".reins." in k)
    (a3,) = [r for r in train_records(a4) if r["iter"] == 3]
    (b3,) = train_records(tmp_path / "b3")
    assert b3["iter"] == 3
    for key in ("loss_ce", "loss_mask", "loss_dice"):
        assert b3[key] == pytest.approx(a3[key], abs=1e-5)
    assert b3["loss"] == pytest.approx(a3["loss"], rel=1e-6)  # ~110: 1e-5 is float32's step
    (a4_log,), (c4_log,) = train_records(a4)[-1:], train_records(c4)
    assert c4_log["iter"] == 4 and c4_log["loss"] == pytest.approx(a4_log["loss"], rel=1e-6)


def test_fused_adamw_step_equals_the_plain_step():
    """The fast path's only CPU switch: fused AdamW. One step from the same gradients gives the
    same weights up to rounding (the fused kernel orders its float operations differently)."""
    weights, init = {}, tiny_model()
    for fast in ("off", "on"):
        model = copy.deepcopy(init)
        args = rein.parse_args([*FAST, "--fast", fast])
        optimizer = rein.build_optimizer(model, args, common.Dist())
        assert optimizer.defaults["fused"] is (True if fast == "on" else None)
        torch.manual_seed(1)
        out = model(torch.randn(2, 3, 64, 64))
        targets = rein.semantic_to_targets(torch.randint(0, 8, (2, 64, 64)))
        sum(rein.build_criterion(64)(out, targets).values()).backward()
        optimizer.step()
        weights[fast] = rein.trainable_state(model)
    for k, v in weights["off"].items():
        assert torch.allclose(weights["on"][k], v, rtol=1e-6, atol=1e-9), k
    assert not torch.equal(
        weights["off"]["backbone.reins.scale"], tiny_model().backbone.reins.scale
    )


def test_compiled_model_checkpoints_without_prefixes(tmp_path):
    model = tiny_model()
    compiled = torch.compile(model, backend="eager")  # wraps only; nothing is compiled here
    optimizer = torch.optim.AdamW(rein.param_groups(compiled, 0.05))
    args = rein.parse_args(["--source", "toy", "--backbone", "test", "--out", str(tmp_path)])
    rein.save_checkpoint(args, 1, compiled, optimizer, None)
    ckpt = trained(tmp_path / "last.pt")
    assert set(ckpt["model"]) == set(rein.trainable_state(model))
    assert not any("_orig_mod" in k or k.startswith("module.") for k in ckpt["model"])


# ================================================================================================
# Bad inputs and faults: one line, exit code 2, nothing lost
# ================================================================================================


def test_divergence_stops_before_the_matcher(run_script, small_toy, tmp_path):
    run = run_script("rein.py", *FAST, "--data", small_toy, "--iters", "4", "--lr", "1e30",
                     "--out", tmp_path)  # fmt: skip
    line = one_error_line(run)
    assert "not finite" in line and "training stopped" in line and "lower --lr" in line
    assert "invalid numeric entries" not in run.stderr  # scipy never saw the NaNs
    assert not (tmp_path / "last.pt").exists()


def test_pretrained_auto_reads_timms_copy_from_the_hub_cache(tmp_path, monkeypatch):
    """--pretrained auto without checkpoints/<official file>: timm's model.safetensors from the
    hub cache (here timm's own ViT-S/14 at 56 px with random weights, in a cache laid out as
    huggingface_hub writes it), converted as the official file: patch 14 -> 16, position grid
    resampled. Offline and not cached: one line at once naming both files (exit 2)."""
    import huggingface_hub
    import timm
    from safetensors.torch import save_file

    name = rein.TIMM_WEIGHTS["dinov2_s"]
    assert name in timm.list_pretrained("*dinov2*")
    assert set(rein.TIMM_WEIGHTS.values()) <= set(timm.list_pretrained("*"))
    torch.manual_seed(0)
    sd = timm.create_model(name.split(".")[0], pretrained=False, img_size=56).state_dict()
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / f"models--timm--{name}"
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(sd, str(repo / "snapshots" / commit / "model.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.chdir(tmp_path)  # no checkpoints/ here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    args = rein.parse_args(["--backbone", "dinov2_s", "--pretrained", "auto", "--crop", "32"])
    vfm = rein.build_model(args).backbone.vfm
    assert torch.equal(vfm.blocks[3].attn.qkv.weight, sd["blocks.3.attn.qkv.weight"])
    assert torch.equal(vfm.blocks[11].ls2.gamma, sd["blocks.11.ls2.gamma"])
    patch = F.interpolate(sd["patch_embed.proj.weight"], size=(16, 16), mode="bicubic")
    assert torch.equal(vfm.patch_embed.proj.weight, patch)
    assert vfm.pos_embed.shape == (1, 1 + 2 * 2, 384)  # 4x4 -> 2x2 patch grid, class kept
    assert torch.equal(vfm.pos_embed[0, 0], sd["pos_embed"][0, 0])

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(common.UsageError) as error:
        rein.build_model(args)
    assert str(error.value) == (
        f"cannot download timm/{name}/model.safetensors (hub): HF_HUB_OFFLINE=1; put "
        "dinov2_vits14_pretrain.pth into checkpoints/, or pass --pretrained PATH, or "
        "--pretrained none for random init"
    )


def test_bad_targets_and_weights_fail_at_start(run_script, toy_data, tmp_path):
    base = [*FAST, "--data", toy_data, "--iters", "2", "--out", tmp_path / "out"]
    typo = run_script("rein.py", *base, "--targets", "toy-ctiy")
    assert "unknown toy target 'toy-ctiy'" in one_error_line(typo)
    # the default targets include Mapillary, which is often never downloaded
    missing = one_error_line(run_script("rein.py", *base, "--targets", "toy-night,mapillary"))
    assert missing.startswith("error: mapillary: missing validation/images/")
    nope = tmp_path / "nope.pth"
    weights = one_error_line(run_script("rein.py", *base, "--pretrained", nope))
    assert weights == (
        f"error: test weight file not found: {nope} (pass --pretrained PATH, or --pretrained "
        "none for random init)"
    )
    auto = one_error_line(run_script("rein.py", *base, "--pretrained", "auto"))
    assert "--backbone test has no official weights; use --pretrained none" in auto
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    garbage = run_script("rein.py", *base, "--official-ckpt", tmp_path / "garbage.pth")
    assert "cannot read Rein checkpoint" in one_error_line(garbage)
    torch.save({"method": "famix", "iter": 1, "args": {}}, tmp_path / "famix.pt")
    other = run_script("rein.py", *base, "--resume", tmp_path / "famix.pt")
    assert "is a famix checkpoint; rein.py needs one of its own" in one_error_line(other)
    assert not (tmp_path / "out" / "last.pt").exists()


def test_unused_flags_warn_in_one_line_and_out_folder_is_guarded(run_script, toy_data, tmp_path):
    (tmp_path / "a_file").write_text("x")
    run = run_script("rein.py", *FAST, "--data", toy_data, "--out", tmp_path / "a_file",
                     "--inference", "whole", "--stride", "20", "--full-rank", "--rein-rank", "8",
                     "--mapillary-map", "hrda")  # fmt: skip
    assert "is a file, not a folder" in one_error_line(run)
    warnings = [line for line in run.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: --stride 20 is not used: --inference whole has no windows",
        "warning: --rein-rank 8 is not used: --full-rank tokens have no rank",
        "warning: --mapillary-map hrda is not used: no mapillary target",
    ]
    (tmp_path / "run").mkdir()
    torch.save({}, tmp_path / "run" / "last.pt")
    again = run_script("rein.py", *FAST, "--data", toy_data, "--out", tmp_path / "run")
    assert "already holds a run" in one_error_line(again) and "--overwrite" in again.stderr


def test_corrupt_training_image_ends_in_one_line(run_script, small_toy, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_toy, data)
    for image in (data / "toy" / "source" / "images").glob("*.png"):
        image.write_bytes(image.read_bytes()[:200])  # header intact, pixels cut off
    run = run_script("rein.py", *FAST, "--data", data, "--iters", "2", "--out", tmp_path / "out")
    line = one_error_line(run)
    assert line.startswith(f"error: cannot read image {data / 'toy' / 'source' / 'images'}")
    assert "delete" in line and "to have it written again" in line
    assert not (tmp_path / "out" / "last.pt").exists()
    # an evaluation label that cannot be decoded stops the run at start
    label = sorted((data / "toy" / "night" / "gtFine").rglob("*_labelIds.png"))[0]
    label.write_bytes(b"not a png")
    run = run_script("rein.py", *FAST, "--data", data, "--out", tmp_path / "out2")
    assert one_error_line(run).startswith(f"error: cannot read label {label}")
    assert "Namespace" not in run.stdout and "parameters" not in run.stdout  # before the model


def test_bad_file_on_one_rank_stops_every_rank(small_toy, tmp_path):
    """Rank 1's first image is cut off: rank 1 says so in one line, rank 0 (waiting for it in the
    step's all-reduce) stops quietly, torchrun ends at once with a failure."""
    data = tmp_path / "data"
    shutil.copytree(small_toy, data)
    pairs = common.build_dataset("toy", data, "train").pairs
    order = common.epoch_indices(len(pairs), 0, 0, None)  # --seed 0; rank r reads position r
    image = pairs[order[1]][0]
    image.write_bytes(image.read_bytes()[:200])  # header intact, pixels cut off
    start = time.monotonic()
    run = torchrun("rein.py", *FAST, "--data", data, "--crop", "32", "--num-points", "16",
                   "--iters", "2", "--out", "out", cwd=tmp_path, timeout=120)  # fmt: skip
    seconds, output = time.monotonic() - start, run.stdout + run.stderr
    assert run.returncode != 0 and seconds < 60, (seconds, output[-3000:])
    lines = [p for p in re.split(r"[\r\n]", output) if "error: cannot read image" in p]
    assert len(lines) == 1 and str(image) in lines[0], output[-3000:]
    assert 'rein.py", line' not in output  # no traceback of the script itself
    assert not (tmp_path / "out" / "last.pt").exists()


# ================================================================================================
# Mask2Former block (declared copy; same tests as the block's own, run on rein.py's copy)
# ================================================================================================

CONVNEXT_L = [192, 384, 768, 1536]
RESNET = [256, 512, 1024, 2048]


def small_features(batch: int = 2, size: int = 64, channels=(8, 16, 32, 64)) -> list[torch.Tensor]:
    return [torch.randn(batch, c, size // s, size // s) for c, s in zip(channels, (4, 8, 16, 32))]


def test_block_markers_and_method_neutral():
    text = (ROOT / "rein.py").read_text()
    begin = "# ---- BEGIN Mask2Former (declared copy: identical in rein.py and clouds.py) ----"
    end = "# ---- END Mask2Former ----"
    assert text.count(begin) == 1 and text.count(end) == 1
    block = text[text.index(begin) + len(begin) : text.index(end)]
    lines = block.splitlines()
    assert lines[1].startswith("# Host-file imports:")
    assert not any(line.startswith(("import ", "from ")) for line in lines)
    assert "rein" not in block.lower() and "clouds" not in block.lower()


def test_parameter_counts_convnext_l():
    head = m2f.Mask2FormerHead(CONVNEXT_L)
    assert count(head) == 20_253_908  # trainable head of the official ConvNeXt-L model
    assert count(head.pixel_decoder) == 5_790_144
    assert count(head.pixel_decoder.encoder_layers[0]) == 732_192
    assert count(head.transformer_decoder) == 14_463_764
    layer = head.transformer_decoder.layers[0]
    assert count(layer.cross_attn) + count(layer.norm_cross) == 263_680
    assert count(layer.linear1) + count(layer.linear2) + count(layer.norm_ffn) == 1_051_392


def test_parameter_counts_resnet_and_external_queries():
    head = m2f.Mask2FormerHead(RESNET)
    assert count(head) == 20_499_668
    assert count(head.pixel_decoder) == 6_035_904
    no_queries = m2f.Mask2FormerHead(CONVNEXT_L, learned_queries=False, init="xavier_normal")
    assert count(no_queries) == 20_253_908 - 2 * 100 * 256
    assert not hasattr(no_queries.transformer_decoder, "query_feat")


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="init must be one of"):
        m2f.Mask2FormerHead(CONVNEXT_L, init="kaiming")
    with pytest.raises(ValueError, match="res2..res5"):
        m2f.MSDeformAttnPixelDecoder([192, 384, 768])


def test_output_shapes_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    head = m2f.Mask2FormerHead([8, 16, 32, 64], num_classes=19)
    features = small_features()
    mask_features, multi_scale = head.pixel_decoder(features)
    assert mask_features.shape == (2, 256, 16, 16)
    assert [tuple(x.shape) for x in multi_scale] == [(2, 256, 2, 2), (2, 256, 4, 4), (2, 256, 8, 8)]
    out = head(features)
    assert out["pred_logits"].shape == (2, 100, 20)
    assert out["pred_masks"].shape == (2, 100, 16, 16)
    assert len(out["aux_outputs"]) == 9
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, 100, 20)
        assert aux["pred_masks"].shape == (2, 100, 16, 16)
    labels = torch.randint(0, 19, (2, 64, 64))
    criterion = m2f.SetCriterion(num_points=64)
    sum(criterion(out, m2f.semantic_to_targets(labels)).values()).backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None]
    assert missing == []


def test_head_and_criterion_under_bf16_autocast():
    torch.manual_seed(0)
    head = m2f.Mask2FormerHead([8, 16, 32, 64])
    features = small_features(batch=1, size=32)
    targets = m2f.semantic_to_targets(torch.randint(0, 19, (1, 32, 32)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(features)
        losses = m2f.SetCriterion(num_points=32)(out, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_external_queries():
    torch.manual_seed(0)
    head = m2f.Mask2FormerHead([8, 16, 32, 64], learned_queries=False)
    features = small_features(batch=1)
    query_feat, query_pos = torch.randn(1, 7, 256), torch.randn(1, 7, 256)
    out = head(features, query_feat=query_feat, query_pos=query_pos)
    assert out["pred_logits"].shape == (1, 7, 20) and out["pred_masks"].shape == (1, 7, 16, 16)
    with pytest.raises(ValueError, match="pass query_feat and query_pos"):
        head(features)
    with pytest.raises(ValueError, match="learned queries"):
        m2f.Mask2FormerHead([8, 16, 32, 64])(features, query_feat, query_pos)


def test_msdeformattn_init_values():
    attn = m2f.MSDeformAttn()
    bias = attn.sampling_offsets.bias.detach().view(8, 3, 4, 2)  # (heads, levels, points, xy)
    k = torch.arange(1, 5, dtype=torch.float32)[:, None]
    for level in range(3):
        assert torch.allclose(bias[0, level], k * torch.tensor([1.0, 0.0]), atol=1e-6)
        assert torch.allclose(bias[1, level], k * torch.tensor([1.0, 1.0]), atol=1e-6)
        assert torch.allclose(bias[2, level], k * torch.tensor([0.0, 1.0]), atol=1e-6)
        assert torch.allclose(bias[4, level], k * torch.tensor([-1.0, 0.0]), atol=1e-6)
    assert torch.all(attn.sampling_offsets.weight == 0)
    assert torch.all(attn.attention_weights.weight == 0) and torch.all(
        attn.attention_weights.bias == 0
    )
    assert torch.all(attn.value_proj.bias == 0) and torch.all(attn.output_proj.bias == 0)
    decoder = m2f.MSDeformAttnPixelDecoder([8, 16, 32, 64])
    assert torch.equal(
        decoder.encoder_layers[3].self_attn.sampling_offsets.bias, attn.sampling_offsets.bias
    )
    assert torch.all(decoder.encoder_layers[3].self_attn.sampling_offsets.weight == 0)


def bilinear_zero_padded(image: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """image (D, H, W); (x, y) in [0, 1] with pixel centres at (j + 0.5)/W; outside pixels are 0."""
    _, h, w = image.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(image.shape[0], dtype=torch.float64)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * image[:, yy, xx].double()
    return out


def test_ms_deform_attn_matches_per_point_bilinear_reference():
    torch.manual_seed(0)
    shapes = [(3, 4), (2, 5)]
    b, m, d, lq, p = 2, 2, 3, 4, 2
    value = torch.randn(b, sum(h * w for h, w in shapes), m, d)
    locations = torch.rand(b, lq, m, len(shapes), p, 2) * 1.4 - 0.2  # some points outside the map
    weights = torch.rand(b, lq, m, len(shapes), p)
    out = m2f.ms_deform_attn(value, shapes, locations, weights)
    assert out.shape == (b, lq, m * d)
    starts = [0, shapes[0][0] * shapes[0][1]]
    for bi in range(b):
        for qi in range(lq):
            for mi in range(m):
                expected = torch.zeros(d, dtype=torch.float64)
                for li, (h, w) in enumerate(shapes):
                    level = value[bi, starts[li] : starts[li] + h * w, mi].T.reshape(d, h, w)
                    for pi in range(p):
                        x, y = locations[bi, qi, mi, li, pi].tolist()
                        expected += weights[bi, qi, mi, li, pi].item() * bilinear_zero_padded(
                            level, x, y
                        )
                got = out[bi, qi, mi * d : (mi + 1) * d].double()
                assert torch.allclose(got, expected, atol=1e-5)


def test_msdeformattn_is_fp32_under_autocast():
    torch.manual_seed(0)
    attn = m2f.MSDeformAttn(dim=32, num_heads=2, num_levels=1, num_points=2)
    shapes = [(4, 4)]
    ref = m2f.encoder_reference_points(shapes, torch.device("cpu"))
    x = torch.randn(1, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x, ref, x, shapes)
    assert out.dtype == torch.float32
    assert torch.allclose(out, attn(x, ref, x, shapes))


def test_encoder_reference_points_are_pixel_centres():
    ref = m2f.encoder_reference_points([(1, 2), (2, 1)], torch.device("cpu"))
    assert ref.shape == (1, 4, 2, 2)
    expected = torch.tensor([[0.25, 0.5], [0.75, 0.5], [0.5, 0.25], [0.5, 0.75]])  # (x, y)
    assert torch.equal(ref[0, :, 0], expected) and torch.equal(ref[0, :, 1], expected)


def test_position_embedding_hand_value():
    # mmdet SinePositionalEncoding(normalize=True, offset 0) computes the same code
    pos = m2f.PositionEmbeddingSine()(torch.zeros(3, 5, 4, 6))
    assert pos.shape == (1, 256, 4, 6)
    i, j = 2, 3  # row, column
    y = (i + 1) / (4 + 1e-6) * 2 * math.pi
    x = (j + 1) / (6 + 1e-6) * 2 * math.pi
    for k in (0, 1, 10, 11, 127):
        freq = 10000 ** (2 * (k // 2) / 128)
        trig = math.sin if k % 2 == 0 else math.cos
        assert pos[0, k, i, j].item() == pytest.approx(trig(y / freq), abs=1e-6)  # y first
        assert pos[0, 128 + k, i, j].item() == pytest.approx(trig(x / freq), abs=1e-6)


def test_attention_mask_rule():
    logits = torch.full((1, 2, 2, 2), -3.0)  # query 0 blocked everywhere
    logits[0, 1, 0, 1] = 2.0  # query 1 sees one position only
    mask = m2f.masked_attention_mask(logits, (2, 2), num_heads=3)
    assert mask.shape == (3, 2, 4) and mask.dtype == torch.bool
    for head in range(3):
        assert not mask[head, 0].any()  # fully blocked row unblocked entirely
        assert mask[head, 1].tolist() == [True, False, True, True]


def test_attention_mask_blocks_memory_per_image_and_head():
    torch.manual_seed(0)
    b, q, heads = 2, 3, 4
    logits = torch.randn(b, q, 2, 3) * 3  # (B, Q, h, w): 6 memory positions
    logits[1, 2] = -5.0  # fully blocked row -> attends everywhere
    mask = m2f.masked_attention_mask(logits, (2, 3), heads)
    layer = m2f.MaskedDecoderLayer(dim=32, num_heads=heads, ffn_dim=64)
    query, memory = torch.randn(b, q, 32), torch.randn(b, 6, 32)

    def attend(mem: torch.Tensor) -> torch.Tensor:
        return layer.cross_attn(query, mem, mem, attn_mask=mask, need_weights=False)[0]

    base = attend(memory)
    blocked = mask.view(b, heads, q, 6)[:, 0]  # (B, Q, S), same for every head
    assert torch.equal(mask.view(b, heads, q, 6), blocked[:, None].expand(-1, heads, -1, -1))
    for bi in range(b):
        for si in range(6):
            changed = memory.clone()
            changed[bi, si] += 10.0
            moved = (attend(changed)[bi] - base[bi]).abs().amax(-1) > 1e-5  # (Q,)
            assert moved.tolist() == (~blocked[bi, :, si]).tolist()


def test_decoder_init_distributions():
    bound = math.sqrt(6 / (256 + 768))  # Xavier bound of in_proj_weight (768, 256)
    uniform = m2f.MaskedAttentionDecoder(init="xavier_uniform").layers[0].cross_attn.in_proj_weight
    normal = m2f.MaskedAttentionDecoder(init="xavier_normal").layers[0].cross_attn.in_proj_weight
    assert uniform.abs().max() <= bound
    # ≈8 % of a N(0, bound/√3) lies beyond the bound
    assert (normal.abs() > bound).float().mean() > 0.05
    assert normal.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    ffn = (
        m2f.MSDeformAttnPixelDecoder([8, 16, 32, 64], init="xavier_normal")
        .encoder_layers[0]
        .linear1
    )
    assert (ffn.weight.abs() > math.sqrt(6 / (256 + 1024))).any()


def test_semantic_inference_hand_case():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]]])  # (B=1, Q=2, 2 classes + no-object)
    masks = torch.tensor([[[[0.0, 4.0]], [[-1.0, 1.0]]]])  # (1, 2, 1, 2)
    p = logits.softmax(-1)
    s = masks.sigmoid()
    expected = torch.empty(1, 2, 1, 2)
    for c in range(2):
        for w in range(2):
            expected[0, c, 0, w] = p[0, 0, c] * s[0, 0, 0, w] + p[0, 1, c] * s[0, 1, 0, w]
    out = m2f.semantic_inference(logits, masks)
    assert out.shape == (1, 2, 1, 2)
    assert torch.allclose(out, expected)


def test_semantic_to_targets():
    labels = torch.tensor([[[3, 3, 255], [0, 3, 7]], [[255, 255, 255], [255, 255, 255]]])
    first, empty = m2f.semantic_to_targets(labels)
    assert first["labels"].tolist() == [0, 3, 7]
    assert first["masks"].dtype == torch.float32
    assert first["masks"][1].tolist() == [[1, 1, 0], [0, 1, 0]]
    assert empty["labels"].numel() == 0 and empty["masks"].shape == (0, 2, 3)
    with pytest.raises(ValueError, match="train id"):
        m2f.semantic_to_targets(torch.tensor([[[19]]]))


def test_matcher_recovers_known_permutation():
    torch.manual_seed(0)
    size, classes = 16, [3, 7, 11]
    target_masks = torch.zeros(3, size, size)
    target_masks[0, :8, :8] = 1
    target_masks[1, :8, 8:] = 1
    target_masks[2, 8:, :] = 1
    perm = [4, 0, 2]  # target k is copied into query perm[k]
    logits = torch.zeros(1, 5, 20)
    logits[0, :, 19] = 5.0  # no-object everywhere unless overwritten
    masks = torch.full((1, 5, size, size), -20.0)
    for k, q in enumerate(perm):
        logits[0, q] = 0.0
        logits[0, q, classes[k]] = 10.0
        masks[0, q] = torch.where(target_masks[k] > 0, 20.0, -20.0)
    targets = [{"labels": torch.tensor(classes), "masks": target_masks}]
    ((rows, cols),) = m2f.HungarianMatcher(num_points=256)(logits, masks, targets)
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 4, 1: 0, 2: 2}
    assert rows.dtype == torch.int64


def test_matcher_follows_class_when_masks_are_uninformative():
    torch.manual_seed(0)
    target_masks = torch.zeros(2, 8, 8)
    target_masks[0, :, :4] = 1
    target_masks[1, :, 4:] = 1
    targets = [{"labels": torch.tensor([1, 2]), "masks": target_masks}]
    logits = torch.zeros(1, 2, 4)
    logits[0, 0, 2] = 6.0  # query 0 says class 2 (target 1)
    logits[0, 1, 1] = 6.0  # query 1 says class 1 (target 0)
    masks = torch.zeros(1, 2, 8, 8)  # identical masks: only the class term differs
    ((rows, cols),) = m2f.HungarianMatcher(num_points=64)(logits, masks, targets)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 1: 0}


def test_pairwise_costs_equal_per_pair_losses():
    torch.manual_seed(0)
    logits, targets = torch.randn(4, 30), (torch.rand(3, 30) > 0.5).float()
    bce = m2f.pairwise_bce_cost(logits, targets)
    dice = m2f.pairwise_dice_cost(logits, targets)
    for q in range(4):
        for k in range(3):
            assert bce[q, k] == pytest.approx(
                F.binary_cross_entropy_with_logits(logits[q], targets[k]).item(), abs=1e-5
            )
            assert dice[q, k] == pytest.approx(
                m2f.dice_loss(logits[q : q + 1], targets[k : k + 1], 1.0).item(), abs=1e-5
            )


def test_dice_loss_limits():
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    perfect = torch.tensor([[50.0, 50.0, -50.0, -50.0]])
    assert m2f.dice_loss(perfect, target, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    empty = torch.zeros(1, 4)
    assert m2f.dice_loss(torch.full((1, 4), -50.0), empty, 1.0).item() == pytest.approx(
        0.0, abs=1e-6
    )
    # all-wrong prediction of a 2-pixel mask: 1 − 1/(2 + 2 + 1)
    assert m2f.dice_loss(-perfect, target, 1.0).item() == pytest.approx(0.8, abs=1e-6)


def test_bce_hand_value():
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    softplus = lambda z: math.log1p(math.exp(z))  # noqa: E731  BCE(x, t) = softplus(x) − t·x
    mask0 = (softplus(0.0) + softplus(2.0)) / 2
    mask1 = (softplus(1.0) - 1.0 + softplus(-1.0) + 1.0) / 2
    got = m2f.sigmoid_bce_loss(logits, targets, num_masks=4.0).item()
    assert got == pytest.approx((mask0 + mask1) / 4, abs=1e-6)


def test_class_weight_vector_and_weighted_mean():
    criterion = m2f.SetCriterion()
    assert criterion.class_weight.tolist() == pytest.approx([1.0] * 19 + [0.1])
    small = m2f.SetCriterion(num_classes=2, eos_coef=0.1)
    logits = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.5, 0.5, 0.5]]])  # (1, 3, 2 + 1)
    targets = [{"labels": torch.tensor([1]), "masks": torch.ones(1, 2, 2)}]
    indices = [(torch.tensor([0]), torch.tensor([0]))]  # query 0 -> class 1; 1, 2 -> no-object
    logp = logits[0].log_softmax(-1)
    expected = -(1.0 * logp[0, 1] + 0.1 * logp[1, 2] + 0.1 * logp[2, 2]) / (1.0 + 0.1 + 0.1)
    weight_sum = m2f.global_counts(targets, 3, 0.1, torch.device("cpu"))[1]
    assert weight_sum == pytest.approx(1.0 + 0.1 + 0.1)
    assert small.loss_labels(logits, targets, indices, weight_sum).item() == pytest.approx(
        expected.item(), abs=1e-6
    )


def make_outputs(b=2, q=6, classes=4, h=8, w=8, requires_grad=False):
    def one():
        return {
            "pred_logits": torch.randn(b, q, classes + 1, requires_grad=requires_grad),
            "pred_masks": torch.randn(b, q, h, w, requires_grad=requires_grad),
        }

    out = one()
    out["aux_outputs"] = [one() for _ in range(9)]
    return out


def test_criterion_30_weighted_terms():
    torch.manual_seed(0)
    outputs = make_outputs()
    labels = torch.randint(0, 4, (2, 32, 32))
    labels[1, :16] = 255
    targets = m2f.semantic_to_targets(labels, num_classes=4)
    criterion = m2f.SetCriterion(num_classes=4, num_points=50)
    torch.manual_seed(1)
    losses = criterion(outputs, targets)
    suffixes = [""] + [f"_{i}" for i in range(9)]
    assert set(losses) == {f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in suffixes}
    assert len(losses) == 30
    # replay the same random draws term by term, unweighted, then apply 2/5/5
    torch.manual_seed(1)
    num_masks, weight_sum = m2f.global_counts(targets, 6, 0.1, torch.device("cpu"))
    assert num_masks == sum(len(t["labels"]) for t in targets)
    assert weight_sum == pytest.approx(num_masks + 0.1 * (2 * 6 - num_masks))
    total = 0.0
    for s, out in zip(suffixes, [outputs] + outputs["aux_outputs"]):
        indices = criterion.matcher(out["pred_logits"], out["pred_masks"], targets)
        mask, dice = criterion.loss_masks(out["pred_masks"], targets, indices, num_masks)
        ce = criterion.loss_labels(out["pred_logits"], targets, indices, weight_sum)
        target_classes = torch.full((2, 6), 4)  # no-object unless matched
        for b, (rows, cols) in enumerate(indices):
            target_classes[b, rows] = targets[b]["labels"][cols]
        logits = out["pred_logits"].transpose(1, 2)
        official = F.cross_entropy(logits, target_classes, criterion.class_weight)
        assert ce.item() == pytest.approx(official.item(), rel=1e-6)  # the official weighted mean

        assert losses["loss_ce" + s].item() == pytest.approx(2.0 * ce.item(), rel=1e-6)
        assert losses["loss_mask" + s].item() == pytest.approx(5.0 * mask.item(), rel=1e-6)
        assert losses["loss_dice" + s].item() == pytest.approx(5.0 * dice.item(), rel=1e-6)
        total += 2.0 * ce.item() + 5.0 * mask.item() + 5.0 * dice.item()
    assert sum(losses.values()).item() == pytest.approx(total, rel=1e-6)


def test_per_image_generators_make_a_batch_equal_its_images(monkeypatch):
    """With one generator per image, images [a, b] through one criterion call draw the same
    matcher points, the same mask-loss points and get the same matching per image as [a] and [b]
    through two calls: what makes 2 processes x 1 image train as 1 process x 2 images."""
    torch.manual_seed(0)
    outputs = make_outputs(b=2, q=6)
    labels = torch.randint(0, 4, (2, 32, 32))
    labels[0, :, :20] = 0  # image a: other classes (3 of 4) than image b, fewer masks
    labels[0, :, 20:] = torch.randint(1, 3, (32, 12))
    targets = m2f.semantic_to_targets(labels, num_classes=4)
    assert [len(t["labels"]) for t in targets] == [3, 4]
    criterion = m2f.SetCriterion(num_classes=4, num_points=50)
    draws, matches = [], []
    random_coords, matcher = m2f.random_coords, criterion.matcher

    def record_draw(counts, *args):
        coords = random_coords(counts, *args)
        draws.append(coords.split(list(counts)))  # per image
        return coords

    def record_match(*args):
        matches.append(matcher(*args))
        return matches[-1]

    monkeypatch.setattr(m2f, "random_coords", record_draw)
    monkeypatch.setattr(criterion, "matcher", record_match)

    def run(images, seeds):
        draws.clear(), matches.clear()
        view = {k: v[images] for k, v in outputs.items() if k != "aux_outputs"}
        view["aux_outputs"] = [
            {k: v[images] for k, v in aux.items()} for aux in outputs["aux_outputs"]
        ]
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        state = torch.get_rng_state()
        losses = criterion(view, [targets[i] for i in images], gens)
        assert torch.equal(torch.get_rng_state(), state)  # nothing drawn from the global RNG
        per_image = [[d[k] for d in draws] for k in range(len(images))]
        matched = [[m[k] for m in matches] for k in range(len(images))]
        return losses, per_image, matched

    both, both_draws, both_matches = run([0, 1], [10, 11])
    a, a_draws, a_matches = run([0], [10])
    b, b_draws, b_matches = run([1], [11])
    assert len(a_draws[0]) == 30  # matcher, candidates, fresh points for each of the 10 layers
    for one, pair in ((a_draws[0], both_draws[0]), (b_draws[0], both_draws[1])):
        assert all(torch.equal(x, y) for x, y in zip(one, pair, strict=True))
    for one, pair in ((a_matches[0], both_matches[0]), (b_matches[0], both_matches[1])):
        assert all(
            torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
            for x, y in zip(one, pair, strict=True)
        )
    # per-image terms: each loss times its normaliser adds up over the images
    norms = {n: m2f.global_counts([targets[i] for i in images], 6, 0.1, torch.device("cpu"))
             for n, images in (("both", [0, 1]), ("a", [0]), ("b", [1]))}  # fmt: skip
    for key in both:
        which = 1 if key.startswith("loss_ce") else 0
        total = a[key] * norms["a"][which] + b[key] * norms["b"][which]
        assert (both[key] * norms["both"][which]).item() == pytest.approx(total.item(), rel=1e-5)


def test_zero_target_batch():
    torch.manual_seed(0)
    outputs = make_outputs(requires_grad=True)
    targets = m2f.semantic_to_targets(torch.full((2, 32, 32), 255), num_classes=4)
    criterion = m2f.SetCriterion(num_classes=4, num_points=50)
    counts = m2f.global_counts(targets, 6, 0.1, torch.device("cpu"))
    assert counts == pytest.approx((1.0, 0.1 * 12))  # masks clamped to 1
    losses = criterion(outputs, targets)
    assert all(losses[k].item() == 0.0 for k in losses if not k.startswith("loss_ce"))
    no_object = torch.full((2, 6), 4)
    expected = F.cross_entropy(outputs["pred_logits"].transpose(1, 2), no_object)
    assert losses["loss_ce"].item() == pytest.approx(2.0 * expected.item(), rel=1e-6)
    sum(losses.values()).backward()  # mask terms stay in the graph with zero gradient
    assert torch.all(outputs["pred_masks"].grad == 0)
    labels = torch.full((2, 32, 32), 255)
    labels[1, :, :16] = 2
    indices = criterion.matcher(
        outputs["pred_logits"], outputs["pred_masks"], m2f.semantic_to_targets(labels, 4)
    )
    assert len(indices[0][0]) == 0 and len(indices[1][0]) == 1


def test_point_counts():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 12, 12)
    torch.manual_seed(5)
    coords = m2f.uncertain_point_coords(logits, 12544, oversample=3.0, importance=0.75)
    assert coords.shape == (2, 12544, 2)
    torch.manual_seed(5)
    candidates = torch.rand(2, 37632, 2)
    fresh = torch.rand(2, 3136, 2)
    assert torch.equal(coords[:, 9408:], fresh)
    distance = m2f.point_sample(logits, candidates).abs()[:, 0]  # (2, 37632)
    for i in range(2):
        picked = m2f.point_sample(logits[i : i + 1], coords[i : i + 1, :9408]).abs()[0, 0]
        # the 9,408 kept candidates are exactly the ones closest to the decision boundary
        assert picked.max() <= distance[i].sort().values[9407]
        kept = {tuple(c) for c in coords[i, :9408].tolist()}
        assert kept <= {tuple(c) for c in candidates[i].tolist()} and len(kept) == 9408


def test_bench_records_carry_flops_throughput_memory_and_shares(monkeypatch, capsys):
    monkeypatch.setitem(rein.BENCH_SETTINGS, "cpu", ("test", 1, 32, 64, (32, 48)))
    args = rein.parse_args(["--bench", "--device", "cpu"])
    rein.bench(args, common.Dist())
    records = {r["bench"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(records) == {"rein/train_step", "rein/slide_eval", "rein/msdeformattn_fwd_bwd"}
    for r in records.values():
        assert r["device"] == "cpu" and r["precision"] == "fp32" and r["step_s"] > 0
        assert r["gflop_per_step"] > 0 and r["gflops"] > 0 and r["peak_rss_mb"] > 0
        assert "mfu" not in r  # no peak on a CPU
    step = records["rein/train_step"]
    shares = [step[f"share_{k}"] for k in ("backbone", "msdeformattn", "loss")]
    assert all(0 < x < 1.5 for x in shares) and "shares_how" in step
    assert step["batch"] == 1 and step["crop"] == 32 and step["points"] == 64
    assert records["rein/slide_eval"]["windows"] == 2  # 32 x 48 in windows of 32, stride 21
