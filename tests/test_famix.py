"""Tests of famix.py: architecture facts, one test per equation of the method, the paper's
ablation switches, official checkpoint names and style banks, and the script end to end (CPU,
random init) on the toy data and on tiny GTA5 trees.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import math
import os
import pickle
import random
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

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


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# =============================================================================================
# Architecture: parameter counts, shapes, dilation pattern (full sizes, meta device)
# =============================================================================================


@pytest.fixture(scope="module")
def meta_models() -> dict:
    """Full-size models on the meta device (shapes only, built once)."""
    with torch.device("meta"):
        return {
            b: (famix.FAMixSegmenter(b), famix.CLIPResNet(b, output_stride=32, attnpool=True))
            for b in ("RN50-quickgelu", "RN101-quickgelu")
        }


# Bottleneck parameters (conv1 + bn1 + conv2 (3x3) + bn2 + conv3 + bn3 [+ downsample conv + bn]):
# RN50 layer2 (planes 128): first 379,392, then 3 x 280,064 -> 1,219,584;
# layer3 (planes 256): first 1,512,448, then 5 x 1,117,184 -> 7,098,368 (RN101: 22 x -> 26,090,496);
# layer4 14,964,736 (first 6,039,552 + 2 x 4,462,592); head 16,253,299.
TRAINABLE_RN50 = {
    "all": 23_527_264 + 16_253_299,  # no freezing: 39,780,563
    "layer2-4": 1_219_584 + 7_098_368 + 14_964_736 + 16_253_299,  # L1: 39,535,987
    "layer3-4": 7_098_368 + 14_964_736 + 16_253_299,  # L2: 38,316,403
    "layer4": 31_218_035,  # L3 (Cityscapes scheme)
    "layer4.2": 20_715_891,  # L4' (GTA5 / SYNTHIA scheme)
    "head": 16_253_299,  # L4: decoder probing
}


@pytest.mark.parametrize(
    "backbone, encoder, attnpool",
    [("RN50-quickgelu", 23_527_264, 14_789_632), ("RN101-quickgelu", 42_519_392, 13_740_544)],
)
def test_full_size_parameter_counts_and_every_freeze_point(
    meta_models, backbone, encoder, attnpool
):
    model, clip_tower = meta_models[backbone]
    assert n_params(model.encoder) == encoder
    assert n_params(model.head) == 16_253_299
    assert n_params(model.encoder.layer4[2]) == 4_462_592
    assert n_params(model.encoder.layer4) == 14_964_736
    assert n_params(model.encoder.layer2) == 1_219_584
    assert n_params(model.encoder.layer3) == (
        7_098_368 if backbone == "RN50-quickgelu" else 26_090_496
    )
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
    deeper = 26_090_496 - 7_098_368 if backbone == "RN101-quickgelu" else 0
    for scheme, count in TRAINABLE_RN50.items():
        famix.freeze(model, scheme)
        extra = deeper if scheme in ("all", "layer2-4", "layer3-4") else 0
        assert common.count_parameters(model)[1] == count + extra, scheme
    assert [p for p, _ in famix.FREEZE_SCHEMES.values()] == [
        "no freezing",
        "L1",
        "L2",
        "L3",
        "L4'",
        "L4",
    ]
    famix.freeze(model, "layer4.2")
    assert famix.FREEZE_BY_SOURCE == {
        "gta": "layer4.2",
        "synthia": "layer4.2",
        "cityscapes": "layer4",
        "toy": "layer4.2",
    }


def test_each_freeze_point_trains_exactly_its_blocks_and_keeps_frozen_bn_in_eval():
    model = famix.FAMixSegmenter("test")  # layers 1/1/1/3: blocks layer2.0, layer3.0, layer4.0-2
    expect = {
        "all": None,
        "layer2-4": ["layer2.0", "layer3.0", "layer4.0", "layer4.1", "layer4.2"],
        "layer3-4": ["layer3.0", "layer4.0", "layer4.1", "layer4.2"],
        "layer4": ["layer4.0", "layer4.1", "layer4.2"],
        "layer4.2": ["layer4.2"],
        "head": [],
    }
    for scheme, blocks in expect.items():
        famix.freeze(model, scheme)
        famix.set_train_mode(model)
        trained = {n.split(".")[1] + "." + n.split(".")[2] for n, p in model.named_parameters()
                   if p.requires_grad and n.startswith("encoder.layer")}  # fmt: skip
        stem_trained = any(p.requires_grad for p in model.encoder.conv1.parameters())
        if blocks is None:
            assert stem_trained and all(m.training for m in model.modules())
            continue
        assert not stem_trained and trained == set(blocks), scheme
        assert all(p.requires_grad for p in model.head.parameters())
        for name, m in model.encoder.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.training == any(name.startswith(b + ".") for b in blocks), (scheme, name)


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
    common.load_state_strict(tower, state, "test", "check the size")
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
    no_pool = {k: v for k, v in state.items() if not k.startswith("attnpool.")}
    assert common.load_state_strict(seg.encoder, no_pool, "test", "check the size") == len(no_pool)


def test_head_init_kaiming_and_batchnorm_ones_zeros():
    torch.manual_seed(0)
    head = famix.DeepLabV3PlusHead(256, 2048, 256, 48)
    w = head.aspp.branches[1][0].weight  # 3x3 conv 2048 -> 256: std = sqrt(2 / fan_in)
    assert math.isclose(w.std().item(), math.sqrt(2 / (2048 * 9)), rel_tol=0.02)
    assert head.aspp.branches[1][0].dilation == (6, 6)
    assert [b[0].dilation for b in head.aspp.branches[1:]] == [(6, 6), (12, 12), (18, 18)]
    assert head.aspp.dropout_p == 0.1
    bns = [m for m in head.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)


# =============================================================================================
# Augment: statistics, patches, dominant class, prompts, PIN
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
    styles = famix.style_words("style-class", 20, seed=0)
    assert styles == famix.STYLE_PROMPTS
    assert famix.make_prompt(255, "style-class", styles, rng) == "photo"
    prompt = famix.make_prompt(6, "style-class", styles, rng)
    assert prompt.endswith(" style traffic light")
    assert prompt[: -len(" traffic light")] in famix.STYLE_PROMPTS
    assert len(famix.STYLE_PROMPTS) == 20 and len(famix.TEMPLATES) == 80
    assert (
        famix.TEMPLATES[0] == "a bad photo of a {}."
        and famix.TEMPLATES[-1] == "a tattoo of the {}."
    )
    assert (
        famix.TEMPLATES[35] == "a {} in a video game." and famix.TEMPLATES[59] == "itap of the {}."
    )

    class FakeCLIP:  # encode_text = embedding of the first token id, to check the averaging
        def encode_text(self, tokens):
            return torch.stack([torch.tensor([float(t[1]), 1.0]) for t in tokens])

    def tokenizer(texts):
        return torch.tensor([[0, len(t), 0] for t in texts])

    templates = ("{}", "a {} b")  # lengths L and L + 4 -> mean L + 2, then normalise
    t = famix.encode_prompts(FakeCLIP(), tokenizer, ["ab", "abcd"], templates, torch.device("cpu"))
    assert torch.allclose(t, F.normalize(torch.tensor([[4.0, 1.0], [6.0, 1.0]]), dim=-1))


def test_prompt_construction_rows_of_the_poster_table():
    chars = famix.style_words("chars-class", 5, seed=3)
    assert len(chars) == 5 and len(set(chars)) == 5
    assert all(len(w) == 9 + len(" style") and w.endswith(" style") and w[:9].isalpha()
               and w[:9].islower() for w in chars)  # fmt: skip
    assert famix.style_words("chars", 5, seed=3) == chars  # drawn once from the seed
    assert famix.style_words("style", 4, seed=3) == famix.STYLE_PROMPTS[:4]

    def prompt(cls, mode, styles):
        return famix.make_prompt(cls, mode, styles, random.Random(0))

    r = random.Random(0).choice(famix.STYLE_PROMPTS)  # the draw make_prompt makes from seed 0
    assert prompt(0, "style-class", famix.STYLE_PROMPTS) == f"{r} road"
    assert prompt(0, "class", famix.STYLE_PROMPTS) == "road"
    assert prompt(255, "class", famix.STYLE_PROMPTS) == "photo"
    assert prompt(0, "style", famix.STYLE_PROMPTS) == r
    assert prompt(255, "style", famix.STYLE_PROMPTS) == r  # no class word: void alike
    c = random.Random(0).choice(chars)
    assert prompt(13, "chars-class", chars) == f"{c} car"
    assert prompt(255, "chars-class", chars) == "photo"
    assert prompt(13, "chars", chars) == c and prompt(255, "chars", chars) == c
    # --num-styles N: the prompts use exactly N distinct style words
    for n in (1, 3, 20):
        rng = random.Random(1)
        styles = famix.style_words("style-class", n, seed=0)
        words = {famix.make_prompt(1, "style-class", styles, rng)[: -len(" sidewalk")]
                 for _ in range(400)}  # fmt: skip
        assert words == set(famix.STYLE_PROMPTS[:n])


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
# Style banks (ours and the official pickle) and patch-wise mixing
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


def official_bank_bytes(c: int = 4) -> tuple[bytes, dict]:
    """A bank in the official format [FAMix patch_PIN.py]: pickle.dump of a dict of 40 lists of
    (C, 1, 1) CPU tensors (torch.from_numpy copies), rare classes empty."""
    g = torch.Generator().manual_seed(0)
    names = [*common.CLASS_NAMES, "255"]
    counts = {"road": 3, "car": 2, "traffic light": 1, "255": 2}
    stats = {}
    for name in names:
        for s in ("mu", "std"):
            stats[f"{name}_{s}"] = [torch.from_numpy(torch.rand(c, 1, 1, generator=g).numpy())
                                    for _ in range(counts.get(name, 0))]  # fmt: skip
    return pickle.dumps(stats), stats


def test_official_style_bank_pickle_converts_to_the_same_statistics(tmp_path):
    raw, stats = official_bank_bytes(c=4)
    path = tmp_path / "saved_params.pkl"
    path.write_bytes(raw)
    bank = famix.read_official_bank(path, channels=4)
    # rows in class order (road 0, traffic light 6, car 13, void 255), file order within a class
    assert bank["cls"].tolist() == [0, 0, 0, 6, 13, 13, 255, 255]
    rows = [("road", 0), ("road", 1), ("road", 2), ("traffic light", 0), ("car", 0), ("car", 1),
            ("255", 0), ("255", 1)]  # fmt: skip
    for i, (name, k) in enumerate(rows):
        assert torch.equal(bank["mu"][i], stats[f"{name}_mu"][k].flatten())
        assert torch.equal(bank["sigma"][i], stats[f"{name}_std"][k].flatten())
    styles, meta = famix.load_style_bank(path, "test", None, channels=4)
    assert meta == {} and styles.count[255] == 2 and styles.count[6] == 1
    mu_t, _ = styles.sample(torch.tensor([[5] * 20]))  # pole has no styles: the void bank
    assert {tuple(r.tolist()) for r in mu_t[0]} <= {tuple(bank["mu"][i].tolist()) for i in (6, 7)}
    # the encoder's layer1 width is checked, one line naming both (RN50 / RN101: 256, test: 64)
    with pytest.raises(
        common.DataFileError,
        match=r"shape \(4, 1, 1\), this run's encoder needs \(64, 1, 1\): its layer1 channels",
    ):
        famix.read_official_bank(path, channels=64)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _StorageExploit:
    """Unpickles as torch's tensor-storage loader on a torch.save archive that calls os.system:
    a tensor storage hiding a call, which torch's own weights_only refusal would answer with
    advice to load it unsafely."""

    def __init__(self, marker: Path):
        buffer = io.BytesIO()
        torch.save(_Exploit(marker), buffer)
        self.data = buffer.getvalue()

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.data,))


def _bad_bank(kind: str, marker: Path):
    """A saved_params.pkl broken one way (pickle bytes), and what its one line must say."""
    _, stats = official_bank_bytes(c=4)
    if kind == "call":
        stats["road_mu"] = [_Exploit(marker)]
        return pickle.dumps(stats), r"holds a call to (posix|os)\.system, which a style bank never"
    if kind == "storage call":
        stats["road_mu"] = [_StorageExploit(marker)]
        return pickle.dumps(stats), r"holds a call to (posix|os)\.system, which a style bank never"
    if kind == "truncated":
        return pickle.dumps(stats)[:50], "cannot read official style bank"
    if kind == "not a dict":
        return pickle.dumps([stats]), "holds a list, not an official style bank"
    if kind == "issue: {road_mu: 5}":
        return pickle.dumps({"road_mu": 5}), r"not an official style bank \(no keys \['road_std'"
    if kind == "a value not a list":
        stats["car_mu"] = 5
        return pickle.dumps(stats), "car_mu is not a list of tensors"
    if kind == "missing key":
        del stats["car_std"]
        return pickle.dumps(stats), r"no keys \['car_std'\]"
    if kind == "unexpected key":
        stats["other"] = []
        return pickle.dumps(stats), r"unexpected keys \['other'\]"
    if kind == "shape":
        stats["road_std"][1] = torch.zeros(4)
        return pickle.dumps(
            stats
        ), r"road_std holds a tensor of shape \(4,\), this run's encoder needs \(4, 1, 1\)"
    if kind == "channels":
        stats = {k: [torch.zeros(8, 1, 1) for _ in v] for k, v in stats.items()}
        return pickle.dumps(
            stats
        ), r"shape \(8, 1, 1\), this run's encoder needs \(4, 1, 1\): its layer1"
    if kind == "mu and std sizes":
        stats["road_std"].pop()
        return pickle.dumps(stats), "road has 3 mu but 2 std"
    if kind == "non-finite":
        stats["car_std"][0][2] = float("nan")
        return pickle.dumps(stats), r"holds non-finite statistics \(nan or inf\)"
    assert kind == "empty"
    return pickle.dumps({k: [] for k in stats}), "holds no style"


BAD_BANKS = ["call", "storage call", "truncated", "not a dict", "issue: {road_mu: 5}",
             "a value not a list", "missing key", "unexpected key", "shape", "channels",
             "mu and std sizes", "non-finite", "empty"]  # fmt: skip


@pytest.mark.parametrize("kind", BAD_BANKS)
def test_a_malformed_official_bank_is_one_line_naming_the_file(kind, tmp_path):
    """Every way a saved_params.pkl can be wrong ends in one DataFileError line that names the
    file and what is wrong; a refused call is named in our words, never with advice to load the
    file unsafely (torch's own refusal suggests weights_only=False); nothing is ever called."""
    marker = tmp_path / "ran"
    raw, message = _bad_bank(kind, marker)
    path = tmp_path / "saved_params.pkl"
    path.write_bytes(raw)
    with pytest.raises(common.DataFileError) as e:
        famix.read_official_bank(path, channels=4)
    text = str(e.value)
    assert "\n" not in text and str(path) in text and re.search(message, text), text
    assert "weights_only" not in text and "trust" not in text
    assert not marker.exists()


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


def test_mix_with_mined_and_source_draws_either_partner_per_patch():
    torch.manual_seed(0)
    b, c = 32, 4
    bank = famix.StyleBank(
        torch.full((2, c), 100.0), torch.full((2, c), 7.0), torch.tensor([0, 255])
    )
    labels = torch.zeros(b, 12, 12, dtype=torch.long)  # every patch: class 0
    mu_s = torch.rand(b, 9, c, 1, 1)
    sigma_s = torch.rand(b, 9, c, 1, 1) + 1
    mined = famix.target_statistics("famix", mu_s, sigma_s, labels, bank, 3, 15.0)
    assert torch.all(mined[0] == 100) and torch.all(mined[1] == 7)  # default: the bank only
    mu_t, sigma_t = famix.target_statistics(
        "famix", mu_s, sigma_s, labels, bank, 3, 15.0, mix_with="mined+source"
    )
    from_bank = (mu_t == 100).all(2).flatten()  # (B * 9,) a whole patch comes from one partner
    assert torch.equal(from_bank, (sigma_t == 7).all(2).flatten())
    # the other patches carry the statistics of the same patch of another image of the batch
    src_mu, src_sigma = mu_s.flatten(0, 1), sigma_s.flatten(0, 1)
    for i in torch.nonzero(~from_bank).flatten().tolist():
        b_i, p_i = divmod(i, 9)
        match = (mu_s[:, p_i] == mu_t[b_i, p_i]).all(1).flatten()
        assert match.sum() == 1 and torch.equal(
            sigma_t[b_i, p_i], sigma_s[match.nonzero()[0, 0], p_i]
        )
    assert 0.35 < from_bank.float().mean().item() < 0.65  # a fair coin per (image, patch)
    assert src_mu.shape == src_sigma.shape


def test_a_step_draws_per_image_so_a_split_batch_draws_the_same():
    """Every draw of a training step comes from the generator of its image (common.
    step_generators: seed, iteration, sample): the bank's style per patch, the Beta weights
    (sample_beta), the noise, the decoder's dropout mask. Images 0-3 in one call then get what
    images 0-1 and 2-3 get in two calls (1 process x 4 = 2 x 2), and the global random stream
    is left alone. The exception, by choice: mixstyle's partner (and so mined+source) is another
    image of the call, i.e. of the process's share of the batch."""
    torch.manual_seed(0)

    def gens():
        return [torch.Generator().manual_seed(100 + k) for k in range(4)]

    classes = torch.tensor([0, 0, 0, 1, 1, 1, 255])
    bank = famix.StyleBank(torch.rand(7, 8) + 1, torch.rand(7, 8) + 0.5, classes)
    f1 = F.relu(torch.randn(4, 8, 12, 12)) + 0.01
    labels = torch.randint(0, 2, (4, 4, 4)).repeat_interleave(12, 1).repeat_interleave(12, 2)
    aspp = famix.ASPP(8, 6, rates=(1,)).train()
    for m in aspp.modules():  # BN in eval: an image's output depends on that image only
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    x = torch.randn(4, 8, 5, 5)
    state = torch.get_rng_state()

    def mix(mode: str, k: slice, g: list) -> Tensor:
        return famix.stylize(f1[k], labels[k], bank, mode, 3, beta=0.1, noise_snr=10.0, gens=g)

    for mode in ("famix", "pure", "noise", "mixstyle"):
        g, h = gens(), gens()
        whole = mix(mode, slice(0, 4), g)
        halves = torch.cat([mix(mode, slice(0, 2), h[:2]), mix(mode, slice(2, 4), h[2:])])
        assert torch.equal(whole, halves) == (mode != "mixstyle"), mode
        assert torch.equal(whole, mix(mode, slice(0, 4), gens()))  # the generators decide
    g, h = gens(), gens()
    whole = aspp(x, g)
    assert torch.equal(whole, torch.cat([aspp(x[:2], h[:2]), aspp(x[2:], h[2:])]))
    assert torch.equal(torch.get_rng_state(), state)
    # dropout: p = 0.1, kept values scaled by 1 / 0.9, none in evaluation
    kept = aspp.eval()(x)
    on = kept > 0
    ratio = whole[on] / kept[on]
    dropped = (ratio == 0).float().mean().item()
    assert torch.allclose(ratio[ratio > 0], torch.full_like(ratio[ratio > 0], 1 / 0.9))
    assert 0.05 < dropped < 0.15
    # Beta(a, a) from a generator: reproducible, the global stream untouched, U-shaped for a=0.1
    s1 = famix.sample_beta(0.1, (4000,), torch.Generator().manual_seed(1), "cpu")
    s2 = famix.sample_beta(0.1, (4000,), torch.Generator().manual_seed(1), "cpu")
    s3 = famix.sample_beta(0.1, (4000,), torch.Generator().manual_seed(2), "cpu")
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
    assert torch.equal(torch.get_rng_state(), state)
    assert 0.65 < ((s1 < 0.05) | (s1 > 0.95)).float().mean().item() < 0.85


# =============================================================================================
# Loss, schedule, freezing, a training step
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
    assert opt.defaults["foreach"] is None
    assert famix.build_optimizer(model, args, {"foreach": True}).defaults["foreach"] is True
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
    model.encoder.layer3[-1].register_forward_hook(lambda m, i, o: seen.update(l3=o.requires_grad))
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
    famix.freeze(model, "all")
    famix.set_train_mode(model)
    assert all(m.training for m in model.modules())
    assert common.count_parameters(model)[0] == common.count_parameters(model)[1]
    seen = {}
    model.encoder.layer3[-1].register_forward_hook(lambda m, i, o: seen.update(l3=o.requires_grad))
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
    mapped = famix.map_official_state(state)
    assert common.load_state_strict(b, mapped, "official", "hint") == len(b.state_dict())
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
# Data: the split each source trains and validates on
# =============================================================================================


def test_each_source_reads_its_official_splits(data_root, tmp_path, monkeypatch):
    def names(dataset) -> list[str]:
        return sorted(image.stem for image, _ in dataset.pairs)

    def args(source):
        return famix.parse_args(
            ["--source", source, "--data", str(data_root), "--out", str(tmp_path)]
        )[0]

    # GTA5: FAMix's list gtav_split_train.txt (12,382 of 24,966), not every image
    assert names(famix.source_dataset(args("gta"), None)) == ["00001", "00002"]
    # SYNTHIA "train" = the RobustNet split: every frame but the 2,820 of synthia_split_val.txt
    assert names(famix.source_dataset(args("synthia"), None)) == ["0000000", "0000002"]
    assert names(famix.eval_dataset("source-val", args("synthia"))) == ["0000001"]
    # Cityscapes: train (2,975) and val (500)
    assert names(famix.source_dataset(args("cityscapes"), None)) == [
        "aachen_000000_000019_leftImg8bit"
    ]
    assert len(famix.eval_dataset("source-val", args("cityscapes"))) == 2
    calls = []

    def record(name, root, split, **kw):
        calls.append((name, split, kw.get("gta_list"), kw.get("transform") is famix.center_crop))
        return []

    monkeypatch.setattr(common, "build_dataset", record)
    for source in ("gta", "synthia", "cityscapes"):
        famix.source_dataset(args(source), None)
        famix.eval_dataset("source-val", args(source))
    assert calls == [
        ("gta", "train", "famix", False),
        ("gta", "val", "famix", True),  # 1,000 images, centre crop 1046 x 1914
        ("synthia", "train", "famix", False),
        ("synthia", "val", "famix", False),
        ("cityscapes", "train", "famix", False),
        ("cityscapes", "val", "famix", False),
    ]


# =============================================================================================
# The script end to end: toy data and tiny GTA5 trees (test size, random init)
# =============================================================================================

TINY = ["--source", "gta", "--pretrained", "none", "--backbone", "test", "--crop", "24",
        "--batch-size", "2", "--targets", "", "--mine-batch-size", "2", "--mine-batches", "1",
        "--pin-iters", "2", "--pin-lr", "0.05", "--templates", "1", "--workers", "0",
        "--cpu-threads", "1"]  # fmt: skip


@pytest.fixture
def mini_gta(make_tree) -> Path:
    """A --data root holding a tiny GTA5 tree: 2 training images (FAMix list), 1 validation."""
    tree = make_tree("gta5")
    (tree.root / "gtav_split_val.txt").write_text("15188.png\n")
    return tree.root.parent


def train_records(out: Path) -> list[dict]:
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r["type"] == "train"]


