"""Tests of clouds.py: CLOUDS-specific model facts, augmentation, sampler mixing, EMA teacher,
SAM refinement, generation, prompts check, released-checkpoint and CLIP-file loading, the command
line (presets, checks, one-line errors) and the script on the toy data (warm-up, joint, exact
resume, fast path). CPU only, random weights, no network."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch._subclasses.fake_tensor import FakeTensorMode

import clouds
import common

REPO = Path(__file__).resolve().parents[1]
CONVNEXT_L = (192, 384, 768, 1536)
RESNET = (256, 512, 1024, 2048)


@functools.cache
def meta_encoder(backbone: str) -> clouds.FrozenCLIPEncoder:
    """Shapes and names of a full-size encoder without memory, built once (read-only use)."""
    return clouds.FrozenCLIPEncoder(backbone, "none", device="meta")


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# =============================================================================================
# Layout of the file
# =============================================================================================


def test_file_skeleton():
    """The numbered sections in order, the paper's first component before line 300, a main body
    of at most 990 lines, citations that resolve, one deviation syntax numbered as listed."""
    lines = (REPO / "clouds.py").read_text().splitlines()
    titles = ["1. The method", "2. Model", "3. Data and augmentation", "4. Training",
              "5. Evaluation", "6. Command line and main", "Appendix A: Mask2Former",
              "Appendix B: Official weights", "Appendix C: Benchmark"]  # fmt: skip
    bar = "# " + "=" * 93
    found = [
        (i, lines[i + 1][2:]) for i in range(len(lines) - 2) if lines[i] == bar == lines[i + 2]
    ]
    assert [t for _, t in found] == titles
    start = {t: i + 1 for i, t in found}  # 1-based line of each banner
    first = next(i for i, line in enumerate(lines, 1) if line.startswith("def repeat_factors"))
    assert start["1. The method"] < first < 300
    assert start["Appendix A: Mask2Former"] + 1 <= 990  # the line of its title
    text = "\n".join(lines)
    assert not re.search("spec \u00a7|trap \\d|STYLE \u00a7", text)  # working notes, not cited
    listed = {int(n) for n in re.findall(r"^  (\d+)\. ", text.split('"""')[1], re.M)}
    used = {int(n) for n in re.findall(r"DEVIATION (\d+):", text)}
    assert used == listed == set(range(1, 10))
    assert "DEVIATION:" not in text and "DEVIATION: (" not in text
    assert lines[-2:] == ['if __name__ == "__main__":', "    common.run_cli(main)"]


def test_top_of_the_file_uses_no_common_name():
    """Docstring, imports, constants and sections 1-2 name nothing of common.py."""
    text = (REPO / "clouds.py").read_text()
    top = text[: text.index("\n# 3. Data and augmentation\n")]
    assert "import common" in top and "common." not in top


SECTIONS_1_2_CORE = r"""
torch.manual_seed(0)
test_channels = BACKBONES["test"][2]


class Student(nn.Module):  # the test-size CLIP trunk, trainable here, + a classifier on res2
    def __init__(self) -> None:
        super().__init__()
        self.trunk = TinyCLIPVisual(test_channels)
        self.classifier = nn.Conv2d(test_channels[0], NUM_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(self.trunk(x)[0])  # (B, 19, H/4, W/4)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def component_predictor(label_map: torch.Tensor):
    # a SAM stand-in: mask 1 (the best score) is the 4-connected component under the first point
    lm = label_map.numpy()

    def predict(image, points_xy):
        masks = np.zeros((len(points_xy), 3, *lm.shape), dtype=bool)
        for i, (x, y) in enumerate(points_xy[:, 0].astype(int)):
            components = ndimage.label(lm == lm[y, x])[0]
            masks[i, 1] = components == components[y, x]
        calls.append(points_xy)
        return torch.from_numpy(masks), torch.tensor([[0.1, 0.9, 0.2]]).expand(len(masks), 3)

    return predict


# the frozen encoder: res2..res5 at strides 4..32 of the padded input, no graph kept
images = torch.randint(0, 256, (1, 3, 60, 60), dtype=torch.uint8)
x = normalize_and_pad(images)
assert tuple(x.shape) == (1, 3, 64, 64) and (x[..., 60:, :] == 0).all()
feats = FrozenCLIPEncoder("test")(x)
assert [tuple(f.shape[1:]) for f in feats] == [(16, 16, 16), (32, 8, 8), (64, 4, 4), (128, 2, 2)]
assert not any(f.requires_grad for f in feats)

# SAM refinement of a random pseudo-label of 10 px blocks, one big and one small extra component
blocks = torch.randint(0, 5, (1, 1, 6, 6)).float()
pseudo = F.interpolate(blocks, size=(60, 60), mode="nearest")[0, 0].long()
pseudo[:30, :30], pseudo[56:, 56:] = 7, 8  # 900 px, 16 px
calls = []
image = images[0].permute(1, 2, 0).numpy()  # (H, W, 3) uint8
target = refine_pseudo_label_with_sam(
    pseudo, image, component_predictor(pseudo), np.random.default_rng(0), min_area=150
)
expected, prompts = {}, 0  # per class, the union of its components larger than 150 px
for c in pseudo.unique().tolist():
    components, n = ndimage.label(pseudo.numpy() == c)
    big = [j for j in range(1, n + 1) if (components == j).sum() > 150]
    prompts += len(big)
    if big:
        expected[c] = np.isin(components, big)
assert target["labels"].tolist() == sorted(expected) and 7 in expected and 8 not in expected
for c, mask in zip(target["labels"].tolist(), target["masks"]):
    assert np.array_equal(mask.numpy(), expected[c].astype(np.float32))
assert len(calls) == 1 and calls[0].shape == (prompts, 5, 2)  # one call, 5 points a component
for points in calls[0].astype(int):
    assert len({(px, py) for px, py in points}) == 5
    assert len({pseudo[py, px].item() for px, py in points}) == 1

# the student learns from the refined labels; the EMA teacher gets no gradient
student = Student()
teacher = EMATeacher(student, alpha=0.9, every=2)
teacher.step(student)  # iteration 0: the teacher becomes the student
for t, s in zip(teacher.head.parameters(), student.parameters()):
    assert torch.allclose(t, s, rtol=0, atol=1e-7) and not t.requires_grad
label = torch.full((60, 60), IGNORE_INDEX)
for c, mask in zip(target["labels"], target["masks"].bool()):
    label[mask] = c
logits = student(x)[..., :60, :60]  # (1, 19, 60, 60)
loss = F.cross_entropy(logits, label[None], ignore_index=IGNORE_INDEX)
loss.backward()
assert math.isfinite(loss.item()) and loss.item() > 0
on_path = [student.trunk.stem, student.trunk.stages[0], student.classifier]  # res2 only
assert all(torch.isfinite(p.grad).all() for m in on_path for p in m.parameters())
assert all(p.grad is None for p in student.trunk.stages[1:].parameters())
assert student.trunk.stem[0].weight.grad.abs().sum() > 0  # reaches the first convolution
assert all(t.grad is None for t in teacher.head.parameters())
with torch.no_grad():
    for p in student.parameters():
        if p.grad is not None:
            p -= 0.1 * p.grad
before = [t.clone() for t in teacher.head.parameters()]
teacher.step(student)  # iteration 1: not a multiple of `every`, the teacher stays
assert all(torch.equal(t, b) for t, b in zip(teacher.head.parameters(), before))
teacher.step(student)  # iteration 2: theta_t <- 0.9 * theta_t + 0.1 * theta_s
for t, b, s in zip(teacher.head.parameters(), before, student.parameters()):
    assert torch.allclose(t, 0.9 * b + 0.1 * s, rtol=0, atol=1e-7)
assert teacher.iteration == 3 and not torch.equal(teacher.head.classifier.weight, before[-2])
print("ok", len(expected), round(loss.item(), 3))
"""


def test_sections_1_2_run_without_common(tmp_path):
    """Sections 1-2 pasted into a file of their own, without common.py: the frozen encoder, SAM
    refinement of a random pseudo-label (hand-checked), a forward and backward pass through the
    test-size CLIP trunk on the refined labels, and the EMA teacher update equation."""
    from conftest import run_sections_1_2

    out = run_sections_1_2("clouds.py", SECTIONS_1_2_CORE, tmp_path)
    assert out.startswith("ok ")


# =============================================================================================
# Model: head counts and shapes
# =============================================================================================


@pytest.mark.parametrize(
    "backbone, expected",
    [
        ("convnext_large_d_320", 20_253_908),
        ("RN50-quickgelu", 20_499_668),
        ("RN101-quickgelu", 20_499_668),
    ],
)
def test_head_parameter_counts(backbone, expected):
    encoder = meta_encoder(backbone)
    assert encoder.channels == (CONVNEXT_L if backbone.startswith("convnext") else RESNET)
    with torch.device("meta"):
        head = clouds.build_head(encoder)
    assert n_params(head) == expected
    # the trainable part is the head alone: every encoder parameter is frozen
    assert all(not p.requires_grad for p in encoder.parameters())
    assert all(p.requires_grad for p in head.parameters())


