"""Tests of famix.py: architecture facts of the specification, one test per equation of the
method, official checkpoint names, and the script end to end on the toy data (CPU, random init).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import famix  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: one intra-op thread is as fast and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# =============================================================================================
# Architecture: parameter counts, shapes, dilation pattern (full sizes, meta device)
# =============================================================================================


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def meta_models() -> dict:
    """Full-size models on the meta device (shapes only, built once)."""
    with torch.device("meta"):
        return {
            b: (famix.FAMixSegmenter(b), famix.CLIPResNet(b, output_stride=32, attnpool=True))
            for b in ("RN50-quickgelu", "RN101-quickgelu")
        }


@pytest.mark.parametrize(
    "backbone, encoder, attnpool",
    [("RN50-quickgelu", 23_527_264, 14_789_632), ("RN101-quickgelu", 42_519_392, 13_740_544)],
)
def test_full_size_parameter_counts(meta_models, backbone, encoder, attnpool):
    model, clip_tower = meta_models[backbone]
    assert n_params(model.encoder) == encoder
    assert n_params(model.head) == 16_253_299
    assert n_params(model.encoder.layer4[2]) == 4_462_592
    assert n_params(model.encoder.layer4) == 14_964_736
    assert n_params(clip_tower.attnpool) == attnpool
    assert n_params(clip_tower) == encoder + attnpool
    famix.freeze(model, "layer4.2")  # GTA5 / SYNTHIA
    assert common.count_parameters(model) == (encoder + 16_253_299, 20_715_891)
    bn_affine = sum(
        p.numel()
        for m in model.encoder.layer4[2].modules()
        if isinstance(m, nn.BatchNorm2d)
        for p in m.parameters()
        if p.requires_grad
    )
    assert bn_affine == 6_144
    famix.freeze(model, "layer4")  # Cityscapes
    assert common.count_parameters(model)[1] == 31_218_035
    famix.freeze(model, "head")
    assert common.count_parameters(model)[1] == 16_253_299
    famix.freeze(model, "layer4.2")
    assert famix.FREEZE_BY_SOURCE == {
        "gta": "layer4.2",
        "synthia": "layer4.2",
        "cityscapes": "layer4",
        "toy": "layer4.2",
    }


def test_state_dict_names_and_shapes_equal_open_clip_visual_tower(meta_models):
    from open_clip.modified_resnet import ModifiedResNet

    for name, (_, ours) in meta_models.items():
        cfg = famix.BACKBONES[name]
        with torch.device("meta"):
            theirs = ModifiedResNet(list(cfg["layers"]), cfg["embed_dim"], cfg["heads"], 224, 64)
        a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        b = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
        assert a == b


@pytest.mark.parametrize("backbone", ["RN50-quickgelu", "RN101-quickgelu"])
@pytest.mark.parametrize("size", [512, 768])
def test_feature_shapes_output_stride_16(meta_models, backbone, size):
    model = meta_models[backbone][0]
    with torch.device("meta"):
        x = torch.empty(2, 3, size, size)
        enc = model.encoder
        f1 = enc.layer1(enc.stem(x))
        f2 = enc.layer2(f1)
        f3 = enc.layer3(f2)
        f4 = enc.layer4(f3)
        head_logits = model.head(f1, f4)
        out = model(x)
    s = size
    assert tuple(f1.shape) == (2, 256, s // 4, s // 4)
    assert tuple(f2.shape) == (2, 512, s // 8, s // 8)
    assert tuple(f3.shape) == (2, 1024, s // 16, s // 16)
    assert tuple(f4.shape) == (2, 2048, s // 16, s // 16)
    assert tuple(head_logits.shape) == (2, 19, s // 4, s // 4)
    assert tuple(out.shape) == (2, 19, s, s)


def test_dilation_pattern_of_official_make_layer(meta_models):
    os16, os32 = meta_models["RN101-quickgelu"][0].encoder, meta_models["RN101-quickgelu"][1]
    assert [b.conv2.dilation for b in os16.layer4] == [(1, 1), (1, 1), (2, 2)]
    assert [b.conv2.padding for b in os16.layer4] == [(1, 1), (1, 1), (2, 2)]
    assert all(
        b.conv2.dilation == (1, 1)
        for layer in (os16.layer1, os16.layer2, os16.layer3)
        for b in layer
    )
    assert isinstance(os16.layer4[0].avgpool, nn.Identity)  # no spatial pooling in layer4[0]
    assert isinstance(os16.layer4[0].downsample[0], nn.Identity)  # "-1" = AvgPool2d(1)
    assert isinstance(os16.layer3[0].avgpool, nn.AvgPool2d)
    assert os16.attnpool is None
    assert [b.conv2.dilation for b in os32.layer4] == [(1, 1)] * 3
    assert isinstance(os32.layer4[0].avgpool, nn.AvgPool2d)
    assert tuple(os32.attnpool.positional_embedding.shape) == (50, 2048)
    assert os32.embed_dim == 512


def test_encoder_reproduces_open_clip_image_tower_and_mining_path_is_7x7():
    clip = famix.load_clip("test", "none", seed=0).eval()
    state = famix.visual_state(clip, "test")
    tower = famix.CLIPResNet("test", output_stride=32, attnpool=True).eval()
    famix.load_state_strict(tower, state, "test")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = clip.visual(x)
        ours = tower.embed_low_level(tower.layer1(tower.stem(x)))
        # the mining path: a 56x56 layer1 patch -> 7x7 at layer4 (OS32) -> attnpool
        f4 = tower.layer4(tower.layer3(tower.layer2(torch.rand(3, 64, 56, 56))))
    assert torch.allclose(ours, ref, atol=1e-5)
    assert tuple(f4.shape[-2:]) == (7, 7)
    # the same weights load into the OS16 segmentation encoder (attnpool left out)
    seg = famix.FAMixSegmenter("test")
    famix.load_state_strict(
        seg.encoder, {k: v for k, v in state.items() if not k.startswith("attnpool.")}, "test"
    )


def test_head_init_kaiming_and_batchnorm_ones_zeros():
    torch.manual_seed(0)
    head = famix.DeepLabV3PlusHead(256, 2048, 256, 48)
    w = head.aspp.branches[1][0].weight  # 3x3 conv 2048 -> 256: std = sqrt(2 / fan_in)
    assert math.isclose(w.std().item(), math.sqrt(2 / (2048 * 9)), rel_tol=0.02)
    assert head.aspp.branches[1][0].dilation == (6, 6)
    assert [b[0].dilation for b in head.aspp.branches[1:]] == [(6, 6), (12, 12), (18, 18)]
    assert head.aspp.dropout.p == 0.1
    bns = [m for m in head.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)


# =============================================================================================
# Style mining: statistics, patches, dominant class, PIN
# =============================================================================================


def test_calc_mean_std_unbiased_with_eps():
    x = torch.tensor([[[[0.0, 2.0], [4.0, 6.0]]]])  # (1, 1, 2, 2): mean 3, unbiased var 20/3
    mu, sigma = famix.calc_mean_std(x)
    assert mu.shape == (1, 1, 1, 1)
    assert mu.item() == pytest.approx(3.0)
    assert sigma.item() == pytest.approx(math.sqrt(20 / 3 + 1e-5), rel=1e-6)


def test_patch_order_row_major_and_inverse():
    x = torch.arange(6 * 6, dtype=torch.float32).view(1, 1, 6, 6).repeat(2, 3, 1, 1)
    p = famix.patchify(x, 3)  # (2, 9, 3, 2, 2)
    assert p.shape == (2, 9, 3, 2, 2)
    # patch (r, c) = rows 2r..2r+1, cols 2c..2c+1; index r * 3 + c
    assert p[0, 5, 0].tolist() == [[16.0, 17.0], [22.0, 23.0]]  # r = 1, c = 2
    assert p[1, 6, 2].tolist() == [[24.0, 25.0], [30.0, 31.0]]  # r = 2, c = 0
    assert torch.equal(famix.unpatchify(p, 3), x)


def test_dominant_class_ties_and_void():
    patches = [
        [1, 1, 2, 2],  # tie between classes -> the smaller id
        [255, 255, 4, 4],  # tie class / void -> the class (255 is the largest id)
        [255, 255, 255, 7],  # void majority -> 255
        [0, 3, 3, 3],
        [9, 9, 9, 9],
        [18, 18, 0, 255],
        [5, 6, 7, 8],  # all different -> smallest
        [255, 255, 255, 255],
        [12, 255, 12, 11],
    ]
    labels = torch.zeros(1, 6, 6, dtype=torch.long)
    for i, values in enumerate(patches):
        r, c = divmod(i, 3)
        labels[0, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2] = torch.tensor(values).view(2, 2)
    dom = famix.dominant_classes(labels, 3)
    assert dom.tolist() == [[1, 4, 255, 3, 9, 18, 5, 255, 12]]
    # torch.mode on random labels (with void) agrees
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (3, 24, 24), generator=g)
    labels[labels == 5] = 255
    ref = famix.patchify(labels[:, None], 3).flatten(2).mode(-1).values
    assert torch.equal(famix.dominant_classes(labels, 3), ref)


def test_one_patch_per_class_in_patch_major_order():
    dom = torch.tensor(
        [
            [5, 5, 255, 1, 1, 1, 1, 1, 1],  # image 0
            [3, 5, 5, 255, 1, 1, 1, 1, 1],
        ]
    )  # image 1
    b, p, cls = famix.first_patch_per_class(dom)
    # flat order p * B + b: (p0,b0)=5, (p0,b1)=3, (p1,b0)=5, (p1,b1)=5, (p2,b0)=255, ...
    got = {c: (bi, pi) for bi, pi, c in zip(b.tolist(), p.tolist(), cls.tolist())}
    assert got == {1: (0, 3), 3: (1, 0), 5: (0, 0), 255: (0, 2)}


def test_prompts_and_text_targets_unit_norm():
    rng = random.Random(0)
    assert famix.style_prompt(255, rng) == "photo"
    prompt = famix.style_prompt(6, rng)
    assert prompt.endswith(" style traffic light")
    assert prompt[: -len(" traffic light")] in famix.STYLE_PROMPTS
    assert len(famix.STYLE_PROMPTS) == 20 and len(famix.TEMPLATES) == 80
    assert (
        famix.TEMPLATES[0] == "a bad photo of a {}."
        and famix.TEMPLATES[-1] == "a tattoo of the {}."
    )

    class FakeCLIP:  # encode_text = embedding of the first token id, to check the averaging
        def encode_text(self, tokens):
            return torch.stack([torch.tensor([float(t[1]), 1.0]) for t in tokens])

    def tokenizer(texts):
        return torch.tensor([[0, len(t), 0] for t in texts])

    templates = ("{}", "a {} b")  # lengths L and L + 4 -> mean L + 2, then normalise
    t = famix.encode_prompts(FakeCLIP(), tokenizer, ["ab", "abcd"], templates, torch.device("cpu"))
    assert torch.allclose(t, F.normalize(torch.tensor([[4.0, 1.0], [6.0, 1.0]]), dim=-1))


def test_pin_is_identity_at_init():
    torch.manual_seed(0)
    patches = F.relu(torch.randn(3, 8, 5, 5))  # post-ReLU layer1 patches
    seen = []

    def embed(styled):
        seen.append(styled.detach().clone())
        return styled.mean((2, 3))

    targets = F.normalize(torch.randn(3, 8), dim=-1)
    mu, _, _ = famix.pin_optimize(
        patches, targets, embed, iters=1, lr=1.0, momentum=0.9, weight_decay=1e-4
    )
    assert torch.allclose(seen[0], patches, atol=1e-6)  # the first forward sees the input itself
    mu0, sigma0 = famix.calc_mean_std(patches)
    mu_i, sigma_i, _ = famix.pin_optimize(patches, targets, embed, 0, 1.0, 0.9, 1e-4)
    assert torch.equal(mu_i, mu0.flatten(1)) and torch.equal(sigma_i, sigma0.flatten(1))
    assert not torch.allclose(mu, mu0.flatten(1))  # one step moved the statistics


def test_pin_reduces_one_minus_cosine_on_a_fixed_target():
    torch.manual_seed(0)
    patches = F.relu(torch.randn(3, 8, 6, 6))
    proj = torch.randn(8, 5)
    targets = F.normalize(torch.randn(3, 5), dim=-1)

    def embed(styled):  # a fixed differentiable "image encoder"
        return styled.mean((2, 3)) @ proj

    _, _, losses = famix.pin_optimize(
        patches, targets, embed, iters=30, lr=1.0, momentum=0.9, weight_decay=1e-4
    )
    assert losses[-1] < 0.5 * losses[0]


def test_pin_gradient_flows_through_the_frozen_clip_tower():
    torch.manual_seed(0)
    tower = famix.CLIPResNet("test", output_stride=32, attnpool=True).eval().requires_grad_(False)
    patches = F.relu(torch.randn(2, 64, 8, 8))
    targets = F.normalize(torch.randn(2, tower.embed_dim), dim=-1)

    def embed(styled):
        return tower.embed_low_level(F.adaptive_avg_pool2d(styled, 56))

    mu, _, losses = famix.pin_optimize(
        patches, targets, embed, iters=2, lr=1.0, momentum=0.9, weight_decay=1e-4
    )
    assert losses[1] < losses[0]
    assert not torch.allclose(mu, famix.calc_mean_std(patches)[0].flatten(1))
    assert all(p.grad is None for p in tower.parameters())


# =============================================================================================
# Style banks and patch-wise mixing
# =============================================================================================


def test_style_bank_sampling_and_fallbacks():
    mu = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    cls = torch.tensor([2, 255, 2, 7])  # class 2: rows 0, 2; void: row 1; class 7: row 3
    bank = famix.StyleBank(mu, mu + 10, cls)
    torch.manual_seed(0)
    dom = torch.tensor([[2] * 50, [7] * 50, [4] * 50])  # 4 has no bank -> void bank
    mu_t, sigma_t = bank.sample(dom)
    assert set(mu_t[0].flatten().tolist()) == {0.0, 2.0}
    assert set(mu_t[1].flatten().tolist()) == {3.0}
    assert set(mu_t[2].flatten().tolist()) == {1.0}
    assert torch.equal(sigma_t, mu_t + 10)
    no_void = famix.StyleBank(mu[:1], mu[:1], torch.tensor([2]))  # empty void -> whole bank
    assert no_void.sample(torch.tensor([[4]]))[0].item() == 0.0


def test_mixing_with_s_one_returns_the_input():
    torch.manual_seed(0)
    f = F.relu(torch.randn(2, 8, 12, 12))
    patches = famix.patchify(f, 3)
    mu_s, sigma_s = famix.calc_mean_std(patches)
    x_hat = (patches - mu_s) / sigma_s
    mu_t, sigma_t = torch.rand_like(mu_s) * 5, torch.rand_like(sigma_s) * 5
    s = torch.ones(2, 1, 8, 1, 1)
    out = famix.unpatchify(F.relu(famix.mix_statistics(x_hat, mu_s, sigma_s, mu_t, sigma_t, s)), 3)
    assert torch.allclose(out, f, atol=1e-5)


def test_mixing_with_s_zero_gives_the_target_statistics():
    torch.manual_seed(0)
    patches = famix.patchify(F.relu(torch.randn(2, 8, 12, 12)), 3)
    mu_s, sigma_s = famix.calc_mean_std(patches)
    x_hat = (patches - mu_s) / sigma_s
    mu_t, sigma_t = torch.randn_like(mu_s), torch.rand_like(sigma_s) + 0.5
    pre = famix.mix_statistics(x_hat, mu_s, sigma_s, mu_t, sigma_t, torch.zeros(2, 1, 8, 1, 1))
    mu_o, sigma_o = famix.calc_mean_std(pre, eps=0.0)
    assert torch.allclose(mu_o, mu_t, atol=1e-5)
    assert torch.all(sigma_o <= sigma_t) and torch.allclose(sigma_o, sigma_t, rtol=1e-3)
    # s = 1/2: halfway between source and target statistics
    half = famix.mix_statistics(
        x_hat, mu_s, sigma_s, mu_t, sigma_t, torch.full((2, 1, 8, 1, 1), 0.5)
    )
    assert torch.allclose(famix.calc_mean_std(half)[0], (mu_s + mu_t) / 2, atol=1e-5)


def test_stylize_pure_uses_the_style_of_each_patch_dominant_class():
    torch.manual_seed(0)
    c = 4
    # one style per class: mean 10 + class (large, so the ReLU is a no-op), sigma 0.5
    classes = torch.tensor([0, 1, 2, 3, 255])
    mu = (10.0 + classes.clamp(max=20).float())[:, None].repeat(1, c)
    bank = famix.StyleBank(mu, torch.full((5, c), 0.5), classes)
    labels = torch.tensor([[0, 1, 2], [3, 255, 9], [1, 1, 0]]).repeat_interleave(16, 0)
    labels = labels.repeat_interleave(16, 1)  # (48, 48): label patch (r, c) = 16x16 block
    f1 = torch.rand(1, c, 12, 12) + 0.1  # post-ReLU-like, never constant on a patch
    out = famix.stylize(f1, labels[None], bank, "pure", grid=3, beta=0.1, noise_snr=15.0)
    mu_o, sigma_o = famix.calc_mean_std(famix.patchify(out, 3))
    expected = [10, 11, 12, 13, 30, 30, 11, 11, 10]  # class 9 has no bank -> void bank (10 + 20)
    assert torch.allclose(
        mu_o[0, :, :, 0, 0], torch.tensor(expected).float()[:, None].expand(9, c), atol=1e-4
    )
    assert torch.allclose(sigma_o, torch.full_like(sigma_o, 0.5), atol=1e-3)


def test_stylize_mixing_weights_are_beta_per_image_and_channel_shared_over_patches(monkeypatch):
    drawn = []
    original = famix.mix_statistics

    def spy(x_hat, mu_s, sigma_s, mu_t, sigma_t, s):
        drawn.append(s)
        return original(x_hat, mu_s, sigma_s, mu_t, sigma_t, s)

    monkeypatch.setattr(famix, "mix_statistics", spy)
    torch.manual_seed(0)
    bank = famix.StyleBank(torch.rand(3, 16), torch.rand(3, 16), torch.tensor([0, 1, 255]))
    f1 = F.relu(torch.randn(64, 16, 6, 6))
    labels = torch.zeros(64, 24, 24, dtype=torch.long)
    famix.stylize(f1, labels, bank, "famix", grid=3, beta=0.1, noise_snr=15.0)
    s = drawn[0]
    assert s.shape == (64, 1, 16, 1, 1)  # (B, 1 = shared by the 9 patches, C, 1, 1)
    s = s.flatten()
    assert torch.all((s >= 0) & (s <= 1))
    extreme = ((s < 0.05) | (s > 0.95)).float().mean().item()
    assert 0.65 < extreme < 0.85  # Beta(0.1, 0.1) is U-shaped: about 75 % of draws are extreme


def test_ablation_targets_mixstyle_and_noise():
    torch.manual_seed(0)
    mu_s, sigma_s = torch.rand(4, 9, 8, 1, 1) + 1, torch.rand(4, 9, 8, 1, 1) + 1
    mu_t, _ = famix.target_statistics("mixstyle", mu_s, sigma_s, None, None, 3, 15.0)
    perm = [int((mu_s[:, 0, 0] == m).nonzero()[0, 0]) for m in mu_t[:, 0, 0]]
    assert sorted(perm) == [0, 1, 2, 3] and torch.equal(mu_t, mu_s[perm])
    mu_s = torch.rand(16, 9, 64, 1, 1) + 1
    mu_n, _ = famix.target_statistics("noise", mu_s, mu_s, None, None, 3, 10.0)
    # per patch: noise power / signal power (mean square over channels) = 10^(-10 dB / 10)
    ratio = (mu_n - mu_s).pow(2) / mu_s.pow(2).mean(2, keepdim=True)
    assert ratio.mean().item() == pytest.approx(0.1, rel=0.08)


# =============================================================================================
# Loss, schedule, freezing
# =============================================================================================


def schedule_args(**kw) -> argparse.Namespace:
    return argparse.Namespace(
        **{
            "iters": 40000,
            "poly_power": 0.9,
            "min_lr": 1e-6,
            "lr": 0.1,
            "backbone_lr": 0.01,
            "momentum": 0.9,
            "weight_decay": 1e-4,
            **kw,
        }
    )


def test_poly_lr_values_and_param_groups():
    model = famix.FAMixSegmenter("test")
    famix.freeze(model, "layer4.2")
    args = schedule_args()
    opt = famix.build_optimizer(model, args)
    enc, head = opt.param_groups
    assert sum(p.numel() for p in enc["params"]) == n_params(model.encoder.layer4[2])
    assert sum(p.numel() for p in head["params"]) == n_params(model.head)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 1e-4
    for t, head_lr in [
        (0, 0.1),
        (20000, 0.1 * 0.5**0.9),
        (39999, 0.1 * (1 / 40000) ** 0.9),
        (40000, 1e-6),
    ]:
        famix.set_lr(opt, t, args)
        assert head["lr"] == pytest.approx(head_lr, rel=1e-9)
        assert enc["lr"] == pytest.approx(max(head_lr / 10, 1e-6), rel=1e-9)
    famix.set_lr(opt, 20000, args)
    assert round(head["lr"], 5) == 0.05359


def test_loss_is_cross_entropy_with_label_smoothing_and_ignore():
    torch.manual_seed(0)
    logits = torch.randn(2, 19, 3, 3)
    labels = torch.randint(0, 19, (2, 3, 3))
    labels[0, 0] = 255
    logp = logits.log_softmax(1).permute(0, 2, 3, 1)[labels != 255]  # (N, 19)
    y = labels[labels != 255]
    nll = -logp[torch.arange(len(y)), y]
    expected = (0.9 * nll - 0.1 * logp.mean(1)).mean()
    assert famix.segmentation_loss(logits, labels, 0.1).item() == pytest.approx(
        expected.item(), rel=1e-5
    )


def test_training_step_keeps_frozen_batchnorm_and_weights_and_stores_no_frozen_activations():
    torch.manual_seed(0)
    model = famix.FAMixSegmenter("test")
    famix.freeze(model, "layer4.2")
    famix.set_train_mode(model)
    # make the running statistics non-trivial so a silent update would show
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = {id(p) for p in [*model.encoder.layer4[2].parameters(), *model.head.parameters()]}
    seen = {}
    model.encoder.layer3.register_forward_hook(lambda m, i, o: seen.update(l3=o.requires_grad))
    opt = famix.build_optimizer(model, schedule_args())
    bank = famix.StyleBank(torch.rand(4, 64), torch.rand(4, 64) + 0.5, torch.tensor([0, 1, 2, 255]))
    images, labels = torch.randn(2, 3, 48, 48), torch.randint(0, 3, (2, 48, 48))
    hook = lambda f1: famix.stylize(f1, labels, bank, "famix", 3, 0.1, 15.0)  # noqa: E731
    loss = famix.segmentation_loss(model(images, stylize=hook), labels, 0.1)
    loss.backward()
    opt.step()
    assert seen["l3"] is False  # the frozen part ran under no_grad
    after = model.state_dict()
    frozen_bn = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d) and not n.startswith(("encoder.layer4.2.", "head."))
    ]
    assert len(frozen_bn) > 10
    for name in frozen_bn:
        assert not model.get_submodule(name).training
        assert torch.equal(after[f"{name}.running_mean"], before[f"{name}.running_mean"])
    for name in ("encoder.layer4.2.bn1", "encoder.layer4.2.bn3", "head.aspp.project.1"):
        assert model.get_submodule(name).training
        assert not torch.equal(after[f"{name}.running_mean"], before[f"{name}.running_mean"])
    for name, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == (id(p) in trained), name
        if id(p) not in trained:
            assert p.grad is None


def test_full_fine_tuning_switch_trains_everything():
    model = famix.FAMixSegmenter("test")
    famix.freeze(model, "none")
    famix.set_train_mode(model)
    assert all(m.training for m in model.modules())
    assert common.count_parameters(model)[0] == common.count_parameters(model)[1]
    seen = {}
    model.encoder.layer3.register_forward_hook(lambda m, i, o: seen.update(l3=o.requires_grad))
    model(torch.randn(2, 3, 48, 48))
    assert seen["l3"] is True


# =============================================================================================
# Official checkpoints
# =============================================================================================


class _OfficialHead(nn.Module):
    """The official DeepLabHeadV3Plus module layout (VainF naming), built here only for names."""

    def __init__(self, low: int, high: int, aspp: int, proj: int, n: int = 19):
        super().__init__()

        def cbr(cin, cout, k, d=1):
            return [
                nn.Conv2d(cin, cout, k, padding=d * (k // 2), dilation=d, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            ]

        self.project = nn.Sequential(*cbr(low, proj, 1))
        self.aspp = nn.Module()
        self.aspp.convs = nn.ModuleList(
            [nn.Sequential(*cbr(high, aspp, 1))]
            + [nn.Sequential(*cbr(high, aspp, 3, r)) for r in (6, 12, 18)]
            + [nn.Sequential(nn.AdaptiveAvgPool2d(1), *cbr(high, aspp, 1))]
        )
        self.aspp.project = nn.Sequential(*cbr(5 * aspp, aspp, 1), nn.Dropout(0.1))
        self.classifier = nn.Sequential(*cbr(proj + aspp, aspp, 3), nn.Conv2d(aspp, n, 1))


def official_state_from(model: famix.FAMixSegmenter, backbone: str) -> dict:
    """Our weights under the official names, copied by registration order (same layout)."""
    cfg = famix.BACKBONES[backbone]
    official = nn.Module()
    official.backbone = famix.CLIPResNet(backbone, output_stride=16)
    official.classifier = _OfficialHead(
        cfg["width"] * 4, cfg["width"] * 32, cfg["aspp"], cfg["low_proj"]
    )
    names = list(official.state_dict())
    ours = list(model.state_dict().items())
    assert len(names) == len(ours)
    state = {}
    for name, (_, value) in zip(names, ours):
        assert tuple(official.state_dict()[name].shape) == tuple(value.shape), name
        state[name] = value.clone()
    return state


def test_official_checkpoint_names_load_with_no_missing_keys_and_same_logits():
    torch.manual_seed(0)
    a = famix.FAMixSegmenter("RN50-quickgelu").eval()
    state = official_state_from(a, "RN50-quickgelu")
    for key in (
        "backbone.layer4.2.conv2.weight",
        "classifier.project.0.weight",
        "classifier.aspp.convs.4.1.weight",
        "classifier.aspp.convs.4.2.running_var",
        "classifier.aspp.project.0.weight",
        "classifier.classifier.3.bias",
    ):
        assert key in state
    b = famix.FAMixSegmenter("RN50-quickgelu").eval()
    famix.load_state_strict(
        b, famix.map_official_state(state), "official"
    )  # raises on any mismatch
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert famix.backbone_of_state(famix.map_official_state(state), "encoder.") == "RN50-quickgelu"


def test_sniff_weights_kinds_and_errors(tmp_path):
    official = tmp_path / "best_deeplabv3plus_resnet_clip_gta5.pth"
    torch.save(
        {
            "cur_itrs": 40000,
            "model_state": {"backbone.conv1.weight": torch.zeros(1)},
            "optimizer_state": {},
            "scheduler_state": {},
            "best_score": np.float64(0.4815),  # a numpy scalar, as in the official files
        },
        official,
    )
    assert famix.sniff_weights(str(official))[0] == "official"
    clip_sd = tmp_path / "clip.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1)}, clip_sd)
    assert famix.sniff_weights(str(clip_sd))[0] == "clip"
    other = tmp_path / "rein.pt"
    torch.save({"method": "rein", "model": {}}, other)
    with pytest.raises(common.CheckpointError, match="rein checkpoint"):
        famix.sniff_weights(str(other))
    garbage = tmp_path / "notes.txt"
    garbage.write_text("not weights")
    with pytest.raises(common.CheckpointError, match="cannot read"):
        famix.sniff_weights(str(garbage))


# =============================================================================================
# The script on the toy data
# =============================================================================================

FAST = ["--source", "toy", "--pretrained", "none", "--crop", "48", "--batch-size", "2",
        "--targets", "toy-city", "--mine-batches", "1", "--mine-batch-size", "4",
        "--pin-iters", "2", "--templates", "1"]  # fmt: skip


def run_script(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny model: one thread, robust to busy CPUs
    return subprocess.run(
        [sys.executable, str(ROOT / "famix.py"), *args],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_script_mines_trains_evaluates_and_writes_results(toy_data, tmp_path):
    out = tmp_path / "run"
    proc = run_script([*FAST, "--data", str(toy_data), "--out", str(out), "--iters", "2"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mining batch 1/1" in proc.stdout
    assert "1,300,083 trainable" in proc.stdout  # printed parameter counts (test size)
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"source-val", "toy-city"}
    for r in results.values():
        assert 0 <= r["miou"] <= 100 and set(r["per_class_iou"]) == set(common.CLASS_NAMES)
    header = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert header["params_trainable"] == 1_300_083 and header["args"]["backbone"] == "test"
    bank = torch.load(out / "style_bank.pt", weights_only=True)
    assert bank["mu"].shape[1] == 64 and len(bank["cls"]) == len(bank["mu"]) > 0
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["method"] == "famix" and ckpt["iter"] == 2
    assert not any(k.startswith("module.") for k in ckpt["model"])


def test_resume_continues_bit_exactly(toy_data, tmp_path):
    bank = tmp_path / "bank.pt"
    common_args = [*FAST, "--data", str(toy_data), "--style-bank", str(bank), "--eval-every", "0",
                   "--targets", ""]  # fmt: skip
    famix.main([*common_args, "--out", str(tmp_path / "mine"), "--mine", "only"])
    famix.main([*common_args, "--out", str(tmp_path / "full"), "--iters", "2"])
    famix.main([*common_args, "--out", str(tmp_path / "part"), "--iters", "1"])
    famix.main(
        [
            *common_args,
            "--out",
            str(tmp_path / "part"),
            "--iters",
            "2",
            "--resume",
            str(tmp_path / "part" / "last.pt"),
        ]
    )
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    part = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    assert full["iter"] == part["iter"] == 2
    for key, value in full["model"].items():
        assert torch.equal(value, part["model"][key]), key
    init = famix.FAMixSegmenter("test").state_dict()
    assert not torch.equal(full["model"]["head.classifier.weight"], init["head.classifier.weight"])


def test_eval_only_with_an_official_checkpoint_matches_our_model(data_root, tmp_path, capsys):
    torch.manual_seed(0)
    model = famix.FAMixSegmenter("test")
    for m in model.modules():  # non-trivial BN statistics, as in a trained model
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
    path = tmp_path / "official.pth"
    torch.save({"cur_itrs": 1, "model_state": official_state_from(model, "test"),
                "optimizer_state": {}, "scheduler_state": {}, "best_score": np.float64(0.1)},
               path)  # fmt: skip
    argv = ["--source", "cityscapes", "--data", str(data_root), "--out", str(tmp_path / "ev"),
            "--eval-only", "--pretrained", str(path), "--targets", "bdd,acdc-fog",
            "--backbone", "test", "--workers", "0"]  # fmt: skip
    famix.main(argv)
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert set(results) == {"bdd", "acdc-fog"}
    assert "acdc-fog" in capsys.readouterr().out
    args = famix.build_parser().parse_args(argv)
    sets = {n: famix.eval_dataset(n, args) for n in ("bdd", "acdc-fog")}
    famix.freeze(model, "layer4.2")
    expected = famix.evaluate(model, sets, args, common.Dist(), contextlib.nullcontext)
    for name in sets:
        assert results[name]["miou"] == expected[name]["miou"]
        assert results[name]["per_class_iou"] == expected[name]["per_class_iou"]


def test_bad_inputs_give_one_clear_message(toy_data, tmp_path):
    with pytest.raises(common.UsageError, match="gta"):  # missing data
        famix.main(
            [
                "--source",
                "gta",
                "--data",
                str(tmp_path / "nothing"),
                "--pretrained",
                "none",
                "--backbone",
                "test",
                "--out",
                str(tmp_path / "o1"),
            ]
        )
    with pytest.raises(common.UsageError, match="style bank .* is missing"):
        famix.main(
            [*FAST, "--data", str(toy_data), "--out", str(tmp_path / "o2"), "--mine", "never"]
        )
    wrong = tmp_path / "wrong.pt"
    torch.save({"method": "famix", "model": famix.FAMixSegmenter("test").state_dict()}, wrong)
    with pytest.raises(common.CheckpointError, match="holds a test model"):
        famix.main(
            [
                "--source",
                "toy",
                "--data",
                str(toy_data),
                "--backbone",
                "RN50-quickgelu",
                "--eval-only",
                "--pretrained",
                str(wrong),
                "--out",
                str(tmp_path / "o3"),
            ]
        )
    with pytest.raises(common.UsageError, match="divisible by 12"):
        famix.main([*FAST, "--data", str(toy_data), "--crop", "50"])
    # as a process: exit status 2 and one line on stderr
    truncated = tmp_path / "last.pt"
    truncated.write_bytes(b"PK\x03\x04 broken")
    proc = run_script(
        [*FAST, "--data", str(toy_data), "--resume", str(truncated), "--out", str(tmp_path / "o4")]
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")


def test_toy_defaults_and_paper_defaults():
    parser = famix.build_parser()
    args = parser.parse_args([])
    assert (args.source, args.iters, args.batch_size, args.crop, args.amp, args.pretrained) == (
        "gta",
        40000,
        8,
        768,
        False,
        "openai",
    )
    assert (args.backbone, args.beta, args.grid, args.lr, args.backbone_lr) == (
        "RN50-quickgelu",
        0.1,
        3,
        0.1,
        0.01,
    )
    assert (args.pin_iters, args.pin_lr, args.mine_batch_size, args.templates) == (100, 1.0, 16, 80)
    assert args.label_smoothing == 0.1 and args.eval_every == 750
    argv = ["--source", "toy", "--iters", "7"]
    args = parser.parse_args(argv)
    common.apply_toy_defaults(parser, args, argv, **famix.TOY_DEFAULTS)
    assert args.iters == 7 and args.crop == famix.TOY_DEFAULTS["crop"] and args.backbone == "test"


def test_bench_prints_json_lines(capsys, monkeypatch):
    monkeypatch.setattr(famix, "BENCH_TRAIN", (("small", 2, 48), ("paper", 8, 768)))
    monkeypatch.setattr(famix, "BENCH_MINE", (("small", 2, 48, 2), ("paper", 16, 768, 100)))
    famix.main(["--bench", "--backbone", "test", "--device", "cpu"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [r["bench"] for r in lines] == ["famix/train_step/small", "famix/mine_batch/small"]
    assert all(r["step_s"] > 0 and r["images_per_s"] > 0 for r in lines)
    assert lines[0]["crop"] == 48 and lines[1]["pin_iters"] == 2 and lines[1]["patches"] >= 1


def test_train_loop_is_tagged_method_and_plumbing():
    import inspect

    src = inspect.getsource(famix.train)
    assert src.count("# METHOD:") >= 3 and src.count("# PLUMBING:") >= 3