def test_script_mines_trains_evaluates_and_writes_results(
    mini_gta, make_tree, tmp_path, run_script
):
    make_tree("cityscapes")  # next to gta5/: a target
    out = tmp_path / "run"
    proc = run_script("famix.py", *TINY, "--data", mini_gta, "--out", out, "--iters", "2",
                      "--log-every", "1", "--targets", "cityscapes")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mining batch 1/1" in proc.stdout
    assert "1,300,083 trainable (freeze layer4.2 = L4'" in proc.stdout  # test-size counts
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"source-val", "cityscapes"}
    for r in results.values():
        assert 0 <= r["miou"] <= 100 and set(r["per_class_iou"]) == set(common.CLASS_NAMES)
    header = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert header["params_trainable"] == 1_300_083 and header["args"]["backbone"] == "test"
    assert [r["iter"] for r in train_records(out)] == [1, 2]
    bank = torch.load(out / "style_bank.pt", weights_only=True)
    assert bank["mu"].shape[1] == 64 and len(bank["cls"]) == len(bank["mu"]) > 0
    assert bank["prompt"] == "style-class" and bank["num_styles"] == 20
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["method"] == "famix" and ckpt["iter"] == 2
    assert not any(k.startswith("module.") or "_orig_mod." in k for k in ckpt["model"])