def test_encoder_keeps_only_the_image_trunk():
    # ConvNeXt-L visual has 199,770,816 parameters; the text tower, the projection MLP
    # and the pooling head are not kept (only the stem and the four stages are used)
    encoder = meta_encoder("convnext_large_d_320")
    keys = list(encoder.state_dict())
    assert all(k.startswith("visual.trunk.") for k in keys)
    assert {k.split(".")[2] for k in keys} == {"stem", "stages"}
    rn = meta_encoder("RN50-quickgelu")
    assert not any(k.startswith("visual.attnpool") for k in rn.state_dict())


@pytest.mark.parametrize(
    "backbone, channels", [("convnext_large_d_320", CONVNEXT_L), ("RN50-quickgelu", RESNET)]
)
def test_shapes_at_768(backbone, channels):
    """a 768x768 batch: res2..res5, mask features, 12,096 encoder tokens, outputs."""
    encoder = meta_encoder(backbone)
    feats = encoder(torch.zeros(2, 3, 768, 768, device="meta"))
    assert [tuple(f.shape) for f in feats] == [
        (2, channels[0], 192, 192),
        (2, channels[1], 96, 96),
        (2, channels[2], 48, 48),
        (2, channels[3], 24, 24),
    ]
    torch.manual_seed(0)
    head = clouds.Mask2FormerHead(list(channels))
    with FakeTensorMode(allow_non_fake_inputs=True):  # shapes only, no arithmetic
        fake = [torch.empty(tuple(f.shape)) for f in feats]
        mask_features, multi_scale = head.pixel_decoder(fake)
        out = head.transformer_decoder(mask_features, multi_scale)
        assert tuple(mask_features.shape) == (2, 256, 192, 192)
        assert [tuple(m.shape) for m in multi_scale] == [
            (2, 256, 24, 24),
            (2, 256, 48, 48),
            (2, 256, 96, 96),
        ]
        assert sum(m.shape[-2] * m.shape[-1] for m in multi_scale) == 12_096
        assert tuple(out["pred_logits"].shape) == (2, 100, 20)
        assert tuple(out["pred_masks"].shape) == (2, 100, 192, 192)
        assert len(out["aux_outputs"]) == 9


def test_test_encoder_strides_and_frozen_eval_mode():
    encoder = clouds.FrozenCLIPEncoder("test", "none")
    encoder.train()  # must stay in eval mode
    assert not encoder.training
    x = torch.randn(1, 3, 64, 96, requires_grad=True)
    feats = encoder(x)
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert [f.shape[1] for f in feats] == list(clouds.BACKBONES["test"][2])
    assert not any(f.requires_grad for f in feats)  # run under no_grad: no activations kept


def test_normalize_and_pad():
    """(x - CLIP mean x 255) / (CLIP std x 255), zero-padded bottom/right to a multiple of 32."""
    images = torch.zeros(1, 3, 40, 70, dtype=torch.uint8)
    images[0, :, 0, 0] = torch.tensor([255, 0, 128], dtype=torch.uint8)
    x = clouds.normalize_and_pad(images)
    assert tuple(x.shape) == (1, 3, 64, 96)
    expected = [
        (255 - 122.7709383) / 68.5005327,
        (0 - 116.7460125) / 66.6321579,
        (128 - 104.09373615) / 70.32316305,
    ]
    assert torch.allclose(x[0, :, 0, 0], torch.tensor(expected), atol=1e-6)
    assert (x[..., 40:, :] == 0).all() and (x[..., :, 70:] == 0).all()
    assert pytest.approx(tuple(255 * m for m in common.CLIP_MEAN)) == clouds.PIXEL_MEAN


def test_segment_is_the_semantic_inference_rule():
    """score[c] = sum_q softmax(class_q)[c] * sigmoid(mask_q) with mask logits upsampled to the
    padded size, then cropped."""
    torch.manual_seed(0)
    encoder = clouds.FrozenCLIPEncoder("test", "none")
    head = clouds.build_head(encoder, num_queries=5).eval()
    images = torch.randint(0, 256, (1, 3, 40, 70), dtype=torch.uint8)
    with torch.no_grad():
        scores = clouds.segment(encoder, head, images)
        out = head(encoder(clouds.normalize_and_pad(images)))
        up = torch.nn.functional.interpolate(
            out["pred_masks"], size=(64, 96), mode="bilinear", align_corners=False
        )[..., :40, :70]
        probs = out["pred_logits"].softmax(-1)[..., :19]
        manual = torch.einsum("bqc,bqhw->bchw", probs, up.sigmoid())
    assert tuple(scores.shape) == (1, 19, 40, 70)
    assert torch.allclose(scores, manual, atol=1e-5)


def test_declared_mask2former_copy_identical_to_rein():
    begin, end = "# ---- BEGIN Mask2Former", "# ---- END Mask2Former ----"
    rein_text = (REPO / "rein.py").read_text()

    def block(text: str) -> str:
        return text[text.index(begin) : text.index(end) + len(end)]

    assert block((REPO / "clouds.py").read_text()) == block(rein_text)


# =============================================================================================
# Augmentation
# =============================================================================================


def test_resize_scale_sizes():
    g = torch.Generator().manual_seed(0)
    gta = torch.zeros(3, 1052, 1914, dtype=torch.uint8)
    image, label = clouds.resize_scale(
        gta, torch.zeros(1052, 1914, dtype=torch.int64), g, (1052, 1914), scale_range=(0.5, 0.5)
    )
    assert tuple(image.shape) == (3, 526, 957) and tuple(label.shape) == (526, 957)
    # a 1046-row GTA5 frame: the width term decides, scale = s
    image, _ = clouds.resize_scale(
        torch.zeros(3, 1046, 1914, dtype=torch.uint8),
        torch.zeros(1046, 1914, dtype=torch.int64),
        g,
        (1052, 1914),
        scale_range=(0.5, 0.5),
    )
    assert tuple(image.shape) == (3, 523, 957)
    synthia = torch.zeros(3, 760, 1280, dtype=torch.uint8)
    image, _ = clouds.resize_scale(
        synthia, torch.zeros(760, 1280, dtype=torch.int64), g, (760, 1280), scale_range=(1.5, 1.5)
    )
    assert tuple(image.shape) == (3, 1140, 1920)


def test_resize_scale_draws_uniform_scale_and_keeps_labels_nearest():
    label = torch.randint(0, 19, (40, 60))
    label[0, 0] = 255
    sizes = []
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        _, out = clouds.resize_scale(torch.zeros(3, 40, 60, dtype=torch.uint8), label, g, (40, 60))
        sizes.append(out.shape[0] / 40)
        assert set(out.unique().tolist()) <= set(label.unique().tolist())  # no blended ids
    assert 0.5 <= min(sizes) < 0.6 and 1.9 < max(sizes) <= 2.0
    assert abs(np.mean(sizes) - 1.25) < 0.1


def test_fixed_size_crop_pads_and_uses_one_draw_for_both_axes():
    h, w = 526, 957
    rows = torch.arange(h)[:, None].expand(h, w)
    cols = torch.arange(w)[None, :].expand(h, w)
    image = torch.stack([rows % 256, cols % 256, torch.zeros(h, w, dtype=torch.int64)]).to(
        torch.uint8
    )
    label = cols.clone()  # label = column index, to read the offset back
    g = torch.Generator().manual_seed(3)
    u = torch.rand((), generator=torch.Generator().manual_seed(3)).item()
    out_image, out_label = clouds.fixed_size_crop(image, label, g, 768)
    assert tuple(out_image.shape) == (3, 768, 768) and tuple(out_label.shape) == (768, 768)
    left = round(u * (957 - 768))
    assert out_label[0, 0].item() == left  # column offset = round(u * 189)
    assert (out_image[0, :526, 0] == (torch.arange(526) % 256)).all()  # row offset 0
    assert (out_image[:, 526:] == 0).all() and (out_label[526:] == 255).all()
    # larger image: the same u for both axes (crop corners on the diagonal)
    big = torch.zeros(3, 1140, 1920, dtype=torch.uint8)
    rows = torch.arange(1140)[:, None].expand(1140, 1920)
    cols = torch.arange(1920)[None, :].expand(1140, 1920)
    _, lab_r = clouds.fixed_size_crop(big, rows, torch.Generator().manual_seed(5), 768)
    _, lab_c = clouds.fixed_size_crop(big, cols, torch.Generator().manual_seed(5), 768)
    u = torch.rand((), generator=torch.Generator().manual_seed(5)).item()
    assert lab_r[0, 0].item() == round(u * (1140 - 768))
    assert lab_c[0, 0].item() == round(u * (1920 - 768))


def test_color_aug_ssd_probabilities_on_grey():
    """On a grey image saturation and hue do nothing, so the output equals the input only when
    neither brightness (p .5) nor contrast (p .5) fired: probability 1/4."""
    grey = torch.full((3, 4, 4), 128, dtype=torch.uint8)
    same, values = 0, []
    for seed in range(400):
        out = clouds.color_aug_ssd(grey, torch.Generator().manual_seed(seed))
        assert (out == out[0, 0, 0]).all()  # stays grey
        same += bool((out == grey).all())
        values.append(out[0, 0, 0].item())
    assert abs(same / 400 - 0.25) < 0.07
    # brightness +-32 then contrast x [0.5, 1.5]: range [48, 240]
    assert min(values) >= 48 and max(values) <= 240
    assert min(values) < 80 and max(values) > 190