def test_resume_continues_bit_exactly_and_refuses_other_model_flags(mini_gta, tmp_path):
    bank = tmp_path / "bank.pt"
    argv = [*TINY, "--data", str(mini_gta), "--style-bank", str(bank), "--eval-every", "0"]
    famix.main([*argv, "--out", str(tmp_path / "mine"), "--mine", "only"])
    famix.main([*argv, "--out", str(tmp_path / "full"), "--iters", "3"])
    famix.main([*argv, "--out", str(tmp_path / "part"), "--iters", "1"])
    last = str(tmp_path / "part" / "last.pt")
    famix.main([*argv, "--out", str(tmp_path / "part"), "--iters", "3", "--resume", last])
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    part = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    assert full["iter"] == part["iter"] == 3
    for key, value in full["model"].items():
        assert torch.equal(value, part["model"][key]), key
    init = famix.FAMixSegmenter("test").state_dict()
    assert not torch.equal(full["model"]["head.classifier.weight"], init["head.classifier.weight"])
    # a run that mines its own bank trains exactly as one that finds the bank
    own = [a for a in argv if a not in ("--style-bank", str(bank))]
    famix.main([*own, "--out", str(tmp_path / "own"), "--iters", "3"])
    mined = torch.load(tmp_path / "own" / "last.pt", weights_only=True)
    assert all(torch.equal(v, mined["model"][k]) for k, v in full["model"].items())
    for flag, value in (("--freeze", "all"), ("--backbone-lr", "0.02")):
        with pytest.raises(common.CheckpointError, match=f"trained with {flag} "):
            famix.main([*argv, "--out", str(tmp_path / "part"), "--iters", "3", "--resume", last,
                        flag, value])  # fmt: skip