def test_generated_views_share_the_flip_and_differ_by_colour_only():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 16, 24), dtype=torch.uint8)
    flips = 0
    for seed in range(40):
        student, teacher = clouds.generated_views(image, torch.Generator().manual_seed(seed))
        flipped = torch.equal(teacher, image.flip(-1))
        assert flipped or torch.equal(teacher, image)
        flips += flipped
        g = torch.Generator().manual_seed(seed)
        clouds._coin(g)  # the flip draw
        assert torch.equal(student, clouds.color_aug_ssd(teacher, g))
    assert 10 < flips < 30


def test_source_transform_is_deterministic_per_seed():
    image = torch.randint(0, 256, (3, 50, 80), dtype=torch.uint8)
    label = torch.randint(0, 19, (50, 80))
    t = clouds.SourceTransform(32, None)
    a = t(image, label, torch.Generator().manual_seed(1))
    b = t(image, label, torch.Generator().manual_seed(1))
    c = t(image, label, torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert tuple(a[0].shape) == (3, 32, 32) and tuple(a[1].shape) == (32, 32)


# =============================================================================================
# Repeat-factor mixing
# =============================================================================================


@pytest.mark.parametrize("factor", [2.0, 0.7])
def test_sampler_long_run_generated_fraction(factor):
    n_src, n_gen = 60, 30
    factors = clouds.repeat_factors(n_src, n_gen, factor)
    assert factors[:n_src] == [1.0] * n_src and factors[n_src:] == [factor] * n_gen
    picks = np.concatenate([common.epoch_indices(n_src + n_gen, 0, e, factors) for e in range(400)])
    fraction = (picks >= n_src).mean()
    assert abs(fraction - factor * n_gen / (n_src + factor * n_gen)) < 0.01


# =============================================================================================
# EMA teacher
# =============================================================================================


def test_ema_teacher_schedule():
    torch.manual_seed(0)
    student = torch.nn.Linear(3, 2)
    teacher = clouds.EMATeacher(torch.nn.Linear(3, 2), alpha=0.999, every=100)
    teacher.step(student)  # iteration 0: copy (then alpha*s + (1-alpha)*s)
    for t, s in zip(teacher.head.parameters(), student.parameters()):
        assert torch.allclose(t, s, rtol=0, atol=1e-7)
        assert not t.requires_grad
    optimizer = torch.optim.SGD(clouds.param_groups(student), lr=0.1)
    assert not {id(p) for p in teacher.head.parameters()} & {
        id(p) for g in optimizer.param_groups for p in g["params"]
    }
    for it in range(1, 101):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.01 * it)
        old = [p.clone() for p in teacher.head.parameters()]
        teacher.step(student)
        for t, o, s in zip(teacher.head.parameters(), old, student.parameters()):
            if it < 100:
                assert torch.equal(t, o)
            else:
                assert torch.equal(t, 0.999 * o + (1 - 0.999) * s)
                assert not torch.equal(t, o)
    assert teacher.iteration == 101


def test_ema_share_of_warmup_weights_after_gta_joint_training():
    """40k iterations, updates at 0, 100, ..., 39900: the initial weights keep
    0.999^399 = 0.67 of the teacher."""
    student = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        student.weight.fill_(1.0)
    teacher = clouds.EMATeacher(student)
    teacher.step(student)
    with torch.no_grad():
        student.weight.fill_(0.0)
    for _ in range(1, 40000):
        teacher.step(student)
    share = teacher.head.weight.item()
    assert share == pytest.approx(0.999**399, rel=1e-4)
    assert round(share, 2) == 0.67


# =============================================================================================
# SAM refinement
# =============================================================================================


def recording(predictor):
    calls = []

    def wrapped(image, points):
        calls.append(points.copy())
        return predictor(image, points)

    return wrapped, calls


def scene() -> torch.Tensor:
    """100x100: class 0 background, class 1 one big block, class 2 one big + one small block,
    class 3 only small blocks."""
    pl = torch.zeros(100, 100, dtype=torch.int64)
    pl[0:30, 0:40] = 1  # 1200 px
    pl[50:90, 0:20] = 2  # 800 px
    pl[95:100, 90:100] = 2  # 50 px
    pl[40:45, 60:68] = 3  # 40 px
    pl[60:66, 70:78] = 3  # 48 px
    return pl


def test_sam_refinement_keeps_large_components_only():
    pl = scene()
    image = np.zeros((100, 100, 3), np.uint8)
    predictor, calls = recording(clouds.fake_sam_predictor(pl))
    out = clouds.refine_pseudo_label_with_sam(
        pl, image, predictor, np.random.default_rng(0), min_area=100, num_points=5
    )
    assert out["labels"].tolist() == [0, 1, 2]  # class 3 (only small components) disappears
    expected = {0: pl == 0, 1: pl == 1, 2: torch.zeros_like(pl, dtype=torch.bool)}
    expected[2][50:90, 0:20] = True  # the small class-2 block is not kept
    for c, mask in zip(out["labels"].tolist(), out["masks"]):
        assert torch.equal(mask.bool(), expected[c])
    assert out["masks"].dtype == torch.float32
    # one SAM call, one prompt set per kept component, 5 distinct (x, y) points inside it
    assert len(calls) == 1 and calls[0].shape == (3, 5, 2)
    for points, c in zip(calls[0], [0, 1, 2]):
        xs, ys = points[:, 0].astype(int), points[:, 1].astype(int)
        assert len({(x, y) for x, y in zip(xs, ys)}) == 5
        assert (pl[ys, xs] == c).all()
    # class-2 points lie in the big block: (x, y) order, x < 20 and 50 <= y < 90
    assert (calls[0][2][:, 0] < 20).all() and (calls[0][2][:, 1] >= 50).all()


def test_sam_refinement_area_threshold_is_strict():
    # class 1: a 5000 px block (dropped); class 2: 5001 px (kept); class 0: 99 px
    pl = torch.full((101, 100), 2, dtype=torch.int64)
    pl[:50, :] = 1  # 5000
    pl[100, 1:] = 0  # class 2: rows 50..99 (5000) + (100, 0) = 5001; class 0: 99 px
    out = clouds.refine_pseudo_label_with_sam(
        pl,
        np.zeros((101, 100, 3), np.uint8),
        clouds.fake_sam_predictor(pl),
        np.random.default_rng(0),
    )  # default min_area 5000
    assert int((pl == 1).sum()) == 5000 and int((pl == 2).sum()) == 5001
    assert out["labels"].tolist() == [2]


def test_sam_refinement_uses_4_connectivity():
    pl = torch.zeros(40, 40, dtype=torch.int64)
    pl[0:10, 0:10] = 1
    pl[10:20, 10:20] = 1  # touches the first block only at a corner
    predictor, calls = recording(clouds.fake_sam_predictor(pl))
    out = clouds.refine_pseudo_label_with_sam(
        pl, np.zeros((40, 40, 3), np.uint8), predictor, np.random.default_rng(0), min_area=50
    )
    assert calls[0].shape[0] == 3  # background + two separate class-1 components
    assert out["labels"].tolist() == [0, 1]
    assert torch.equal(out["masks"][1].bool(), pl == 1)  # union of both components


def test_sam_refinement_picks_best_score_and_clears_overlaps():
    pl = torch.zeros(30, 30, dtype=torch.int64)
    pl[:, 15:] = 1

    def predictor(image, points):
        k = len(points)
        masks = torch.zeros(k, 3, 30, 30, dtype=torch.bool)
        for i, (x, y) in enumerate(points[:, 0].astype(int)):
            c = pl[y, x].item()
            component = pl == c
            grown = component.clone()
            grown[:, 12:18] = True  # both grown masks cover columns 12..17
            masks[i, 0] = component
            masks[i, 2] = grown
        scores = torch.tensor([[0.2, 0.1, 0.9]]).expand(k, 3)  # mask 2 wins
        return masks, scores

    out = clouds.refine_pseudo_label_with_sam(
        pl, np.zeros((30, 30, 3), np.uint8), predictor, np.random.default_rng(0), min_area=100
    )
    assert out["labels"].tolist() == [0, 1]
    overlap = torch.zeros(30, 30, dtype=torch.bool)
    overlap[:, 12:18] = True
    for c, mask in zip([0, 1], out["masks"].bool()):
        assert not mask[overlap].any()  # covered twice: cleared in every mask
        assert torch.equal(mask[~overlap], (pl == c)[~overlap])


def test_sam_refinement_keeps_a_class_whose_masks_vanished():
    pl = torch.zeros(30, 30, dtype=torch.int64)
    pl[:, 15:] = 1

    def everything(image, points):
        masks = torch.ones(len(points), 3, 30, 30, dtype=torch.bool)
        return masks, torch.rand(len(points), 3)

    out = clouds.refine_pseudo_label_with_sam(
        pl, np.zeros((30, 30, 3), np.uint8), everything, np.random.default_rng(0), min_area=100
    )
    assert out["labels"].tolist() == [0, 1] and out["masks"].sum() == 0


def test_sam_refinement_falls_back_when_no_component_is_large():
    pl = torch.zeros(20, 20, dtype=torch.int64)
    pl[5:10, 5:10] = 4
    pl[12:15, 0:3] = 7

    def never(image, points):
        raise AssertionError("SAM must not be called")

    out = clouds.refine_pseudo_label_with_sam(
        pl, np.zeros((20, 20, 3), np.uint8), never, np.random.default_rng(0), min_area=5000
    )
    assert out["labels"].tolist() == [0, 4, 7]
    for c, mask in zip([0, 4, 7], out["masks"]):
        assert torch.equal(mask.bool(), pl == c)


def test_sam_backend_not_installed_is_a_usage_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "segment_anything", None)  # import fails
    with pytest.raises(common.UsageError, match="segment_anything"):
        clouds.build_sam_predictor("vit_b", "x.pth", torch.device("cpu"))


# =============================================================================================
# Generation and prompts
# =============================================================================================


class FakePipeline:
    def __init__(self):
        self.calls = []

    def __call__(self, prompt, height, width, num_inference_steps, guidance_scale, generator):
        self.calls.append(
            dict(
                prompt=prompt,
                height=height,
                width=width,
                steps=num_inference_steps,
                guidance=guidance_scale,
                generator=generator,
            )
        )

        return types.SimpleNamespace(
            images=[Image.new("RGB", (width, height), (len(self.calls), 0, 0))]
        )


def test_generation_names_prompts_and_size(tmp_path):
    pipe = FakePipeline()
    prompts = ["a", "b", "c"]
    paths = clouds.generate_images(
        pipe, prompts, tmp_path, num_images=7, part=2, seed=10, make_generator=lambda s: s
    )
    assert [p.name for p in paths] == [f"im_{14 + j}_p{j % 3}.png" for j in range(7)]
    assert [c["prompt"] for c in pipe.calls] == ["a", "b", "c", "a", "b", "c", "a"]
    assert {(c["height"], c["width"], c["steps"], c["guidance"]) for c in pipe.calls} == {
        (768, 768, 50, 7.5)
    }
    assert [c["generator"] for c in pipe.calls] == [10 + 14 + j for j in range(7)]
    assert Image.open(paths[0]).size == (768, 768)
    # a second call keeps the existing files (restartable jobs)
    clouds.generate_images(pipe, prompts, tmp_path, num_images=7, part=2)
    assert len(pipe.calls) == 7


def test_prompt_file_check(tmp_path, monkeypatch, capsys):
    other = tmp_path / "prompts.txt"
    other.write_text("A photo of a street.\nA picture of a bus at night.\n")
    warning = clouds.check_prompts_file(other)
    assert warning is not None and "md5" in warning and "\n" not in warning
    assert clouds.read_prompts(other) == ["A photo of a street.", "A picture of a bus at night."]
    assert capsys.readouterr().err.count("\n") == 1  # one warning line
    # a file with the official md5 / line count / size passes silently
    data = other.read_bytes()
    monkeypatch.setattr(clouds, "PROMPTS_MD5", hashlib.md5(data).hexdigest())
    monkeypatch.setattr(clouds, "PROMPTS_LINES", 2)
    monkeypatch.setattr(clouds, "PROMPTS_BYTES", len(data))
    assert clouds.check_prompts_file(other) is None
    monkeypatch.setattr(clouds, "PROMPTS_LINES", 100)
    assert clouds.check_prompts_file(other) is not None
    with pytest.raises(common.UsageError, match="prompt_llama70b.txt"):
        clouds.read_prompts(tmp_path / "missing.txt")


def test_official_prompt_constants():
    assert clouds.PROMPTS_MD5 == "bed7a3432ccdf99180913134fb92431e"
    assert (clouds.PROMPTS_LINES, clouds.PROMPTS_BYTES) == (100, 5831)


def test_generated_folder_layouts(tmp_path):
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "im_0_p0.png")
    (tmp_path / "official" / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "official" / "images" / "im_3_p3.png")
    assert len(clouds.GeneratedImages(tmp_path / "flat")) == 1
    image, name = clouds.GeneratedImages(tmp_path / "official")[0]
    assert tuple(image.shape) == (3, 8, 8) and name == "im_3_p3"
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.UsageError, match="no \\*.png"):
        clouds.GeneratedImages(tmp_path / "empty")


# =============================================================================================
# Optimisation
# =============================================================================================


def test_param_groups_no_decay_for_norms_and_embeddings():
    encoder = clouds.FrozenCLIPEncoder("test", "none")
    head = clouds.build_head(encoder)
    decay, no_decay = clouds.param_groups(head)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in head.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert len(decay_names) + len(no_decay_names) == len(names)
    assert {
        "transformer_decoder.query_feat.weight",
        "transformer_decoder.query_embed.weight",
        "transformer_decoder.level_embed.weight",
        "transformer_decoder.decoder_norm.weight",
        "pixel_decoder.input_proj.0.1.weight",
        "pixel_decoder.encoder_layers.0.norm1.bias",
        "transformer_decoder.layers.3.norm_cross.weight",
    } <= no_decay_names
    assert "pixel_decoder.level_embed" in decay_names  # a plain Parameter: decays, as official
    assert "transformer_decoder.class_embed.bias" in decay_names
    norm_params = sum(
        p.numel()
        for m in head.modules()
        if isinstance(m, clouds.NORM_TYPES)
        for p in m.parameters(recurse=False)
    )
    embed_params = sum(
        p.numel()
        for m in head.modules()
        if isinstance(m, torch.nn.Embedding)
        for p in m.parameters()
    )
    assert sum(p.numel() for p in no_decay["params"]) == norm_params + embed_params


def test_lr_schedule():
    assert clouds.lr_at(0, 1e-5, "constant", 40000) == 1e-5
    assert clouds.lr_at(39999, 1e-5, "constant", 40000) == 1e-5
    assert clouds.lr_at(0, 1e-5, "poly", 30000) == 1e-5
    assert clouds.lr_at(15000, 1e-5, "poly", 30000) == pytest.approx(5.359e-6, rel=1e-3)
    assert clouds.lr_at(15000, 1e-5, "poly", 30000) == pytest.approx(1e-5 * 0.5**0.9)


def test_recipe_table():
    r = clouds.RECIPE
    assert (r[("gta", "warmup")]["iters"], r[("gta", "joint")]["iters"]) == (40000, 40000)
    assert r[("synthia", "joint")] == dict(
        iters=30000, lr=1e-5, lr_schedule="poly", eval_every=1500
    )
    assert (r[("cityscapes", "warmup")]["iters"], r[("cityscapes", "joint")]["iters"]) == (
        5000,
        10000,
    )
    assert (
        r[("cityscapes", "joint")]["lr"] == 1e-4
        and r[("gta", "joint")]["lr_schedule"] == "constant"
    )
    assert clouds.GEN_FACTOR == {"gta": 2.0, "synthia": 0.7, "cityscapes": 0.2, "toy": 1.0}


def test_recipe_defaults_follow_source_and_phase():
    """The presets are real argparse defaults of the chosen --source / --phase: no None left to
    resolve after parsing, and a flag given on the command line wins."""
    args, notes = clouds.parse_args(["--source", "synthia", "--phase", "joint", "--init", "w.pt"])
    assert (args.iters, args.lr, args.lr_schedule, args.eval_every) == (30000, 1e-5, "poly", 1500)
    assert args.gen_factor == 0.7 and args.targets == "cityscapes,bdd,mapillary"
    assert args.pretrained == "laion2b_s29b_b131k_ft_soup" and args.sam == "mobile_sam"
    assert (
        args.generated == os.path.join("./data", "stable_diffusion", "sd_llama70b_v2")
        and notes == []
    )
    argv = ["--source", "cityscapes", "--backbone", "RN50-quickgelu", "--iters", "7"]
    args, _ = clouds.parse_args(argv)
    assert args.iters == 7 and args.lr == 1e-4 and args.pretrained == "openai"
    assert args.targets == "acdc-night,acdc-rain,acdc-snow,acdc-fog,cityscapes"
    assert args.gen_factor == 0.2 and args.eval_every == 500 and args.lr_schedule == "constant"
    args, _ = clouds.parse_args(
        ["--source", "toy", "--data", "D", "--phase", "joint", "--init", "w"]
    )
    assert (args.iters, args.backbone, args.sam, args.crop) == (10, "test", "fake", 64)
    assert (args.num_points, args.num_queries, args.fast, args.lr) == (256, 10, "on", 1e-4)
    assert args.generated == os.path.join("D", "toy_generated") and args.pretrained == "none"
    names = ("lr", "lr_schedule", "gen_factor", "targets", "iters", "eval_every", "pretrained")
    assert None not in [getattr(args, n) for n in (*names, "generated")]
    with pytest.raises(common.UsageError, match="--init"):
        clouds.parse_args(["--phase", "joint"])


def test_help_shows_the_defaults_of_the_chosen_preset(run_script):
    out = run_script("clouds.py", "--source", "synthia", "--phase", "joint", "--help").stdout
    flat = " ".join(out.split())
    for text in ("--iters ITERS optimizer steps (default 30000", "(default poly;",
                 "(default 0.7;", "(default 1500;", "cityscapes,bdd,mapillary"):  # fmt: skip
        assert text in flat, text