def test_fast_path_gives_the_plain_path_losses_and_evaluation(mini_gta, tmp_path):
    """--fast on (channels_last model and inputs, foreach SGD) against --fast off on CPU, three
    steps, batch 8. Tolerance 1e-5 relative on the loss: channels_last convolutions run other CPU
    kernels that sum in another order (float32 rounding, ~1e-7 relative; measured: 2e-7). Batch
    8, not 2: the decoder's image-pooling BatchNorm normalises B values per channel, and with B = 2
    it turns rounding differences into different steps within three iterations. The evaluation
    must agree to 1e-6 mIoU (the same argmax on every pixel of the validation image)."""
    bank = tmp_path / "bank.pt"
    argv = [*TINY, "--data", str(mini_gta), "--style-bank", str(bank), "--iters", "3",
            "--log-every", "1", "--eval-every", "0", "--batch-size", "8"]  # fmt: skip
    famix.main([*argv, "--out", str(tmp_path / "mine"), "--mine", "only"])
    famix.main([*argv, "--out", str(tmp_path / "plain"), "--fast", "off"])
    famix.main([*argv, "--out", str(tmp_path / "fast"), "--fast", "on"])
    plain, fast = train_records(tmp_path / "plain"), train_records(tmp_path / "fast")
    assert [r["iter"] for r in plain] == [r["iter"] for r in fast] == [1, 2, 3]
    for a, b in zip(plain, fast):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    res_plain = json.loads((tmp_path / "plain" / "results.json").read_text())
    res_fast = json.loads((tmp_path / "fast" / "results.json").read_text())
    assert res_fast["source-val"]["miou"] == pytest.approx(
        res_plain["source-val"]["miou"], abs=1e-6
    )
    header = json.loads((tmp_path / "fast" / "log.jsonl").read_text().splitlines()[0])
    assert header["args"]["fast"] == "on"