# =============================================================================================
# Released CLOUDS checkpoints (detectron2 .pth) [C clouds.py, msdeformattn.py,
# mask2former_transformer_decoder.py]
# =============================================================================================


def official_head_keys() -> list[str]:
    """The official parameter names of the closed-set head, written from the official modules."""
    keys = []
    pd = "sem_seg_head.pixel_decoder."
    for i in range(3):
        keys += [f"{pd}input_proj.{i}.{j}.{t}" for j in (0, 1) for t in ("weight", "bias")]
    keys.append(f"{pd}transformer.level_embed")
    for i in range(6):
        layer = f"{pd}transformer.encoder.layers.{i}."
        for m in (
            "self_attn.sampling_offsets",
            "self_attn.attention_weights",
            "self_attn.value_proj",
            "self_attn.output_proj",
            "norm1",
            "linear1",
            "linear2",
            "norm2",
        ):
            keys += [f"{layer}{m}.weight", f"{layer}{m}.bias"]
    keys += [
        f"{pd}mask_features.weight",
        f"{pd}mask_features.bias",
        f"{pd}adapter_1.weight",
        f"{pd}adapter_1.norm.weight",
        f"{pd}adapter_1.norm.bias",
        f"{pd}layer_1.weight",
        f"{pd}layer_1.norm.weight",
        f"{pd}layer_1.norm.bias",
    ]
    pr = "sem_seg_head.predictor."
    for i in range(9):
        for group, attn in (
            ("transformer_self_attention_layers", "self_attn"),
            ("transformer_cross_attention_layers", "multihead_attn"),
        ):
            keys += [
                f"{pr}{group}.{i}.{attn}.{t}"
                for t in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
            ]
            keys += [f"{pr}{group}.{i}.norm.weight", f"{pr}{group}.{i}.norm.bias"]
        keys += [
            f"{pr}transformer_ffn_layers.{i}.{m}.{t}"
            for m in ("linear1", "linear2", "norm")
            for t in ("weight", "bias")
        ]
    keys += [
        f"{pr}{m}"
        for m in (
            "decoder_norm.weight",
            "decoder_norm.bias",
            "query_feat.weight",
            "query_embed.weight",
            "level_embed.weight",
            "class_embed.weight",
            "class_embed.bias",
        )
    ]
    keys += [f"{pr}mask_embed.layers.{i}.{t}" for i in range(3) for t in ("weight", "bias")]
    return keys


def test_official_head_names_cover_the_head_exactly():
    with torch.device("meta"):
        head = clouds.Mask2FormerHead(list(CONVNEXT_L))
    ours = head.state_dict()
    mapped = [
        clouds.rename_official_head_key(k[len("sem_seg_head.") :]) for k in official_head_keys()
    ]
    assert len(mapped) == len(set(mapped)) == len(ours)
    assert set(mapped) == set(ours)
    assert clouds.rename_official_head_key("predictor.mask_embed.layers.2.bias") == (
        "transformer_decoder.mask_embed.4.bias"
    )
    assert clouds.rename_official_head_key("pixel_decoder.adapter_1.norm.weight") == (
        "pixel_decoder.lateral_conv.1.weight"
    )