def unlabel(tree) -> None:
    """Every label pixel of the tree's two training images 0 = unlabeled -> 255."""
    for name in ("00001", "00002"):
        label = tree.root / "labels" / f"{name}.png"
        Image.fromarray(np.zeros(Image.open(label).size[::-1], np.uint8)).save(label)


def test_labels_that_decode_to_void_everywhere_stop_before_mining(make_tree, tmp_path):
    tree = make_tree("gta5")
    (tree.root / "gtav_split_val.txt").write_text("15188.png\n")
    unlabel(tree)
    out = tmp_path / "run"
    with pytest.raises(common.DataFileError, match="hold no pixel of the 19 classes"):
        famix.main([*TINY, "--data", str(tree.root.parent), "--out", str(out)])
    assert not (out / "style_bank.pt").exists()


def test_unlabelled_batch_adds_a_zero_loss_and_one_warning(
    make_tree, tmp_path, capsys, monkeypatch
):
    """DEVIATION 13 (a batch of void labels only, which a dataset whose first labels are fine
    can still hold): common.check_labels, which would stop this tiny tree, is switched off."""
    monkeypatch.setattr(common, "check_labels", lambda dataset: None)
    tree = make_tree("gta5")
    (tree.root / "gtav_split_val.txt").write_text("15188.png\n")
    unlabel(tree)
    out = tmp_path / "run"
    famix.main([*TINY, "--data", str(tree.root.parent), "--out", str(out), "--iters", "2",
                "--style", "mixstyle", "--log-every", "1", "--noise-snr", "20"])  # fmt: skip
    err = capsys.readouterr().err
    assert re.findall(r"warning: iteration (\d+): every label pixel", err) == ["1", "2"]
    assert "warning: --noise-snr not used with --style mixstyle" in err
    assert [r["loss"] for r in train_records(out)] == [0.0, 0.0]
    assert torch.load(out / "last.pt", weights_only=True)["iter"] == 2


@pytest.mark.skipif(
    signal.getsignal(signal.SIGINT) is signal.SIG_IGN,
    reason="SIGINT is ignored in this process tree (e.g. a shell's background job)",
)
def test_ctrl_c_says_where_it_stopped_and_how_to_resume(mini_gta, tmp_path, run_script):
    out = tmp_path / "run"
    proc = run_script("famix.py", *TINY, "--data", mini_gta, "--out", out, "--iters", "3000",
                      "--eval-every", "2", "--style", "mixstyle", start=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.pt").exists():
            assert proc.is_alive() and time.monotonic() < deadline, proc.err_path.read_text()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGINT)
        proc.join(60)
    finally:
        if proc.is_alive():
            proc.kill()
    err = proc.err_path.read_text()
    assert proc.exitcode == 130, err[-2000:]
    lines = [x for x in err.splitlines() if "interrupted at iteration" in x]
    assert len(lines) == 1 and f"--resume {out / 'last.pt'}" in lines[0]
    assert "Traceback" not in err
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["iter"] >= 2 and ckpt["iter"] % 2 == 0


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
    args, _ = famix.parse_args(argv)
    sets = {n: famix.eval_dataset(n, args) for n in ("bdd", "acdc-fog")}
    famix.freeze(model, "layer4.2")
    expected = famix.evaluate(model, sets, args, common.Dist())
    for name in sets:
        assert results[name]["miou"] == expected[name]["miou"]
        assert results[name]["per_class_iou"] == expected[name]["per_class_iou"]


def test_bad_inputs_end_in_one_line(mini_gta, tmp_path, run_script):
    """Each bad input, as a command: exit code 2, one line on stderr, no traceback."""
    data = ["--data", str(mini_gta)]
    test_ckpt = tmp_path / "test.pt"
    torch.save({"method": "famix", "model": famix.FAMixSegmenter("test").state_dict()}, test_ckpt)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"PK\x03\x04 broken")
    exploit = tmp_path / "saved_params.pkl"
    exploit.write_bytes(pickle.dumps({"road_mu": [_Exploit(tmp_path / "ran")], "road_std": []}))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    four, five = tmp_path / "four.pkl", tmp_path / "five.pkl"
    four.write_bytes(official_bank_bytes(c=4)[0])  # a bank of 4 channels; test size: 64
    read_only = [*TINY[:12], *TINY[-4:]]  # no mining flag: each would add a warning (moot)
    five.write_bytes(pickle.dumps({"road_mu": 5}))  # [issue] once an 18-line TypeError
    cases = [
        (["--source", "gta", "--data", tmp_path / "nothing", "--pretrained", "none",
          "--backbone", "test"], "gta: missing images/ or labels/"),
        ([*TINY, *data, "--mine", "never"], "style bank .* is missing"),
        (["--source", "gta", *data, "--eval-only", "--targets", "", "--pretrained", test_ckpt],
         "holds a test model; add --backbone test"),
        ([*TINY, *data, "--crop", "50"], "--crop 50 must be divisible by 12"),
        (["--source", "gta", *TINY[4:], *data, "--resume", broken], "cannot read checkpoint"),
        ([*TINY, *data, "--num-styles", "21"], "--num-styles 21: 20 official styles"),
        ([*TINY, *data, "--mix-with", "mined+source", "--style", "none"], "needs --style famix"),
        ([*TINY, *data, "--grid", "0"], "--grid: must be >= 1"),
        ([*TINY, *data, "--templates", "81"], "--templates 81: there are 80"),
        ([*TINY, *data, "--pin-iters", "-1"], "--pin-iters: must be >= 1"),
        ([*TINY, *data, "--momentum", "1.5"], r"--momentum: must be in \[0, 1\], got 1.5"),
        ([*TINY, *data, "--scale", "2"], r"--scale 2.0: use a value in \(0, 1\]"),
        ([*TINY, *data, "--label-smoothing", "1"], r"--label-smoothing 1.0: use a value in \[0, "),
        ([*TINY, *data, "--beta", "nan"], "--beta: must be > 0"),
        ([*TINY, *data, "--backbone", "RN50-quickgelu", "--pretrained", "/no/such/RN50.pt"],
         "--pretrained /no/such/RN50.pt not found"),
        ([*read_only, *data, "--style-bank", exploit],
         r"holds a call to (posix|os)\.system, which a style bank never needs"),
        ([*read_only, *data, "--style-bank", four], r"\(4, 1, 1\), this run's encoder needs \(64,"),
        ([*read_only, *data, "--style-bank", five], r"not an official style bank \(no keys"),
        ([*TINY, *data, "--out", a_file], "is a file, not a folder"),
        (["--source", "gta", *data, "--targets", "", "--crop", "24"],  # the default: openai
         "cannot download the open_clip weights RN50-quickgelu / openai: HF_HUB_OFFLINE=1"),
    ]  # fmt: skip
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # no network, empty cache
    for k, (argv, message) in enumerate(cases):
        out = [] if "--out" in argv else ["--out", tmp_path / f"o{k}"]
        proc = run_script("famix.py", *argv, *out, env=env)
        assert proc.returncode == 2, (argv, proc.stderr[-2000:])
        err = proc.stderr.strip()
        assert err.count("\n") == 0 and err.startswith("error: "), (argv, err[-2000:])
        assert "Traceback" not in err
        assert re.search(message, err), (message, err)
    assert not (tmp_path / "ran").exists()


def test_corrupt_image_while_mining_and_existing_run_end_in_one_line(
    make_tree, tmp_path, run_script
):
    tree = make_tree("gta5")
    (tree.root / "gtav_split_val.txt").write_text("15188.png\n")
    image = tree.root / "images" / "00002.png"
    image.write_bytes(image.read_bytes()[:120])  # header intact, pixels truncated
    argv = [*TINY, "--data", tree.root.parent, "--out", tmp_path / "run"]
    proc = run_script("famix.py", *argv)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and err.count("\n") == 0 and "Traceback" not in err, err[-2000:]
    assert err.startswith("error: cannot read image") and "00002.png" in err
    assert "re-extract it from 01_images.zip" in err
    (tmp_path / "run" / "last.pt").write_bytes(b"")
    proc = run_script("famix.py", *argv)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr


def test_flags_an_official_bank_makes_moot_get_one_warning_line(capsys):
    """A .pkl bank is read, never mined: the mining flags set with it are named, once."""
    argv = ["--style-bank", "saved_params.pkl", "--prompt", "class", "--num-styles", "5",
            "--templates", "3", "--pin-lr", "0.5", "--mine-batch-size", "4", "--mine-batches",
            "2", "--mine", "never"]  # fmt: skip
    args, defaults = famix.parse_args(argv)
    famix.check_args(args, common.Dist(), defaults)
    assert capsys.readouterr().err.splitlines() == [
        "warning: --prompt, --num-styles, --templates, --pin-lr, --mine-batch-size, "
        "--mine-batches, --mine not used with --style-bank saved_params.pkl (an official bank "
        "is read, never mined)"
    ]
    args, defaults = famix.parse_args([*argv[:2], "--mine", "only"])  # only: read it, then stop
    famix.check_args(args, common.Dist(), defaults)
    assert capsys.readouterr().err == ""


def test_mining_on_two_processes_gives_every_rank_the_bank_of_one(toy_data, tmp_path, monkeypatch):
    """Mining splits whole batches over the processes (DEVIATION 7): batch i of rank r holds the
    images of batch 2i + r of one process (the loader's stream positions), its prompts are drawn
    from (seed, 2i + r), and the gathered banks are put in that order; every rank then reads the
    file rank 0 wrote. So 2 processes x 2 batches give one process's bank of 4 batches exactly.
    Rank 1 mines first; its batches reach rank 0 through a stand-in for all_gather_object (a
    real two-process mining gave the same file: max difference 0.0)."""
    flags = ["--source", "toy", "--data", str(toy_data), "--pretrained", "none", "--crop", "48",
             "--mine-batch-size", "2", "--pin-iters", "2", "--templates", "1", "--workers", "0",
             "--num-styles", "20"]  # fmt: skip
    args1, _ = famix.parse_args([*flags, "--mine-batches", "4"])
    args2, _ = famix.parse_args([*flags, "--mine-batches", "2"])
    clip = famix.load_clip("test", "none", 0)
    state = famix.visual_state(clip, "test")
    dataset = famix.source_dataset(args1, famix.train_transform("toy", 48))
    famix.run_mining(args1, common.Dist(), clip, state, dataset, tmp_path / "one.pt")
    found, mine = {}, famix.mine_styles
    monkeypatch.setattr(famix, "mine_styles", lambda *a: found.setdefault("rank1", mine(*a)))
    famix.run_mining(args2, common.Dist(1, 2), clip, state, dataset, tmp_path / "rank1.pt")
    assert not (tmp_path / "rank1.pt").exists()  # rank 0 writes the file
    monkeypatch.setattr(famix, "mine_styles", mine)

    def all_gather_object(out: list, obj) -> None:  # rank 0's view of a 2-process gather
        out[:] = [obj, found["rank1"]]

    monkeypatch.setattr(famix.torch_dist, "all_gather_object", all_gather_object)
    famix.run_mining(args2, common.Dist(0, 2, enabled=True), clip, state, dataset,
                     tmp_path / "two.pt")  # fmt: skip
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert one.keys() == two.keys() and len(one["cls"]) >= 8
    for key, value in one.items():
        assert torch.equal(value, two[key]) if torch.is_tensor(value) else value == two[key], key