@pytest.mark.parametrize("backbone", ["convnext_large_d_320", "RN50-quickgelu"])
def test_official_backbone_keys_load_and_text_tower_is_dropped(backbone):
    import open_clip

    with torch.device("meta"):
        clip = open_clip.create_model(backbone, pretrained=None, device="meta")
    state = {f"backbone.clip_model.{k}": v for k, v in clip.state_dict().items()}
    state["void_embedding.weight"] = torch.zeros(1, 768, device="meta")
    state["criterion.empty_weight"] = torch.ones(20, device="meta")
    visual, head, teacher, dropped = clouds.split_official_state_dict({"model": state})
    encoder = clouds.FrozenCLIPEncoder(backbone, "none", device="meta")
    assert set(visual) == {f"visual.{k}" for k in encoder.visual.state_dict()}
    result = encoder.load_state_dict(visual, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert head == {} and teacher == {}
    reasons = " ".join(dropped)
    assert "text tower" in reasons and "void" in reasons and "criterion" in reasons
    text = [k for keys in dropped.values() for k in keys if ".transformer." in k]
    assert text and all(not k.startswith("backbone.clip_model.visual.") for k in text)


def test_official_checkpoint_end_to_end(tmp_path, capsys):
    """A released-style .pth (test encoder under backbone.clip_model.visual, head under official
    names, teacher keys, dropped extras) loads with zero missing/unexpected keys."""
    torch.manual_seed(0)
    encoder = clouds.FrozenCLIPEncoder("test", "none")
    head = clouds.build_head(encoder)
    ours = head.state_dict()
    state = {}
    for key in official_head_keys():
        name = clouds.rename_official_head_key(key[len("sem_seg_head.") :])
        state[key] = torch.randn(ours[name].shape)
        state["sem_seg_head_ema." + key[len("sem_seg_head.") :]] = torch.randn(ours[name].shape)
    for k, v in encoder.visual.state_dict().items():
        state[f"backbone.clip_model.visual.{k}"] = torch.randn(v.shape)
    state["backbone.clip_model.logit_scale"] = torch.tensor(4.6)
    state["void_embedding.weight"] = torch.zeros(1, 768)
    state["sam.sam.image_encoder.patch_embed.proj.weight"] = torch.zeros(1)
    path = tmp_path / "model_final.pth"
    torch.save({"model": state, "iteration": 39999}, path)

    args, _ = clouds.parse_args(["--backbone", "test", "--pretrained", str(path)])
    encoder2, head2, report = clouds.load_weights(args)
    assert torch.equal(
        head2.transformer_decoder.mask_embed[2].weight,
        state["sem_seg_head.predictor.mask_embed.layers.1.weight"],
    )
    assert torch.equal(
        head2.pixel_decoder.encoder_layers[5].self_attn.value_proj.bias,
        state["sem_seg_head.pixel_decoder.transformer.encoder.layers.5.self_attn.value_proj.bias"],
    )
    assert torch.equal(
        encoder2.visual.stem[0].weight, state["backbone.clip_model.visual.stem.0.weight"]
    )
    assert report["head_tensors"] == len(ours)
    out = capsys.readouterr().out
    assert "dropped 1 keys" in out and "SAM" in out and "void" in out
    teacher = clouds.EMATeacher(head2)
    clouds.load_official_checkpoint(torch.load(path, weights_only=True), encoder2, head2, teacher)
    assert torch.equal(
        teacher.head.transformer_decoder.query_feat.weight,
        state["sem_seg_head_ema.predictor.query_feat.weight"],
    )
    # an unknown key is refused, not ignored
    state["something.else"] = torch.zeros(1)
    with pytest.raises(common.UsageError, match="unexpected keys"):
        clouds.split_official_state_dict({"model": state})


# =============================================================================================
# Source splits, local CLIP weight files, checkpoint naming
# =============================================================================================


def test_source_split_of_each_source(data_root):
    """GTA5: the CLOUDS list (24,966 minus 62 = 24,904); SYNTHIA: every frame (9,400, also when
    FAMix's val list is present); Cityscapes: train."""
    assert len(common.GTA5_CLOUDS_EXCLUDED) == 62 and 24_966 - 62 == 24_904
    assert clouds.SOURCE_SPLIT == {"gta": "train", "synthia": "all", "cityscapes": "train",
                                   "toy": "train"}  # fmt: skip
    names = {}
    for source in ("gta", "synthia", "cityscapes"):
        args, _ = clouds.parse_args(["--source", source, "--data", str(data_root)])
        train_set, factors = clouds.build_train_set(args)
        assert factors is None and train_set.generated is None
        names[source] = sorted(image.stem for image, _ in train_set.source.pairs)
    # 00003 has a label of another size (skipped), 15188 is one of the 62 frames CLOUDS leaves out
    assert names["gta"] == ["00001", "00002"]
    assert names["synthia"] == ["0000000", "0000001", "0000002"]  # 0000001 is FAMix's val
    assert names["cityscapes"] == ["aachen_000000_000019_leftImg8bit"]


def clip_state(encoder: clouds.FrozenCLIPEncoder, seed: int) -> dict:
    """A CLIP-style state dict for the test encoder: visual.* + text-tower and projection keys."""
    g = torch.Generator().manual_seed(seed)
    own = encoder.visual.state_dict()
    state = {f"visual.{k}": torch.randn(v.shape, generator=g) for k, v in own.items()}
    state["token_embedding.weight"], state["logit_scale"] = torch.zeros(4, 2), torch.tensor(4.6)
    state["visual.attnpool.c_proj.weight"] = torch.zeros(2, 2)
    return state


def test_clip_state_dict_file_is_loaded(tmp_path, capsys):
    """--pretrained FILE (an open_clip state dict, here under state_dict with DDP's module.
    prefix) lands in the frozen encoder: every visual tensor, counted; text tower not used."""
    encoder = clouds.FrozenCLIPEncoder("test")
    state = clip_state(encoder, 0)
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    args, _ = clouds.parse_args(["--backbone", "test", "--pretrained", str(path)])
    backbone, _, report = clouds.load_weights(args)
    n = len(encoder.visual.state_dict())
    assert report["clip_tensors"] == n
    for k, v in backbone.visual.state_dict().items():
        assert torch.equal(v, state[f"visual.{k}"]), k
    out = capsys.readouterr().out
    assert f"CLIP weights: loaded {n} tensors from {path}" in out and "3 text-tower" in out


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_openai_torchscript_file_is_loaded(tmp_path):
    """OpenAI's released CLIP files are TorchScript archives: read as open_clip reads them."""

    class CLIP(torch.nn.Module):
        def __init__(self, visual: torch.nn.Module):
            super().__init__()
            self.visual, self.text_projection = visual, torch.nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.text_projection(x)

    encoder = clouds.FrozenCLIPEncoder("test")
    donor = CLIP(clouds.TinyCLIPVisual(encoder.channels))
    path = tmp_path / "RN50.pt"
    torch.jit.save(torch.jit.script(donor), str(path))
    args, _ = clouds.parse_args(["--backbone", "test", "--pretrained", str(path)])
    backbone, _, report = clouds.load_weights(args)
    assert report["clip_tensors"] == len(encoder.visual.state_dict())
    assert torch.equal(backbone.visual.stem[0].weight, donor.visual.stem[0].weight)
    # another encoder's weights do not fit: one line naming the flag to check
    other = {k.replace("visual.", "visual.x", 1): v for k, v in clip_state(encoder, 1).items()}
    torch.save(other, tmp_path / "other.pt")
    args, _ = clouds.parse_args(["--backbone", "test", "--pretrained", str(tmp_path / "other.pt")])
    with pytest.raises(common.CheckpointError, match="--backbone test"):
        clouds.load_weights(args)


def test_encoder_fingerprint_guards_checkpoints():
    """A checkpoint records the fingerprint of the frozen encoder it was trained on (it leaves
    the encoder out): another encoder is refused with one line naming both --pretrained values;
    a checkpoint from before the fingerprint (none recorded) loads as before."""
    encoder = clouds.FrozenCLIPEncoder("test")
    head = clouds.build_head(encoder, num_queries=3)
    fp = clouds.encoder_fingerprint(encoder)
    assert isinstance(fp, float)
    state = {f"head.{k}": v for k, v in head.state_dict().items()}
    state |= {f"backbone.{k}": v for k, v in encoder.state_dict().items()}
    ckpt = {"model": state, "args": {"pretrained": "a.pt", "backbone": "test", "num_queries": 3}}
    for recorded in (None, fp):  # an older checkpoint; one trained on this encoder
        if recorded is not None:
            ckpt["encoder_fingerprint"] = recorded
        assert clouds.load_model_state(encoder, head, ckpt, "--resume r.pt", "a.pt") > 0
    with torch.no_grad():
        encoder.visual.stem[0].weight.add_(0.01)  # the first tensor: other weights
    with pytest.raises(common.CheckpointError) as info:
        clouds.load_model_state(encoder, head, ckpt, "--resume r.pt", "b.pt")
    line = str(info.value)
    assert line.startswith("--resume r.pt was trained on the frozen encoder of --pretrained a.pt")
    assert f"(fingerprint {fp:.10g}), this run has --pretrained b.pt (fingerprint" in line
    assert line.endswith("pass the same --pretrained") and "\n" not in line
    with pytest.raises(common.CheckpointError, match="pass the same --pretrained and --seed$"):
        clouds.load_model_state(encoder, head, ckpt, "--init r.pt", "none")


def test_checkpoint_keys_have_no_wrapper_prefixes():
    """The forward pass may run a wrapped head (DDP, torch.compile); checkpoints name the head's
    own keys, and the test encoder's."""
    encoder = clouds.FrozenCLIPEncoder("test")
    head = clouds.build_head(encoder, num_queries=3)
    model = clouds.CLOUDS(encoder, head, torch.nn.Sequential(head), clouds.SetCriterion())
    keys = set(clouds.model_state(model))
    assert keys == {f"head.{k}" for k in head.state_dict()} | {
        f"backbone.{k}" for k in encoder.state_dict()
    }


# =============================================================================================
# The script on the toy data
# =============================================================================================

TINY = ("--crop", "32", "--num-points", "64", "--batch-size", "2", "--cpu-threads", "1")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread in this process: bitwise comparisons need a fixed thread count, and
    tiny tensors gain nothing from more."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(toy_data, data_root, tmp_path_factory) -> Path:
    """A --data root holding the toy source and the tiny Cityscapes / ACDC trees as targets
    (two images each: evaluations cost little)."""
    root = tmp_path_factory.mktemp("clouds_data")
    for name, parent in (("toy", toy_data), ("cityscapes", data_root), ("acdc", data_root)):
        (root / name).symlink_to(parent / name, target_is_directory=True)
    return root


def toy_args(data: Path, out: Path, *extra: str) -> list[str]:
    """A toy run at the smallest sizes: 32 px crops, 64 matcher/criterion points, batch 2, one
    CPU thread (bitwise comparisons need a fixed thread count)."""
    base = ["--source", "toy", "--pretrained", "none", "--device", "cpu", "--data", str(data)]
    return [*base, "--out", str(out), *TINY, *extra]


@contextlib.contextmanager
def restore_threads():
    n = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(n)


def run_main(*argv: str) -> str:
    """clouds.main in this process; returns what it printed."""
    out = io.StringIO()
    with restore_threads(), contextlib.redirect_stdout(out):
        clouds.main(list(argv))
    return out.getvalue()


def joint_flags(gen: Path, n: int = 4) -> list[str]:
    """The joint phase with every batch mostly generated images and a teacher update each step."""
    return ["--phase", "joint", "--generated", str(gen), "--make-toy-generated", str(n),
            "--gen-factor", "100", "--ema-every", "1", "--targets", ""]  # fmt: skip


@pytest.fixture(scope="module")
def warmup_run(data, tmp_path_factory):
    """Warm-up, 1 iteration, evaluated on the Cityscapes tree."""
    out = tmp_path_factory.mktemp("clouds") / "warm"
    stdout = run_main(*toy_args(data, out, "--iters", "1", "--targets", "cityscapes"))
    return out, stdout


@pytest.fixture(scope="module")
def joint_run(toy_data, warmup_run, tmp_path_factory):
    """Joint phase, 2 iterations straight, from the warm-up checkpoint."""
    tmp = tmp_path_factory.mktemp("clouds_joint")
    warm = str(warmup_run[0] / "last.pt")
    run_main(
        *toy_args(toy_data, tmp / "a", "--iters", "2", "--init", warm, *joint_flags(tmp / "g"))
    )
    return tmp / "a", tmp / "g"


def test_warmup_run_outputs(warmup_run):
    out, stdout = warmup_run
    # 19,537,108 with 20 queries; the toy's 10 have 2 x 10 x 256 parameters fewer
    assert "parameters: total" in stdout and "head 19,531,988" in stdout
    assert "data: 240 source images (toy train)" in stdout
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"cityscapes"} and results["cityscapes"]["num_images"] == 2
    assert 0 <= results["cityscapes"]["miou"] <= 100
    assert set(results["cityscapes"]["per_class_iou"]) == set(common.CLASS_NAMES)
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["method"] == "clouds" and ckpt["iter"] == 1 and ckpt["teacher"] is None
    assert any(k.startswith("head.") for k in ckpt["model"])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[0]["parameters"]["head"] == 19_531_988
    assert records[0]["args"]["phase"] == "warmup"
    assert [r["type"] for r in records[1:]] == ["train", "eval"]
    assert {"loss", "loss_ce", "loss_mask", "loss_dice", "grad_norm", "time_s"} <= set(records[1])


def test_joint_training_resume_equals_straight_run(toy_data, warmup_run, joint_run, tmp_path):
    """joint 1 + resume 1 == joint 2: student, teacher, EMA counter, optimizer, sampler, SAM."""
    warm, (straight, gen) = str(warmup_run[0] / "last.pt"), joint_run
    flags = joint_flags(gen)
    run_main(*toy_args(toy_data, tmp_path / "b", "--iters", "1", "--init", warm, *flags))
    resume = str(tmp_path / "b" / "last.pt")
    run_main(*toy_args(toy_data, tmp_path / "b", "--iters", "2", "--resume", resume, *flags))
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert a["iter"] == b["iter"] == 2
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["teacher"]["iteration"] == b["teacher"]["iteration"] == 2
    for k in a["teacher"]["head"]:
        assert torch.equal(a["teacher"]["head"][k], b["teacher"]["head"][k]), k
    for group_a, group_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(group_a["exp_avg"], group_b["exp_avg"])
    assert len(list(gen.glob("im_*_p*.png"))) == 4
    logs = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert sum(r.get("generated", 0) for r in logs if r.get("type") == "train") >= 2