def test_two_processes_train_as_one_within_the_batchnorm_bound(run_script, toy_data, tmp_path):
    """Global batch 4 as 2 processes x 2 images (Gloo, CPU) against 1 x 4 (the decoder's BN needs
    2+ images per process): A2 = 1 process, 2 iterations (it mines the bank); A4 = A2 resumed to
    4 on 1 process; B3 = A2 resumed to 3 on 2 processes; C4 = B3 resumed to 4 on 1 process.
    Every random draw is the same on 1 and 2 processes (test_a_step_draws_per_image_...; with
    the trained BNs held in eval mode, 2 x 2 and 1 x 4 gave the same gradients to 1e-8), but
    torch has no SyncBatchNorm on CPU: in B3's step each process normalises with the statistics
    of its own 2 images, not of the 4. Measured: max |A4 - C4| over the checkpoint's tensors
    0.124 (a BN running variance; decoder weights 0.10), B3's logged loss at iteration 3 off by
    0.038 (2.766 vs 2.804). Bounds: about 2.5 times these. --poly-power 1e-9 holds the lr
    constant: poly's T is --iters, which differs between the runs."""
    flags = ["--source", "toy", "--data", toy_data, "--pretrained", "none", "--crop", "48",
             "--batch-size", "4", "--log-every", "1", "--eval-every", "0", "--targets", "",
             "--mine-batch-size", "2", "--mine-batches", "1", "--pin-iters", "2", "--templates",
             "1", "--workers", "0", "--eval-batch-size", "16", "--poly-power", "1e-9",
             "--style-bank", tmp_path / "bank.pt"]  # fmt: skip

    def one(out: str, iters: int, *more) -> Path:
        run = run_script("famix.py", *flags, "--iters", iters, "--out", tmp_path / out, *more)
        assert run.returncode == 0, run.stderr[-3000:]
        return tmp_path / out

    a2 = one("a2", 2)
    a4 = one("a4", 4, "--resume", a2 / "last.pt")
    from conftest import max_tensor_diff, torchrun

    b = torchrun("famix.py", *flags, "--iters", 3, "--resume", a2 / "last.pt", "--out", "b3",
                 cwd=tmp_path)  # fmt: skip
    assert b.returncode == 0, b.stderr[-3000:]
    assert "batch 4 global, 2 per process" in b.stdout
    c4 = one("c4", 4, "--resume", tmp_path / "b3" / "last.pt")
    assert max_tensor_diff(a4 / "last.pt", c4 / "last.pt") <= 0.3
    (a3,) = [r for r in train_records(a4) if r["iter"] == 3]
    (b3,) = train_records(tmp_path / "b3")
    assert b3["iter"] == 3 and b3["loss"] == pytest.approx(a3["loss"], abs=0.1)


def test_compile_wraps_the_trained_part_and_checkpoints_keep_their_names(
    mini_gta, tmp_path, monkeypatch
):
    compiled = []

    def fake_compile(fn):  # records what --compile hands to torch.compile
        compiled.append(fn)
        return lambda *a: fn(*a)

    monkeypatch.setattr(torch, "compile", fake_compile)
    out = tmp_path / "run"
    famix.main([*TINY, "--data", str(mini_gta), "--out", str(out), "--iters", "1", "--compile",
                "--style", "mixstyle"])  # fmt: skip
    assert [fn.__name__ for fn in compiled] == ["trained"]  # the trained part only
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert list(ckpt["model"]) == list(famix.FAMixSegmenter("test").state_dict())


def test_toy_presets_paper_defaults_and_help():
    args, defaults = famix.parse_args([])
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
    assert args.label_smoothing == 0.1 and args.eval_every == 750 and args.log_every == 50
    assert (args.freeze, args.prompt, args.num_styles, args.mix_with) == (
        "layer4.2",
        "style-class",
        20,
        "mined",
    )
    assert args.style_bank == str(Path("out") / "style_bank.pt") and defaults == vars(args)
    assert famix.parse_args(["--source", "cityscapes"])[0].freeze == "layer4"
    args, defaults = famix.parse_args(["--source", "toy", "--iters", "7", "--out", "x"])
    assert args.iters == 7 and defaults["iters"] == famix.TOY_DEFAULTS["iters"]
    assert args.crop == famix.TOY_DEFAULTS["crop"] and args.backbone == "test"
    assert args.cpu_threads == 1 and args.iters == 7
    assert args.style_bank == str(Path("x") / "style_bank.pt")
    help_text = famix.build_parser().format_help()
    for text in ("(default 40000; paper: 40000 [C main.py])", "layer2-4 = L1", "head = L4",
                 "layer4.2 = L4'", "(default style-class;", "(default mined;"):  # fmt: skip
        assert text in " ".join(help_text.split()), text