def test_joint_without_sam_in_process(toy_data, warmup_run, tmp_path):
    """--sam none: the teacher's argmax targets are used as they are (no-SAM ablation)."""
    warm = str(warmup_run[0] / "last.pt")
    flags = [*joint_flags(tmp_path / "gen"), "--sam", "none"]
    run_main(*toy_args(toy_data, tmp_path / "j", "--init", warm, "--iters", "1", *flags))
    ckpt = torch.load(tmp_path / "j" / "last.pt", weights_only=True)
    assert ckpt["args"]["sam"] == "none" and ckpt["teacher"]["iteration"] == 1
    logs = [json.loads(line) for line in (tmp_path / "j" / "log.jsonl").read_text().splitlines()]
    assert next(r["generated"] for r in logs if r.get("type") == "train") > 0


def test_eval_only_in_process(data, warmup_run, tmp_path):
    warm = str(warmup_run[0] / "last.pt")
    argv = toy_args(data, tmp_path / "e", "--eval-only", "--init", warm, "--targets", "acdc-fog")
    out = run_main(*argv)
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert common.format_results(results) in out
    assert 0 <= results["acdc-fog"]["miou"] <= 100 and results["acdc-fog"]["num_images"] == 2


def test_checkpoint_is_written_before_each_evaluation(toy_data, tmp_path, monkeypatch):
    """last.pt of iteration i exists when evaluation i starts (a failing target loses nothing)."""
    seen = []

    def evaluate(model, targets, args, dist):
        seen.append(torch.load(tmp_path / "w" / "last.pt", weights_only=True)["iter"])
        return {}

    monkeypatch.setattr(clouds, "evaluate", evaluate)
    run_main(*toy_args(toy_data, tmp_path / "w", "--iters", "2", "--eval-every", "1"))
    assert seen == [1, 2]


def test_ctrl_c_says_where_the_run_stopped(toy_data, tmp_path, monkeypatch):
    """Ctrl-C in the loop: common.Interrupted with the iterations done and the last checkpoint."""
    step, calls = clouds.train_step, []

    def interrupted_at_3(model, batch, generators, args):
        calls.append(len(calls))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(model, batch, generators, args)

    monkeypatch.setattr(clouds, "train_step", interrupted_at_3)
    argv = toy_args(toy_data, tmp_path / "c", "--iters", "4", "--eval-every", "1", "--targets", "")
    with pytest.raises(common.Interrupted) as info:
        run_main(*argv)
    assert (info.value.done, info.value.iters) == (2, 4)
    assert info.value.saved == (tmp_path / "c" / "last.pt", 2)
    assert torch.load(tmp_path / "c" / "last.pt", weights_only=True)["iter"] == 2


def test_fast_path_gives_the_plain_results(toy_data):
    """--fast on (channels_last encoder and input, fused AdamW) against --fast off on CPU: the same
    loss terms over three steps (relative tolerance 1e-5) and the same evaluation. NHWC
    convolutions and the fused AdamW kernel round the same float32 sums in another order (the
    last bits: observed <= 2.2e-7 relative here); the mask losses pick their points by ranking
    |logit| (PointRend importance sampling), so at 1024 points a last-bit difference could swap
    a point and move the loss by ~1e-5 at most; a change of computation moves it by far more."""
    batches = [clouds.synthetic_batch(2, 32, 0, seed=s) for s in range(3)]
    night = common.build_dataset("toy-night", toy_data, "val")
    losses, results, formats = {}, {}, {}
    for fast in ("off", "on"):
        argv = ["--source", "toy", "--data", str(toy_data), "--fast", fast, "--crop", "32"]
        args, _ = clouds.parse_args(argv)
        dist = common.Dist()
        torch.manual_seed(0)
        model, scaler, _ = clouds.build_model(args, dist)
        options = common.optimizer_options(args, dist, "adamw")
        optimizer = torch.optim.AdamW(clouds.param_groups(model.head), lr=args.lr, **options)
        losses[fast] = []
        assert scaler is None  # CPU: fp32, no GradScaler
        for it, batch in enumerate(batches):
            optimizer.zero_grad(set_to_none=True)
            gens = common.step_generators(args.seed, it, 2, dist)
            loss, terms = clouds.train_step(model, batch, gens, args)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.head.parameters(), clouds.GRAD_CLIP)
            optimizer.step()
            losses[fast].append(terms)
        formats[fast] = (model.backbone.memory_format, options)
        subset = torch.utils.data.Subset(night, range(4))
        results[fast] = clouds.evaluate(model, {"toy-night": subset}, args, dist)
    assert formats == {
        "off": (torch.contiguous_format, {}),
        "on": (torch.channels_last, {"fused": True}),
    }
    for on, off in zip(losses["on"], losses["off"]):
        for key in ("loss", "loss_ce", "loss_mask", "loss_dice"):
            assert on[key] == pytest.approx(off[key], rel=1e-5), key
    assert results["on"] == results["off"]


def test_step_shares_of_the_benchmark(toy_data):
    """The bench's component shares: backbone, MSDeformAttn and loss each take part of a step."""
    argv = ["--source", "toy", "--phase", "joint", "--bench", "--num-queries", "5", *TINY[:4]]
    args, _ = clouds.parse_args(argv)
    dist = common.Dist()
    model, scaler, _ = clouds.build_model(args, dist)
    optimizer = torch.optim.AdamW(clouds.param_groups(model.head), lr=1e-4)
    data = clouds.synthetic_batch(2, 32, 1)

    assert scaler is None  # CPU: fp32, no GradScaler

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = clouds.train_step(model, data, common.step_generators(0, 1, 2, dist), args)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.head.parameters(), clouds.GRAD_CLIP)
        optimizer.step()

    shares = clouds.step_shares(model, step, data, torch.device("cpu"), 1)
    assert set(shares) == {"share_backbone", "share_msdeformattn", "share_loss", "shares_how"}
    for key in ("share_backbone", "share_msdeformattn", "share_loss"):
        assert 0 < shares[key] < 1.5, shares


# =============================================================================================
# Bad inputs: one line, exit code 2, no traceback
# =============================================================================================


def one_error_line(proc) -> str:
    """Exit code 2, no traceback, exactly one `error:` line (after a progress bar's last
    refresh, when one was on screen); returns it."""
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.count("error: ") == 1, proc.stderr
    return "error: " + proc.stderr.split("error: ", 1)[1].splitlines()[0]


def test_bad_inputs_as_processes(run_script, toy_data, warmup_run, joint_run, tmp_path):
    """The command line: exit code 2 and one line, for a flag, a file and a checkpoint error."""
    warm, joint = warmup_run[0] / "last.pt", joint_run[0] / "last.pt"
    gen = ["--generated", str(tmp_path / "gen"), "--make-toy-generated", "2"]
    cases = [
        (["--num-queries", "0"], "argument --num-queries: must be >= 1"),
        (["--pretrained", "/no/such/file.pt"], "--pretrained /no/such/file.pt: no such file"),
        (["--phase", "joint", "--init", str(joint), *gen], "is a --phase joint checkpoint"),
        (["--resume", str(warm), "--num-queries", "12"], "trained with --num-queries 10, this"),
    ]
    for k, (extra, expected) in enumerate(cases):
        proc = run_script("clouds.py", *toy_args(toy_data, tmp_path / f"o{k}", *extra))
        assert expected in one_error_line(proc), extra
        assert not (tmp_path / f"o{k}" / "last.pt").exists()


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--targets", "toy-city,toy-nowhere"], "unknown toy target 'toy-nowhere'"),
        (["--phase", "joint", "--init", "nope.pt", "GEN"], "--init checkpoint not found: nope.pt"),
        (["--phase", "joint", "--init", "W", "--generated", "nowhere"], "nowhere: no such folder"),
        (["--source", "gta", "--make-toy-generated", "3"], "--make-toy-generated is for"),
        (["--init", "W", "--num-queries", "7"], "trained with --backbone test --num-queries 10"),
        (["--phase", "joint", "--resume", "W", "GEN"], "is a --phase warmup checkpoint"),
        (["--resume", "W", "--backbone", "RN50-quickgelu"], "trained with --backbone test, this"),
    ],
)
def test_bad_inputs_are_one_line_errors(toy_data, warmup_run, tmp_path, extra, expected):
    """The same errors in this process (run_cli turns each into one line and exit code 2)."""
    names = {"W": [str(warmup_run[0] / "last.pt")], "GEN": ["--generated", str(tmp_path / "g"),
                                                          "--make-toy-generated", "2"]}  # fmt: skip
    extra = [word for w in extra for word in names.get(w, [w])]
    with pytest.raises(common.UsageError) as info:
        run_main(*toy_args(toy_data, tmp_path / "o", "--no-eval-before", *extra))
    assert expected in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "o" / "last.pt").exists()


def test_numbers_are_validated(capsys):
    for flag, value in (("--num-points", "0"), ("--sam-points", "0"), ("--sam-min-area", "-1"),
                        ("--ema-every", "0"), ("--gen-factor", "0"), ("--lr", "-1"),
                        ("--make-toy-generated", "-5"), ("--iters", "0"),
                        ("--ema-alpha", "1.5")):  # fmt: skip
        with pytest.raises(SystemExit) as info:
            clouds.parse_args(["--source", "toy", flag, value])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1 and f"argument {flag}: must be" in err


def test_existing_run_is_not_replaced(run_script, toy_data, warmup_run, tmp_path):
    out = warmup_run[0]
    before = (out / "last.pt").read_bytes()
    proc = run_script("clouds.py", *toy_args(toy_data, out, "--iters", "1"))
    assert "already holds a run" in one_error_line(proc)
    assert (out / "last.pt").read_bytes() == before


def test_divergence_stops_before_the_matcher(run_script, toy_data, tmp_path):
    """--lr 1e30: the predictions blow up at the second step; one line names the iteration (not
    scipy's "matrix contains invalid numeric entries")."""
    proc = run_script(
        "clouds.py", *toy_args(toy_data, tmp_path / "d", "--lr", "1e30", "--iters", "4")
    )
    line = one_error_line(proc)
    assert "iteration 2: the predictions" in line and "not finite" in line and "--lr" in line
    assert "invalid numeric" not in proc.stderr


def test_open_clip_tag_offline_fails_at_once(run_script, toy_data, tmp_path):
    """An open_clip tag missing from the local cache, offline: one line, no download retries."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    argv = toy_args(
        toy_data, tmp_path / "t", "--backbone", "RN50-quickgelu", "--pretrained", "openai"
    )
    line = one_error_line(run_script("clouds.py", *argv, env=env))
    assert "cannot download the open_clip weights RN50-quickgelu / openai" in line
    assert "--pretrained FILE" in line


def test_unused_values_get_one_warning(toy_data, tmp_path, capsys):
    _, notes = clouds.parse_args(["--source", "toy", "--generated", "x", "--ema-alpha", "0.5"])
    assert notes == ["--generated, --ema-alpha: only the joint phase uses them; this warm-up run "
                     "ignores them"]  # fmt: skip
    argv = ["--source", "toy", "--phase", "joint", "--init", "w", "--sam-checkpoint", "s.pt"]
    assert clouds.parse_args(argv)[1] == ["--sam-checkpoint is not used with --sam fake"]
    assert clouds.parse_args(["--source", "toy"])[1] == []
    with pytest.raises(common.UsageError, match="unknown dataset 'nope'"):
        run_main(*toy_args(toy_data, tmp_path / "u", "--gen-factor", "3", "--targets", "nope"))
    err = capsys.readouterr().err
    assert err.count("warning: ") == 1 and "--gen-factor" in err


# =============================================================================================
# Inputs that cannot be mixed up, and two processes
# =============================================================================================


def test_source_labels_are_checked_before_training(toy_data, monkeypatch):
    """The source reader (not the joint wrapper) is checked: labels that decode to 255 everywhere
    (a wrong encoding) stop the run with one line before training."""
    build = common.build_dataset

    def blank_labels(*args, **kwargs):
        dataset = build(*args, **kwargs)
        dataset.decode = lambda path: torch.full((4, 4), 255)
        return dataset

    monkeypatch.setattr(common, "build_dataset", blank_labels)
    args, _ = clouds.parse_args(["--source", "toy", "--data", str(toy_data)])
    with pytest.raises(common.DataFileError, match="hold no pixel of the 19 classes"):
        clouds.build_train_set(args)


def test_clip_file_run_and_encoder_fingerprint(toy_data, tmp_path, caplog, capsys):
    """--pretrained FILE (random RN50 weights in open_clip's state-dict form): open_clip's "No
    pretrained weights loaded ... initialized randomly" is not logged before the file loads. The
    run's checkpoint (encoder left out) keeps the encoder's fingerprint: --resume with another
    file and --init on a random encoder (--pretrained none) are refused with one line."""
    encoder = clouds.FrozenCLIPEncoder("RN50-quickgelu")
    state = {f"visual.{k}": v for k, v in encoder.visual.state_dict().items()}
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    for path, delta in ((a, 0.01), (b, 0.02)):  # neither is the random init of --seed 0
        conv1 = state["visual.conv1.weight"] + delta
        torch.save(state | {"visual.conv1.weight": conv1, "logit_scale": torch.tensor(4.6)}, path)
    out = tmp_path / "run"
    rn50 = ("--backbone", "RN50-quickgelu", "--no-eval-before", "--targets", "")
    caplog.clear()
    stdout = run_main(*toy_args(toy_data, out, *rn50, "--pretrained", str(a), "--iters", "1"))
    assert f"CLIP weights: loaded {len(state)} tensors from {a}" in stdout
    assert "initialized randomly" not in caplog.text + capsys.readouterr().err
    last = out / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["backbone_omitted"] and isinstance(ckpt["encoder_fingerprint"], float)
    trained = f"was trained on the frozen encoder of --pretrained {a} (fingerprint "
    fp = f"{ckpt['encoder_fingerprint']:.10g}), this run has --pretrained"
    cases = [(["--pretrained", str(b), "--resume", str(last), "--iters", "2"], "--resume", str(b)),
             (["--eval-only", "--init", str(last)], "--init", "none")]  # fmt: skip
    for k, (extra, flag, ours) in enumerate(cases):
        with pytest.raises(common.CheckpointError) as info:
            run_main(*toy_args(toy_data, tmp_path / f"o{k}", *rn50, *extra))
        assert str(info.value).startswith(f"{flag} {last} {trained}{fp} {ours} (fingerprint ")
        assert "pass the same --pretrained" in str(info.value)


def test_two_processes_equal_one(toy_data, warmup_run, tmp_path):
    """Joint phase (EMA teacher every step, fake SAM, batches of source and generated images),
    global batch 2: one process 2 steps (A2), resumed to 4 (A4); two processes x 1 image resumed
    from A2 to 3 (B3, the one torchrun call), then one process from B3 to 4 (C4). A4 == C4 within
    1e-5 (student and teacher) and B3's logged loss at iteration 3 == A4's: 2 processes = 1, and a
    checkpoint of either resumes in the other. Image k of the global batch draws its SAM points
    and criterion points from the generator of (seed, iteration, k), on any number of processes."""
    from conftest import max_tensor_diff, torchrun

    warm, gen = str(warmup_run[0] / "last.pt"), tmp_path / "g"
    flags = [*joint_flags(gen), "--gen-factor", "30", "--log-every", "1"]

    def run(name: str, iters: int, *start: str) -> Path:
        run_main(*toy_args(toy_data, tmp_path / name, "--iters", str(iters), *start, *flags))
        return tmp_path / name / "last.pt"

    a2 = run("a2", 2, "--init", warm)
    a4 = run("a4", 4, "--resume", str(a2))
    argv = toy_args(toy_data, tmp_path / "b3", "--iters", "3", "--resume", str(a2), *flags)
    proc = torchrun("clouds.py", *argv, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch: 2 global, 1 per process x 2" in proc.stdout
    c4 = run("c4", 4, "--resume", str(tmp_path / "b3" / "last.pt"))
    assert max_tensor_diff(a4, c4) <= 1e-5
    ta, tc = (torch.load(p, weights_only=True)["teacher"] for p in (a4, c4))
    assert ta["iteration"] == tc["iteration"] == 4
    assert max((ta["head"][k] - tc["head"][k]).abs().max().item() for k in ta["head"]) <= 1e-5
    logs = {}
    for name in ("a4", "b3"):
        lines = (tmp_path / name / "log.jsonl").read_text().splitlines()
        logs[name] = {r["iter"]: r for r in map(json.loads, lines) if r.get("type") == "train"}
    # the loss (~130, a sum of 30 float32 terms) agrees to 2e-5 absolute: a few float32 ulps
    assert logs["b3"][3]["loss"] == pytest.approx(logs["a4"][3]["loss"], rel=1e-6)
    assert 0 < sum(logs["a4"][i]["generated"] for i in (3, 4)) < 4  # source and generated


def test_step_draws_only_from_the_image_generators(monkeypatch):
    """A training step draws nothing from the global RNGs, and the SAM prompts of a generated
    image come from its own generator: the same points in a batch of two (place 1) as alone
    with that generator, other points with another."""
    argv = ["--source", "toy", "--phase", "joint", "--bench", "--num-queries", "3", *TINY[:4]]
    args, _ = clouds.parse_args([*argv, "--sam-min-area", "0"])
    model, _, _ = clouds.build_model(args, common.Dist())
    images, clean, labels, is_gen = clouds.synthetic_batch(2, 32, 2)
    fake, points = clouds.fake_sam_predictor, []

    def recording(label_map):
        predict = fake(label_map)
        return lambda image, xy: (points.append(xy), predict(image, xy))[1]

    monkeypatch.setattr(clouds, "fake_sam_predictor", recording)
    state = torch.get_rng_state(), np.random.get_state()[1].copy()
    gens = [torch.Generator().manual_seed(k) for k in (10, 11)]
    clouds.train_step(model, (images, clean, labels, is_gen), gens, args)
    alone = (images[1:], clean[1:], labels[1:], is_gen[1:])
    for seed in (11, 12):
        clouds.train_step(model, alone, [torch.Generator().manual_seed(seed)], args)
    assert len(points) == 4 and np.array_equal(points[1], points[2])
    assert not np.array_equal(points[2], points[3])
    assert torch.equal(torch.get_rng_state(), state[0])
    assert np.array_equal(np.random.get_state()[1], state[1])