def test_bench_records_carry_flops_throughput_and_memory(capsys, monkeypatch):
    monkeypatch.setattr(famix, "BENCH_TRAIN", (("small", 2, 48), ("paper", 8, 768)))
    monkeypatch.setattr(famix, "BENCH_MINE", (("small", 2, 48, 2), ("paper", 16, 768, 100)))
    famix.main(["--bench", "--backbone", "test", "--device", "cpu"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [r["bench"] for r in lines] == ["famix/train_step/small", "famix/mine_batch/small"]
    for r in lines:
        assert r["step_s"] > 0 and r["images_per_s"] > 0 and r["precision"] == "fp32"
        assert r["gflop_per_step"] > 0 and r["gflops"] > 0 and r["peak_rss_mb"] > 0
    assert lines[0]["crop"] == 48 and lines[1]["pin_iters"] == 2 and lines[1]["patches"] >= 1


def test_train_loop_is_tagged_method_and_plumbing():
    src = inspect.getsource(famix.train)
    assert src.count("# METHOD:") >= 3 and src.count("# PLUMBING:") == 8
    for line in (
        "batch = next(loader)",
        "optimizer.zero_grad(set_to_none=True)",
        "raise common.DivergenceError(it + 1, saved, terms)",
        "(loss if scaler is None else scaler.scale(loss)).backward()",
        "optimizer.step()",
        'log.log({"type": "train"',
        "save_checkpoint(args, done, model, optimizer, scaler)",
        "log.write_results(results, done)",
        "raise common.Interrupted(done, args.iters, saved) from None",
    ):
        assert line in src, line
    order = (
        "optimizer.zero_grad",
        "lr = set_lr(",
        "logits = net(",
        ".backward()",
        "optimizer.step()",
    )
    assert [src.index(x) for x in order] == sorted(src.index(x) for x in order)
    for gone in ("backward_and_step", "check_finite", "log_step", "eval_due", "report_results",
                 "common.progress", "parse_with_presets"):  # fmt: skip
        assert gone not in (ROOT / "famix.py").read_text(), gone


# =============================================================================================
# Sections 1-2 pasted into a file of their own: no common.py
# =============================================================================================


def test_top_of_the_file_up_to_section_3_names_nothing_of_common():
    from conftest import sections_1_2

    top = sections_1_2("famix.py")
    assert "import common" not in top and re.findall(r"\bcommon\.(?!py\b)", top) == []
    assert famix.CLASS_NAMES == common.CLASS_NAMES and famix.NUM_CLASSES == common.NUM_CLASSES
    assert famix.VOID == common.IGNORE_INDEX


SECTIONS_1_2_CORE = """
import json
torch.manual_seed(0)
out = {}
# calc_mean_std: mean 3, unbiased variance 20/3 (+ eps)
mu, sigma = calc_mean_std(torch.tensor([[[[0.0, 2.0], [4.0, 6.0]]]]))
out["mu"], out["sigma"] = mu.item(), sigma.item()
# patchify / unpatchify; dominant classes of a label map of 3x3 blocks of one class each
B, C, H, grid = 2, 8, 12, 3
f1 = (2 * F.relu(torch.randn(B, C, H, H) + 1)).requires_grad_(True)  # layer1-like, post-ReLU
out["roundtrip"] = bool(torch.equal(unpatchify(patchify(f1, grid), grid), f1))
block_cls = torch.tensor([[0, 1, 2, 255, 0, 1, 2, 5, 5], [3, 3, 1, 1, 255, 255, 0, 7, 7]])
labels = block_cls.view(B, grid, grid).repeat_interleave(16, 1).repeat_interleave(16, 2)
dom = dominant_classes(labels, grid)  # (B, 9)
out["dom"] = dom.tolist()
# Augment: PIN on one patch per class, through a fixed random "encoder" (no CLIP tower)
b_idx, p_idx, cls = first_patch_per_class(dom)
patches = patchify(f1.detach(), grid)[b_idx, p_idx]  # (K, C, 4, 4)
proj = torch.randn(C, 6)
targets = F.normalize(torch.randn(len(cls), 6), dim=-1)
mu_m, sigma_m, losses = pin_optimize(patches, targets, lambda x: x.mean((2, 3)) @ proj,
                                     iters=20, lr=1.0, momentum=0.9, weight_decay=1e-4)
out["K"], out["classes"] = len(cls), cls.tolist()
out["pin_loss"] = [losses[0], losses[-1]]
out["bank_shape"] = list(mu_m.shape)
bank = StyleBank(mu_m, sigma_m.abs() + 0.1, cls)
# Mix, with s = 0 (AdaIN): each patch takes the statistics of its target, before the ReLU
p = patchify(f1.detach(), grid)
mu_s, sigma_s = calc_mean_std(p)
x_hat = (p - mu_s) / sigma_s
mu_t, sigma_t = target_statistics("pure", mu_s, sigma_s, labels, bank, grid, 15.0)
pre = mix_statistics(x_hat, mu_s, sigma_s, mu_t, sigma_t, torch.zeros(B, 1, C, 1, 1))
mu_o, sigma_o = calc_mean_std(pre, eps=0.0)
out["adain_mu_err"] = (mu_o - mu_t).abs().max().item()
out["adain_sigma_rel_err"] = ((sigma_o - sigma_t) / sigma_t).abs().max().item()
# Mix with Beta(0.1, 0.1) weights, forward and backward through a 1x1 classifier
head = nn.Conv2d(C, 19, 1)
styled = stylize(f1, labels, bank, "famix", grid, beta=0.1, noise_snr=15.0)
logits = F.interpolate(head(styled), size=labels.shape[-2:], mode="bilinear")
loss = F.cross_entropy(logits, labels, ignore_index=VOID)
loss.backward()
out["styled_shape"] = list(styled.shape)
out["changed"] = (styled - f1).abs().max().item()
out["loss"] = loss.item()
for name, g in (("grad_f1", f1.grad), ("grad_head", head.weight.grad)):
    out[name] = [bool(torch.isfinite(g).all()), g.abs().sum().item()]
print(json.dumps(out))
"""


def test_sections_1_2_run_without_common(tmp_path):
    """The method's core, pasted without common.py and without Appendix A (no CLIP tower, no
    DeepLabv3+): statistics, patches, dominant classes, PIN, the style bank, AdaIN and Beta
    mixing, with a forward and a backward pass."""
    from conftest import run_sections_1_2

    out = json.loads(run_sections_1_2("famix.py", SECTIONS_1_2_CORE, tmp_path).splitlines()[-1])
    assert out["mu"] == pytest.approx(3.0) and out["sigma"] == pytest.approx(
        math.sqrt(20 / 3 + 1e-5), rel=1e-6
    )
    assert out["roundtrip"]
    assert out["dom"] == [[0, 1, 2, 255, 0, 1, 2, 5, 5], [3, 3, 1, 1, 255, 255, 0, 7, 7]]
    assert out["classes"] == [0, 1, 2, 3, 5, 7, 255] and out["K"] == 7
    assert out["bank_shape"] == [7, 8] and out["pin_loss"][1] < out["pin_loss"][0]
    assert out["adain_mu_err"] < 1e-4 and out["adain_sigma_rel_err"] < 1e-4
    assert out["styled_shape"] == [2, 8, 12, 12] and out["changed"] > 1e-3
    assert math.isfinite(out["loss"]) and out["loss"] > 0
    for name in ("grad_f1", "grad_head"):
        finite, size = out[name]
        assert finite and size > 0, name
