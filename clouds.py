"""CLOUDS: Collaborating Foundation Models for Domain Generalized Semantic Segmentation.

Benigmim, Roy, Essid, Kalogeiton, Lathuiliere, CVPR 2024, pp. 3108-3119 (arXiv 2312.09788).
Official code: https://github.com/yasserben/CLOUDS (Apache-2.0), followed at commit bac4305c31c6.

What the released configs run [C configs/*]: a frozen CLIP image encoder (ConvNeXt-L) and a
closed-set Mask2Former head, trained twice: a warm-up on the labelled source, then a joint run on
source + Stable Diffusion images of 100 LLM prompts, labelled by a head-only EMA teacher (argmax)
whose pseudo-labels SAM refines; the student sees a colour-jittered view.

Paper -> code (section 1 holds the paper's components in the paper's order):
  generated data: LLM prompts -> Stable Diffusion  generate_images (Appendix B), GeneratedImages
  mixing generated and source images               repeat_factors, JointTrainSet
  EMA teacher                                      EMATeacher
  SAM refinement of the pseudo-labels              refine_pseudo_label_with_sam (SAM: Appendix B)
  self-training step                               train_step
  frozen CLIP + Mask2Former head (Appendix A)      FrozenCLIPEncoder, build_head, segment,
                                                   Mask2FormerHead, SetCriterion
  augmentation                                     SourceTransform, generated_views
  training, evaluation                             param_groups, lr_at, train, evaluate
  released checkpoints, CLIP weight files          load_official_checkpoint, load_clip_weights

Launch (1 GPU, paper recipe; the official run used 2 GPUs x 4 images, the same global batch 8):
  python clouds.py --source gta --data ./data --phase warmup --out out/gta_warmup
  python clouds.py --source gta --data ./data --phase joint --init out/gta_warmup/last.pt \\
      --sam mobile_sam --sam-checkpoint weights/mobile_sam.pt --out out/gta_joint
  torchrun --nproc_per_node 2 clouds.py ...same flags...            (DDP, global batch stays 8)
  python clouds.py ...same flags... --resume out/gta_joint/last.pt    (continue exactly)
  python clouds.py --source gta --data ./data --eval-only --pretrained model_final.pth
  python clouds.py generate --prompts prompt_llama70b.txt --sd-path ./stable-diffusion-2 \\
      --out ./data/stable_diffusion/sd_llama70b_v2 --num-images 5000 --part 0 --seed 0
CPU toy run (tiny random encoder, fake SAM; about a minute on 2 cores):
  python clouds.py --source toy --pretrained none --phase warmup --out out/toy_warmup
  python clouds.py --source toy --pretrained none --phase joint --init out/toy_warmup/last.pt \\
      --make-toy-generated 60 --out out/toy_joint

Deviations from the official code (`DEVIATION n:` in the code):
  1. Only the CLIP image trunk is built: the open-vocabulary parts (text tower, void embedding,
     geometric ensemble) are dead code in every released config [C clouds.py::CLOUDS.forward].
  2. SAM runs in eval mode (official: MobileSAM left in train mode, BatchNorm batch statistics).
  3. Generated images of another size than --crop are resized to crop x crop (official: all
     768x768, never resized); SAM works at the image's own size (official: hard-coded 768).
  4. Exact resume: the EMA teacher and its counter are saved in the checkpoint (official: a
     restarted run re-initialises the teacher from the student).
  5. SSD colour jitter in torch, no OpenCV: the uint8 HSV conversions follow opencv-python 4.8
     bit for bit except rare float ties (7 of 196,608 random pixels differ by one grey level);
     Python's `random` draws come from the loader's per-sample torch.Generator instead.
  6. SAM point draws come from the image's own generator of the step (seeded by the seed, the
     iteration and the image's place in the global batch) (official: numpy's global RNG).
  7. Generation gets a --seed (official: none, images not reproducible).
  8. Evaluation: one confusion-matrix mIoU at short side 1024 for every target, Cityscapes
     included (official: cityscapesScripts at full resolution, identical for 1024x2048 images).
  9. Debug writes of the official loop (matplotlib figure and PNG per refined image) removed.
 10. Mask2Former criterion (the declared copy): each image's random points come from its own
     generator of the step, and the cross-entropy is divided by the global batch's class-weight
     sum (official: the process's RNG and its own sum; identical on one process), so that
     several processes train as one [C criterion.py::SetCriterion].
Choices where the official code is silent: the toy settings (TOY_DEFAULTS), the --num-queries,
--num-points and --eval-before flags (official values by default), the 16- and 13-class means
logged beside SYNTHIA's 19-class mIoU, bf16 autocast with --amp (official: fp32, the default).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib
import json
import math
import os
import re
import sys
import time
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

import common

NUM_CLASSES = 19  # Cityscapes trainIds; the head adds a no-object class
IGNORE_INDEX = 255

# [C configs/segmentation/clouds_config.yaml] MODEL.PIXEL_MEAN / PIXEL_STD = OpenAI CLIP x 255
PIXEL_MEAN = (122.7709383, 116.7460125, 104.09373615)
PIXEL_STD = (68.5005327, 66.6321579, 70.32316305)
SIZE_DIVISIBILITY = 32  # batches padded to a multiple of 32 [C mask2former_config.yaml]

# Backbones: open_clip model, default pretrained tag, channels of res2..res5 (strides 4..32)
# [C clouds_config.yaml, *_r50.yaml, *_r101.yaml]. `test` is a tiny random stand-in.
CONVNEXT_L = "convnext_large_d_320"
BACKBONES = {
    CONVNEXT_L: (CONVNEXT_L, "laion2b_s29b_b131k_ft_soup", (192, 384, 768, 1536)),
    "RN50-quickgelu": ("RN50-quickgelu", "openai", (256, 512, 1024, 2048)),
    "RN101-quickgelu": ("RN101-quickgelu", "openai", (256, 512, 1024, 2048)),
    "test": (None, "none", (16, 32, 64, 128)),
}  # fmt: skip

# Per-(source, phase) recipe [C configs/{warmup,joint_training}/*/*.yaml]: iters = SOLVER.MAX_ITER,
# lr = SOLVER.BASE_LR, eval_every = TEST.EVAL_PERIOD; constant lr for GTA5 / Cityscapes (the
# multi-step milestone 100000 lies beyond MAX_ITER), poly 0.9 for SYNTHIA. toy: CPU-sized.
RECIPE = {
    ("gta", "warmup"): dict(iters=40000, lr=1e-5, lr_schedule="constant", eval_every=4000),
    ("gta", "joint"): dict(iters=40000, lr=1e-5, lr_schedule="constant", eval_every=4000),
    ("synthia", "warmup"): dict(iters=30000, lr=1e-5, lr_schedule="poly", eval_every=1500),
    ("synthia", "joint"): dict(iters=30000, lr=1e-5, lr_schedule="poly", eval_every=1500),
    ("cityscapes", "warmup"): dict(iters=5000, lr=1e-4, lr_schedule="constant", eval_every=500),
    ("cityscapes", "joint"): dict(iters=10000, lr=1e-4, lr_schedule="constant", eval_every=500),
    ("toy", "warmup"): dict(iters=40, lr=1e-4, lr_schedule="constant", eval_every=0),
    ("toy", "joint"): dict(iters=10, lr=1e-4, lr_schedule="constant", eval_every=0),
}
# --source toy: CPU-sized settings (not paper values): tiny random encoder, 64 px crops, 10
# queries, 256 matcher/criterion points, fake SAM with the 5000 px threshold scaled from 768^2 to
# 64^2 images (35 px), no evaluation before training, the fast path (fused AdamW) on CPU too.
TOY_DEFAULTS = dict(
    crop=64, batch_size=4, backbone="test", sam="fake", sam_min_area=35, num_points=256, workers=0,
    num_queries=10, pretrained="none", log_every=1, eval_before=False, fast="on", eval_batch_size=16
)  # fmt: skip
# [C configs/joint_training/*/*.yaml] DATASETS.TARGET_FACTOR: repeat factor of each generated
# image (source images 1.0) in detectron2's WeightedTrainingSampler
GEN_FACTOR = {"gta": 2.0, "synthia": 0.7, "cityscapes": 0.2, "toy": 1.0}
# under --data: stable_diffusion/<folder> [C register_sd_semantic.py]; toy: --make-toy-generated
SD_FOLDER = os.path.join("stable_diffusion", "sd_llama70b_v2")
GENERATED_DIR = {"gta": SD_FOLDER, "synthia": SD_FOLDER, "cityscapes": SD_FOLDER,
                 "toy": "toy_generated"}  # fmt: skip
# [C configs/*/*.yaml DATASETS.TRAIN, register_*.py] the frames each source trains on: GTA5's
# CLOUDS list (24,904 of 24,966), all 9,400 SYNTHIA frames [C configs/warmup/synthia/
# train_syn.yaml -> register_synthia_semantic.py], Cityscapes train (2,975)
SOURCE_SPLIT = {"gta": "train", "synthia": "all", "cityscapes": "train", "toy": "train"}
# [C configs/*/*.yaml] INPUT.INITIAL_HEIGHT/WIDTH: ResizeScale target (= native source size);
# toy: half the toy images' 128x256, so training sees 0.25-1.0 of their size
RESIZE_TARGET = {"gta": (1052, 1914), "synthia": (760, 1280), "cityscapes": (1024, 2048),
                 "toy": (64, 128)}  # fmt: skip

# [C solver: detectron2 build_optimizer + mask2former_config.yaml]
WEIGHT_DECAY = 0.05  # SOLVER.WEIGHT_DECAY; 0 for norm layers and embeddings
GRAD_CLIP = 0.01  # SOLVER.CLIP_GRADIENTS (full_model, L2 norm)
POLY_POWER = 0.9  # SOLVER.POLY_LR_POWER (SYNTHIA only)
GLOBAL_BATCH = 8  # SOLVER.IMS_PER_BATCH
CROP = 768  # FixedSizeCrop (768, 768) [C mapper_train.py]
SCALE_RANGE = (0.5, 2.0)  # ResizeScale(min_scale, max_scale) [C mapper_train.py]
TRAIN_NUM_POINTS = 12544  # MASK_FORMER.TRAIN_NUM_POINTS (112^2) [C mask2former_config.yaml]
NUM_QUERIES = 100  # MASK_FORMER.NUM_OBJECT_QUERIES [C clouds_config.yaml]

# Self-training [C config.py: MODEL.CLOUDS.SAM.*, ITERATION_UPDATE]
EMA_ALPHA = 0.999  # SAM.ALPHA_EMA
EMA_EVERY = 100  # ITERATION_UPDATE
SAM_MIN_AREA = 5000  # SAM.SIZE_THRESHOLD (components must be strictly larger)
SAM_POINTS = 5  # SAM.NUM_POINTS

# Evaluation [C mapper_test.py: ResizeShortestEdge(1024)]; mIoU over classes with GT pixels
# [C semantic_evaluation.py]. toy: short side 48 (0.375 of the toy images; CPU-sized).
EVAL_SHORT_SIDE = {"gta": 1024, "synthia": 1024, "cityscapes": 1024, "toy": 48}


# =============================================================================================
# 1. The method
# =============================================================================================
# Foundation models around a CLIP segmenter: Stable Diffusion images of LLM prompts (made offline:
# Appendix B; read by GeneratedImages, section 3) join the source by repeat factors; a mean
# teacher labels them, SAM refines its labels, the student learns from both [C clouds.py].


def repeat_factors(n_source: int, n_generated: int, gen_factor: float) -> list[float]:
    """Per-sample repeat factors of JointTrainSet for detectron2's WeightedTrainingSampler
    semantics (floor(r) copies plus one more with probability frac(r), shuffled): batches are a
    random mixture, not a fixed split [C configs/joint_training DATASETS.TARGET_FACTOR]."""
    # r_i = 1 (source), f (generated); generated share f*n_gen / (n_src + f*n_gen), e.g.
    # 2.0 * 5000 / (24904 + 10000) = 28.7% for GTA5 with 5,000 images [computed]
    return [1.0] * n_source + [gen_factor] * n_generated


class EMATeacher:
    """Mean teacher of the head only (the frozen backbone is shared) [C clouds.py::CLOUDS]: set to
    the student at the first training forward, then an EMA step (alpha 0.999) at every forward
    whose counter is a multiple of `every` = 100. Only 400 updates in 40k iterations: the warm-up
    weights still make up 0.999^399 = 0.67 of the teacher after GTA5 joint training [computed].
    Outside the DDP-wrapped student and the optimiser; no gradients."""

    def __init__(self, student_head: nn.Module, alpha: float = EMA_ALPHA, every: int = EMA_EVERY):
        self.head = copy.deepcopy(student_head).requires_grad_(False).eval()
        self.alpha, self.every = alpha, every
        self.iteration = 0  # training forwards so far [C clouds.py: self.local_iter]

    @torch.no_grad()
    def step(self, student_head: nn.Module) -> None:
        """Call once per training iteration, before the teacher labels the batch."""
        pairs = list(zip(self.head.parameters(), student_head.parameters()))
        if self.iteration == 0:
            for t, s in pairs:  # [C clouds.py::init_ema_weights] theta_t <- theta_s
                t.copy_(s)
        if self.iteration % self.every == 0:
            for t, s in pairs:
                # [C clouds.py::update_ema_weights] theta_t <- alpha*theta_t + (1 - alpha)*theta_s
                t.copy_(self.alpha * t + (1 - self.alpha) * s)
        self.iteration += 1

    @torch.no_grad()
    def pseudo_labels(self, backbone: FrozenCLIPEncoder, clean: torch.Tensor) -> torch.Tensor:
        """uint8 (G, 3, H, W) -> train ids (G, H, W); no threshold (PL_THRESHOLD is never read)."""
        # [C clouds.py::predict_inference] y_hat(p) = argmax_c sum_q p_q(c) * sigmoid(m_q(p))
        return segment(backbone, self.head, clean).argmax(1)


# predictor(image uint8 (H, W, 3), points (K, P, 2) float (x, y)) -> (masks (K, 3, H, W) bool,
# scores (K, 3)): any SAM backend behind one interface
SamPredictor = Callable[[np.ndarray, np.ndarray], tuple[torch.Tensor, torch.Tensor]]


def refine_pseudo_label_with_sam(pseudo_label: torch.Tensor, image: np.ndarray,
                                 predictor: SamPredictor, rng: np.random.Generator,
                                 min_area: int = SAM_MIN_AREA,
                                 num_points: int = SAM_POINTS) -> dict:  # fmt: skip
    """Teacher pseudo-label (H, W) -> refined set targets {labels (C,), masks (C, H, W) float}
    [C my_utils/mask_utils.py: separate_shapes_list, get_fixed_points, select_best_masks,
    remove_intersecting_pixels, transform_masks; clouds.py::CLOUDS.forward]:
      1. per class present (ascending), its 4-connected components with MORE than min_area pixels;
         smaller components, and classes with only small ones, are dropped;
      2. per kept component `num_points` distinct pixels drawn uniformly, as (x, y) positive points;
      3. one SAM call for all K components: 3 masks each, keep the highest predicted IoU;
      4. pixels covered by two or more kept masks are cleared in all of them;
      5. per class, the union of its components' masks (a class whose masks all vanished in step 4
         keeps an empty mask);
      6. no component larger than min_area at all: the unrefined teacher targets are used.
    DEVIATION 9: no matplotlib figure and PNG per refined map (official: debug code in the loop).
    """
    device = pseudo_label.device
    pl = pseudo_label.cpu().numpy()
    classes = np.flatnonzero(np.bincount(pl.ravel(), minlength=IGNORE_INDEX + 1))  # ascending
    classes = classes[classes != IGNORE_INDEX]
    component_class, points = [], []
    for c in classes:
        components, n = ndimage.label(pl == c)  # scipy's default structure = 4-connectivity
        areas = np.bincount(components.ravel(), minlength=n + 1)
        boxes = ndimage.find_objects(components)
        for j in np.flatnonzero(areas[1:] > min_area) + 1:
            box = boxes[j - 1]  # the component's bounding box: a cheaper search than the image
            ys, xs = np.nonzero(components[box] == j)  # raster order, as np.where on the image
            if len(ys) < num_points:
                continue
            chosen = rng.choice(len(ys), num_points, replace=False)
            xy = np.stack([xs[chosen] + box[1].start, ys[chosen] + box[0].start], axis=-1)
            points.append(xy)  # (P, 2) as (x, y)
            component_class.append(int(c))
    if not points:  # step 6 [C clouds.py: `else: last_targets_target.append(targets_target[i])`]
        labels = torch.as_tensor(classes, dtype=torch.int64, device=device)
        return {"labels": labels, "masks": (pseudo_label[None] == labels[:, None, None]).float()}
    masks, scores = predictor(image, np.stack(points).astype(np.float32))  # (K, 3, H, W), (K, 3)
    masks, scores = torch.as_tensor(masks).bool(), torch.as_tensor(scores)
    best = masks[torch.arange(len(masks)), scores.argmax(1).to(masks.device)]  # (K, H, W)
    # step 4: running "covered once" / "covered twice" maps (a K-long loop of whole-map ops is
    # ~40x faster than summing the (K, H, W) bool stack over K)
    once, twice = torch.zeros_like(best[0]), torch.zeros_like(best[0])
    for mask in best:
        twice |= once & mask
        once |= mask
    best &= ~twice
    kept = sorted(set(component_class))
    union = torch.zeros((len(kept), *best.shape[1:]), dtype=torch.bool, device=best.device)
    for mask, c in zip(best, component_class):  # step 5
        union[kept.index(c)] |= mask
    labels = torch.tensor(kept, dtype=torch.int64, device=device)
    return {"labels": labels, "masks": union.to(device).float()}  # (C,), (C, H, W)


# The self-training step [C clouds.py::CLOUDS.forward].


class NonFinitePredictions(FloatingPointError):
    """A nan or inf in the predictions, caught before the matcher; args: their names."""


@dataclasses.dataclass
class CLOUDS:
    """What a training step and an evaluation need. `student` is `head` as the forward pass runs
    it (DDP-wrapped, compiled); the teacher (joint phase) and SAM live outside it."""

    backbone: FrozenCLIPEncoder
    head: Mask2FormerHead
    student: nn.Module
    criterion: SetCriterion
    teacher: EMATeacher | None = None
    sam: SamPredictor | None = None  # real SAM backends only (fake and none need no model)
    autocast: Callable = contextlib.nullcontext


def pad_to(x: torch.Tensor, size_hw: Sequence[int], value: float) -> torch.Tensor:
    """Pad the last two dims bottom/right to size_hw (targets follow the padded batch)."""
    return F.pad(x, (0, size_hw[1] - x.shape[-1], 0, size_hw[0] - x.shape[-2]), value=value)


PREDICTIONS = ("pred_logits", "pred_masks")  # what the matcher reads of each prediction


def train_step(model: CLOUDS, batch: tuple, generators: Sequence[torch.Generator],
               args: argparse.Namespace) -> tuple:  # fmt: skip
    """Forward pass and loss of one mixed batch (student images, clean teacher views of the
    generated ones, labels, is_generated) -> (loss, terms for the log), or NonFinitePredictions.
    Image b of the batch, source or generated, draws all its random numbers (SAM points, then
    the criterion's points) from generators[b]."""
    images, clean, labels, is_generated = batch
    device = next(model.head.parameters()).device
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    # EMA bookkeeping before anything uses the teacher
    if model.teacher is not None:
        model.teacher.step(model.head)
    # student on the source crops and the colour-jittered generated views; the frozen encoder
    # runs without gradients and keeps no activations
    x = normalize_and_pad(images)  # (B, 3, H', W')
    features = model.backbone(x)
    with model.autocast():
        outputs = model.student(features)
    # the matcher (scipy) must never see a NaN: stop on non-finite predictions (one device sync),
    # naming those of the first set that holds one (the final set, then aux_outputs[0], ...)
    sets, n = [outputs, *outputs["aux_outputs"]], len(PREDICTIONS)
    finite = torch.stack([torch.isfinite(s[k]).all() for s in sets for k in PREDICTIONS]).tolist()
    for i in range(len(sets)):
        if bad := [k for j, k in enumerate(PREDICTIONS) if not finite[i * n + j]]:
            raise NonFinitePredictions(*(f"aux_outputs[{i - 1}].{k}" if i else k for k in bad))
    targets = semantic_to_targets(pad_to(labels, x.shape[-2:], IGNORE_INDEX))
    # the teacher labels the clean generated views; SAM refines each pseudo-label; the refined
    # targets replace the all-255 labels of those images
    generated = torch.nonzero(is_generated).flatten().tolist()
    if generated:
        clean = clean.to(device, non_blocking=True)
        with model.autocast():
            pseudo = model.teacher.pseudo_labels(model.backbone, clean)  # (G, H, W)
        for k, b in enumerate(generated):
            # DEVIATION 6: SAM points from the image's generator (official: numpy's global RNG)
            g = generators[b]
            rng = np.random.default_rng(int(torch.randint(2**62, (), generator=g, device=g.device)))
            if args.sam == "none":  # the "without SAM" ablation: the teacher's targets as they are
                target = semantic_to_targets(pseudo[k : k + 1])[0]
            else:
                predictor = fake_sam_predictor(pseudo[k]) if args.sam == "fake" else model.sam
                image = clean[k].permute(1, 2, 0).cpu().numpy()  # (H, W, 3) uint8
                target = refine_pseudo_label_with_sam(
                    pseudo[k], image, predictor, rng, args.sam_min_area, args.sam_points
                )
            target["masks"] = pad_to(target["masks"], x.shape[-2:], 0.0)
            targets[b] = target
    # L = sum_t w_t * L_t over source and generated images alike (30 set-loss terms, no weighting)
    with model.autocast():
        losses = model.criterion(outputs, targets, generators=generators)
    loss = sum(losses.values())
    terms = {k: losses[k].item() for k in ("loss_ce", "loss_mask", "loss_dice")}
    return loss, {"loss": loss.item(), **terms, "generated": len(generated)}


# =============================================================================================
# 2. Model
# =============================================================================================
# The frozen CLIP image encoder [C modeling/backbone/clip.py] and the closed-set Mask2Former
# head (Appendix A) [C clouds.py::CLOUDS].


class TinyCLIPVisual(nn.Module):
    """`test` size: four stages after a stride-4 stem (strides 4..32), the CLIP encoders' taps."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        c2, c3, c4, c5 = channels
        self.stem = nn.Sequential(nn.Conv2d(3, c2, 4, stride=4), nn.GroupNorm(1, c2))
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=s, padding=1), nn.GELU())
            for c_in, c_out, s in ((c2, c2, 1), (c2, c3, 2), (c3, c4, 2), (c4, c5, 2))
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.stem(x)]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        return feats[1:]


class FrozenCLIPEncoder(nn.Module):
    """CLIP image encoder, frozen, always in eval mode -> res2..res5 (strides 4..32)
    [C modeling/backbone/clip.py::CLIP]: ConvNeXt `visual.trunk.stages`; ResNet 3-conv stem +
    avgpool, layer1..4. `pretrained`: an open_clip tag or none (files: load_clip_weights).
    DEVIATION 1: the image trunk only (the text tower, ConvNeXt head and ResNet attention pool
    serve only the unused open-vocabulary path). `memory_format`: channels_last on the fast path."""

    def __init__(self, size: str, pretrained: str = "none", device: str = "cpu") -> None:
        super().__init__()
        model_name, _, self.channels = BACKBONES[size]
        self.size, self.memory_format = size, torch.contiguous_format
        self.is_convnext = model_name is not None and model_name.startswith("convnext")
        if model_name is None:
            with torch.device(device):
                self.visual = TinyCLIPVisual(self.channels)
        else:
            import open_clip  # imported here so that `--backbone test` runs without it

            with torch.device(device):  # "meta" in the tests: shapes and names without memory
                if pretrained == "none":  # from the config: create_model would log "No pretrained
                    # weights loaded ... initialized randomly" before a --pretrained FILE loads
                    clip = open_clip.CLIP(**open_clip.get_model_config(model_name))
                else:
                    clip = open_clip.create_model(model_name, pretrained=pretrained, device=device)
            self.visual = clip.visual
            if self.is_convnext:
                del self.visual.head, self.visual.trunk.head  # projection MLP, pooling + norm
            else:
                del self.visual.attnpool
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenCLIPEncoder:
        # [C clip.py: self.eval() in __init__ and forward] BatchNorm statistics of the ResNets
        # and ConvNeXt drop-path (0.1) never switch to training behaviour.
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: normalised (B, 3, H, W), H and W multiples of 32 -> [res2, res3, res4, res5]."""
        v, x = self.visual, x.contiguous(memory_format=self.memory_format)
        if self.size == "test":
            return v(x)
        if self.is_convnext:
            x, stages = v.trunk.stem(x), v.trunk.stages  # (B, 192, H/4, W/4)
        else:
            x = v.act1(v.bn1(v.conv1(x)))  # (B, 32, H/2, W/2)
            x = v.act3(v.bn3(v.conv3(v.act2(v.bn2(v.conv2(x))))))
            x, stages = v.avgpool(x), (v.layer1, v.layer2, v.layer3, v.layer4)  # (B, 64, H/4, W/4)
        return [x := stage(x) for stage in stages]


def normalize_and_pad(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> (x - mean) / std, zero-padded bottom/right to a multiple of 32
    [C clouds.py::CLOUDS.forward + ImageList.from_tensors(size_divisibility=32)]."""
    mean = torch.tensor(PIXEL_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=images.device).view(1, 3, 1, 1)
    x = (images.float() - mean) / std
    h, w = x.shape[-2:]
    return F.pad(x, (0, -w % SIZE_DIVISIBILITY, 0, -h % SIZE_DIVISIBILITY))  # (B, 3, H', W')


def build_head(backbone: FrozenCLIPEncoder, num_queries: int = NUM_QUERIES) -> Mask2FormerHead:
    """Closed-set Mask2Former head on res2..res5: Linear(256, 19 + 1) classifier, 100 queries
    [C mask2former_config.yaml: OriginalMultiScaleMaskedTransformerDecoder]."""
    return Mask2FormerHead(backbone.channels, num_classes=NUM_CLASSES, num_queries=num_queries)


def segment(backbone: FrozenCLIPEncoder, head: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> class scores (B, 19, H, W); no TTA, no sliding window
    [C clouds.py::CLOUDS.forward (inference) + semantic_inference]."""
    h, w = images.shape[-2:]
    x = normalize_and_pad(images)
    out = head(backbone(x))
    # mask logits upsampled bilinearly to the padded input, cropped to the image, then
    # score[c] = sum_q softmax(class_q)[c] * sigmoid(mask_q)
    masks = F.interpolate(
        out["pred_masks"].float(), size=x.shape[-2:], mode="bilinear", align_corners=False
    )[..., :h, :w]  # (B, Q, H, W)
    return semantic_inference(out["pred_logits"].float(), masks)


# =============================================================================================
# 3. Data and augmentation
# =============================================================================================
# [C mapper_train.py; detectron2 ResizeScale, FixedSizeCrop, PointRend ColorAugSSDTransform,
# RandomFlip]. Draws come from the loader's per-sample generator `g`: a resumed run sees the same.


def generated_image_name(j: int, part: int, num_images: int, num_prompts: int) -> str:
    """[C generate_txt_im.py] image j of job `part` uses prompt j mod P."""
    return f"im_{j + part * num_images}_p{j % num_prompts}.png"


class GeneratedImages(Dataset):
    """A folder of generated PNGs, no labels [C register_sd_semantic.py]: every *.png directly in
    `root` or in `root/images` (the official layout), sorted by name."""

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        self.files = sorted(root.glob("*.png")) + sorted((root / "images").glob("*.png"))
        if not self.files:
            what = "no *.png in it (nor in images/)" if root.is_dir() else "no such folder"
            msg = f"--generated {root}: {what}; the joint phase needs the generated images "
            raise common.UsageError(msg + "(`python clouds.py generate`, or the released folder)")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return common.read_image(self.files[index]), self.files[index].stem


def make_toy_generated(out_dir: str | Path, num_images: int, size: int, seed: int = 0) -> Path:
    """Stand-in for the diffusion model on the toy data: unlabelled toy street scenes in the three
    target looks (city, fog, night), named like the official files with the look as "prompt"."""
    (out := Path(out_dir)).mkdir(parents=True, exist_ok=True)
    looks = common.TOY_DOMAINS[1:]
    for j in range(num_images):
        rng = np.random.default_rng([seed, 7919, j])
        image = common.toy_render(common.toy_scene(rng, size, size), looks[j % len(looks)], rng)
        Image.fromarray(image).save(out / generated_image_name(j, 0, num_images, len(looks)))
    return out


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=g).item()


def _coin(g: torch.Generator) -> bool:
    return bool(torch.randint(2, (), generator=g).item())


def resize_scale(image: torch.Tensor, label: torch.Tensor, g: torch.Generator,
                 target_hw: tuple[int, int] | None,
                 scale_range: tuple[float, float] = SCALE_RANGE) -> tuple:  # fmt: skip
    """detectron2 ResizeScale. The targets are the native source sizes, so this rescales by s (for
    GTA5's 1046-row frames the width term decides). Image bilinear, label nearest."""
    h, w = image.shape[-2:]
    s = _uniform(g, *scale_range)  # s ~ U(0.5, 2.0)
    th, tw = target_hw if target_hw is not None else (h, w)
    scale = min(th * s / h, tw * s / w)  # scale = min(tH*s/H, tW*s/W), size = round(H*scale)
    # np.round is round-half-to-even, like Python's round
    out_h, out_w = int(np.round(h * scale)), int(np.round(w * scale))
    return resize_image_label(image, label, (out_h, out_w))


def resize_image_label(image: torch.Tensor, label: torch.Tensor | None, size_hw: tuple) -> tuple:
    """PIL semantics: bilinear (antialiased when shrinking) image, nearest (pixel-centre) label."""
    image = TF.resize(image, list(size_hw), TF.InterpolationMode.BILINEAR, antialias=True)
    if label is not None:
        label = F.interpolate(label[None, None].float(), size=size_hw, mode="nearest-exact")
        label = label[0, 0].long()  # (H, W)
    return image, label


def fixed_size_crop(
    image: torch.Tensor, label: torch.Tensor, g: torch.Generator, crop: int
) -> tuple:
    """detectron2 FixedSizeCrop((crop, crop), pad=True): ONE u ~ U(0,1) scales both axes' maximum
    offsets (crop corners on a diagonal: a detectron2 quirk, kept), then padding with 0 / 255."""
    h, w = image.shape[-2:]
    u = torch.rand((), generator=g).item()
    top, left = (int(np.round(max(n - crop, 0) * u)) for n in (h, w))
    image = image[:, top : top + crop, left : left + crop]
    label = label[top : top + crop, left : left + crop]
    pad_h, pad_w = crop - image.shape[1], crop - image.shape[2]
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=0)
        label = F.pad(label, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
    return image, label


def color_aug_ssd(image: torch.Tensor, g: torch.Generator, brightness_delta: float = 32,
                  contrast_range: tuple[float, float] = (0.5, 1.5),
                  saturation_range: tuple[float, float] = (0.5, 1.5),
                  hue_delta: int = 18) -> torch.Tensor:  # fmt: skip
    """SSD photometric distortion [PointRend ColorAugSSDTransform, C mapper_train.py]:
    brightness (p .5, +U(-32, 32)); then, with p .5, contrast -> saturation -> hue, else
    saturation -> hue -> contrast; contrast (p .5) x U(.5, 1.5); saturation (p .5) S x U(.5, 1.5)
    in HSV; hue (p .5) H + randint(-18, 18) mod 180 (OpenCV hue units, i.e. +-36 degrees). A value
    is drawn only when its coin says so, as in the official transform. DEVIATION 5: torch, no
    OpenCV; draws from `g`, not Python's `random`."""

    def contrast(img: torch.Tensor) -> torch.Tensor:
        if _coin(g):
            return common.to_uint8_truncated(img, alpha=_uniform(g, *contrast_range))
        return img

    def saturation(img: torch.Tensor) -> torch.Tensor:
        if _coin(g):
            hsv = common.rgb_to_hsv_cv2(img)
            hsv[1] = common.to_uint8_truncated(hsv[1], alpha=_uniform(g, *saturation_range)).long()
            return common.hsv_to_rgb_cv2(hsv)
        return img

    def hue(img: torch.Tensor) -> torch.Tensor:
        if _coin(g):
            hsv = common.rgb_to_hsv_cv2(img)
            delta = int(torch.randint(-hue_delta, hue_delta + 1, (), generator=g))
            hsv[0] = torch.remainder(hsv[0] + delta, 180)
            return common.hsv_to_rgb_cv2(hsv)
        return img

    if _coin(g):
        beta = _uniform(g, -brightness_delta, brightness_delta)
        image = common.to_uint8_truncated(image, beta=beta)
    if _coin(g):
        return hue(saturation(contrast(image)))
    return contrast(hue(saturation(image)))


def hflip(g: torch.Generator, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """detectron2 RandomFlip: horizontal, p 0.5, the same decision for every given tensor."""
    return tuple(t.flip(-1) for t in tensors) if _coin(g) else tensors


class SourceTransform:
    """Labelled source image: ResizeScale -> FixedSizeCrop(768) -> ColorAugSSD -> RandomFlip
    [C mapper_train.py: augs_src]. Returns the student view; the teacher view is unused."""

    def __init__(self, crop: int, target_hw: tuple[int, int] | None) -> None:
        self.crop, self.target_hw = crop, target_hw

    def __call__(self, image: torch.Tensor, label: torch.Tensor, g: torch.Generator) -> tuple:
        image, label = resize_scale(image, label, g, self.target_hw)
        image, label = fixed_size_crop(image, label, g, self.crop)
        return hflip(g, color_aug_ssd(image, g), label)


def generated_views(image: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated image: RandomFlip only, then (ColorAugSSD view for the student, clean view for the
    teacher) of the same flipped image [C mapper_train.py: augs_sd + augs_photometric]."""
    (image,) = hflip(g, image)
    return color_aug_ssd(image, g), image


class JointTrainSet(Dataset):
    """Source images, then generated ones, one index space for the repeat-factor sampler. Item:
    (student view, teacher view or None, label, is_generated); a generated image's all-255 label is
    replaced by pseudo-labels in the training step [C mapper_train.py::MapperTrain.__call__]."""

    def __init__(self, source: Dataset, generated: Dataset | None, crop: int, target_hw) -> None:
        self.source, self.generated, self.crop = source, generated, crop
        self.source_transform = SourceTransform(crop, target_hw)

    def __len__(self) -> int:
        return len(self.source) + (len(self.generated) if self.generated is not None else 0)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, item)
        g = torch.Generator().manual_seed(seed)
        if index < len(self.source):
            image, label, _ = self.source[index]
            image, label = self.source_transform(image, label, g)
            return image, None, label, False
        image, _ = self.generated[index - len(self.source)]
        if tuple(image.shape[-2:]) != (self.crop, self.crop):
            # DEVIATION 3: resized to crop x crop (official: 768x768 images = the crop)
            image, _ = resize_image_label(image, None, (self.crop, self.crop))
        student, teacher = generated_views(image, g)
        label = torch.full((self.crop, self.crop), IGNORE_INDEX, dtype=torch.int64)
        return student, teacher, label, True


def collate_joint(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> student images (B, 3, c, c) uint8, teacher views of the generated ones (G, 3, c, c),
    labels (B, c, c), is_generated (B,) bool."""
    students, teachers, labels, is_gen = zip(*batch)
    clean = [t for t in teachers if t is not None]
    c = students[0].shape[-1]
    clean = torch.stack(clean) if clean else torch.empty(0, 3, c, c, dtype=torch.uint8)
    return torch.stack(students), clean, torch.stack(labels), torch.tensor(is_gen)


def build_train_set(args: argparse.Namespace) -> tuple[JointTrainSet, list[float] | None]:
    """The source frames of SOURCE_SPLIT, + the generated images in the joint phase, with their
    repeat factors (None in the warm-up)."""
    split = SOURCE_SPLIT[args.source]
    source = common.build_dataset(args.source, args.data, split, gta_list="clouds")
    common.check_labels(source)  # a wrong label encoding stops here, not as a flat loss
    generated = GeneratedImages(args.generated) if args.phase == "joint" else None
    train_set = JointTrainSet(source, generated, args.crop, RESIZE_TARGET[args.source])
    data, factors = f"data: {len(source)} source images ({args.source} {split})", None
    if generated is not None:
        factors = repeat_factors(len(source), len(generated), args.gen_factor)
        share = sum(factors[len(source) :]) / sum(factors)
        data += f" + {len(generated)} generated (repeat factor {args.gen_factor}): "
        data += f"expected generated share {share:.1%}"
    common.print0(data)
    return train_set, factors


# =============================================================================================
# 4. Training
# =============================================================================================
# [C train_net.py::build_optimizer, build_lr_scheduler; clouds.py::CLOUDS.forward]

NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm)


def param_groups(head: nn.Module, weight_decay: float = WEIGHT_DECAY) -> list[dict]:
    """AdamW groups: weight decay 0.05, except 0 for normalisation layers (WEIGHT_DECAY_NORM) and
    nn.Embedding tables (WEIGHT_DECAY_EMBED: query_feat, query_embed, the decoder's level_embed).
    The pixel decoder's level_embed is a plain Parameter and decays, as in the official code."""
    groups = [{"params": [], "weight_decay": weight_decay}, {"params": [], "weight_decay": 0.0}]
    for module in head.modules():
        no_wd = isinstance(module, (*NORM_TYPES, nn.Embedding))
        groups[no_wd]["params"] += [p for p in module.parameters(recurse=False) if p.requires_grad]
    return groups


def lr_at(iteration: int, base_lr: float, schedule: str, max_iters: int) -> float:
    """constant (GTA5, Cityscapes: the multi-step milestone 100000 lies beyond MAX_ITER) or poly
    (SYNTHIA, no warm-up) [C configs, detectron2 lr_scheduler.py::WarmupPolyLR]."""
    if schedule == "constant":
        return base_lr
    # lr(i) = base * (1 - i / max_iters)^0.9
    return common.poly_lr(base_lr, iteration, max_iters, POLY_POWER)


def set_lr(optimizer: torch.optim.Optimizer, iteration: int, args: argparse.Namespace) -> float:
    lr = lr_at(iteration, args.lr, args.lr_schedule, args.iters)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def train(args, dist, log, model: CLOUDS, optimizer, scaler, loader, targets, start) -> dict:
    """One self-training step per iteration; checkpoint, then evaluation, every --eval-every
    iterations and at the end. targets: {name: dataset}."""
    # PLUMBING: a progress bar on rank 0; `saved` = (path, iteration) of this run's last checkpoint
    results, saved, done, clock = {}, None, start, None
    bar = tqdm(
        total=args.iters, initial=start, desc="train", disable=not dist.is_main, **common.BAR
    )
    try:
        for it in range(start, args.iters):
            # PLUMBING: the next batch; gradients cleared before the forward pass
            batch = next(loader)
            optimizer.zero_grad(set_to_none=True)
            # METHOD: learning rate of this iteration [C train_net.py::build_lr_scheduler]
            lr = set_lr(optimizer, it, args)
            # METHOD: EMA teacher, student, pseudo-labels, SAM, set criterion [C clouds.py::CLOUDS];
            # sample k of the global batch draws from a generator of (seed, it, k) only
            gens = common.step_generators(args.seed, it, args.batch_size, dist)
            try:
                loss, terms = train_step(model, batch, gens, args)
            except NonFinitePredictions as e:  # stopped before the matcher
                raise common.DivergenceError(it + 1, saved, predictions=e.args) from None
            # PLUMBING: the global batch's terms (all processes stop together on a non-finite
            # loss), then backward (scaled in fp16)
            terms = common.global_mean(terms, dist)
            if not all(math.isfinite(v) for v in terms.values()):
                raise common.DivergenceError(it + 1, saved, terms)
            (loss if scaler is None else scaler.scale(loss)).backward()
            # METHOD: full-model gradient clipping, L2 norm 0.01 [C SOLVER.CLIP_GRADIENTS]
            if scaler is not None:
                scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(model.head.parameters(), GRAD_CLIP)
            terms["grad_norm"] = float(norm)
            # PLUMBING: the optimizer step (through the scaler in fp16)
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
                scaler.update()
            # PLUMBING: progress; a `train` record every --log-every iterations and at the end
            done, now = it + 1, time.perf_counter()
            bar.set_postfix(loss=f"{terms['loss']:.3f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            clock = clock or (done, now)  # seconds per step count from the first step's end
            if done % args.log_every == 0 or done == args.iters:
                seconds = (now - clock[1]) / (done - clock[0]) if done > clock[0] else None
                log.log({"type": "train", "iter": done, "lr": lr, **terms, "time_s": seconds})
                clock = (done, now)
            # PLUMBING: checkpoint, then evaluate, every --eval-every iterations and at the end
            if done == args.iters or (args.eval_every > 0 and done % args.eval_every == 0):
                save_checkpoint(args, done, model, optimizer, scaler)
                saved = (Path(args.out) / "last.pt", done)
                # METHOD: every target of --targets [C train_net.py: TEST.EVAL_PERIOD]
                results = evaluate(model, targets, args, dist)
                # PLUMBING: the table on rank 0, an `eval` record and results.json
                common.print0(common.format_results(results, done))
                log.write_results(results, done)
    except KeyboardInterrupt:  # PLUMBING: Ctrl-C says where the run stopped and how to go on
        raise common.Interrupted(done, args.iters, saved) from None
    finally:
        bar.close()
    return results


# =============================================================================================
# 5. Evaluation
# =============================================================================================

# SYNTHIA runs are scored with 19 classes [C configs]; the usual 16- and 13-class means beside
SYNTHIA_SUBSETS = {"16": common.SYNTHIA16, "13": common.SYNTHIA13}


def evaluate(model: CLOUDS, targets: dict, args: argparse.Namespace, dist: common.Dist) -> dict:
    """Per target: whole image, short side 1024 (bilinear; label nearest to the same size), one
    confusion matrix, mIoU over the classes with ground-truth pixels [C mapper_test.py,
    semantic_evaluation.py]. Toy targets: short side 48. Training randomness is untouched.
    DEVIATION 8: Cityscapes too (official: cityscapesScripts at full resolution; 1024x2048 is
    already short side 1024: the same mIoU)."""
    resize = common.EvalResize(rule=("short", EVAL_SHORT_SIDE[args.source]), resize_gt=True)

    def predict(images: torch.Tensor) -> torch.Tensor:
        with model.autocast():
            return segment(model.backbone, model.head, images)

    results = {}
    model.head.eval()
    with common.rng_neutral():
        for name, dataset in targets.items():
            save_dir = os.path.join(args.out, "preds", name) if args.save_preds else None
            results[name] = common.evaluate_dataset(
                predict, dataset, resize=resize, dist=dist, miou_mode="present_gt",
                workers=min(args.workers, 2), batch_size=args.eval_batch_size,
                save_preds=args.save_preds, save_dir=save_dir, desc=name,
                subsets=SYNTHIA_SUBSETS if args.source == "synthia" else None)  # fmt: skip
    model.head.train()
    return results


# =============================================================================================
# 6. Command line and main
# =============================================================================================

# [C configs/*] DATASETS.TEST
TARGETS = {"gta": "cityscapes,bdd,mapillary", "synthia": "cityscapes,bdd,mapillary",
           "cityscapes": "acdc-night,acdc-rain,acdc-snow,acdc-fog,cityscapes",
           "toy": ",".join(common.TOY_TARGETS)}  # fmt: skip
# flags that shape the model: a resumed run must use the checkpoint's values
MODEL_FLAGS = ("backbone", "num_queries")
# flags only the joint phase reads
JOINT_FLAGS = ("generated", "gen_factor", "ema_alpha", "ema_every", "sam", "sam_checkpoint",
               "sam_min_area", "sam_points", "make_toy_generated")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    # fmt: off
    parser = common.make_parser(
        "CLOUDS (CVPR 2024): frozen CLIP + Mask2Former, self-training on generated images with "
        "an EMA teacher and SAM-refined pseudo-labels. Defaults follow --source and --phase.")
    recipe = RECIPE[("gta", "warmup")]
    common.add_shared_flags(
        parser, source="gta", targets=TARGETS["gta"], iters=recipe["iters"],
        batch_size=GLOBAL_BATCH, crop=CROP, amp=False, pretrained=BACKBONES[CONVNEXT_L][1],
        eval_every=recipe["eval_every"], log_every=20, workers=4, cite={
            "targets": "official: DATASETS.TEST [C configs]",
            "iters": "official: RECIPE by source and phase [C configs SOLVER.MAX_ITER]",
            "batch_size": "official: 8 [C base_config.yaml IMS_PER_BATCH]",
            "crop": "official: 768 [C mapper_train.py FixedSizeCrop]",
            "amp": "official: fp32 [C base_config.yaml SOLVER.AMP]",
            "pretrained": "the open_clip tag of --backbone, a CLIP weights file or a CLOUDS .pth",
            "eval_every": "official: RECIPE by source and phase [C configs TEST.EVAL_PERIOD]"})
    a = parser.add_argument_group("CLOUDS").add_argument
    a("--phase", choices=("warmup", "joint"), default="warmup", help="warm-up on the source, or "
      "joint self-training (default %(default)s; two runs [C configs/warmup, joint_training])")
    a("--init", default=None, help="joint phase: the warm-up run's last.pt or a CLOUDS .pth "
      "(official: MODEL.WEIGHTS [C configs/joint_training])")
    a("--backbone", choices=tuple(BACKBONES), default=CONVNEXT_L, help="frozen CLIP encoder, "
      "test = tiny random (default %(default)s; official: convnext_large_d_320 [C configs])")
    a("--lr", type=common.positive_float, default=recipe["lr"], help="base learning rate (default "
      "%(default)s; official: 1e-5 GTA5/SYNTHIA, 1e-4 Cityscapes [C configs SOLVER.BASE_LR])")
    a("--lr-schedule", choices=("constant", "poly"), default=recipe["lr_schedule"], help="(default "
      "%(default)s; official: constant GTA5/Cityscapes, poly 0.9 SYNTHIA [C configs])")
    a("--generated", default=os.path.join("data", SD_FOLDER),
      help="folder of generated PNGs (default %(default)s) [C register_sd_semantic.py]")
    a("--make-toy-generated", type=common.nonnegative_int, default=0, metavar="N",
      help="--source toy: first write N toy images into --generated (default %(default)s)")
    a("--gen-factor", type=common.positive_float, default=GEN_FACTOR["gta"],
      help="repeat factor of each generated image (default %(default)s; official: 2.0 GTA5, 0.7 "
      "SYNTHIA, 0.2 Cityscapes [C configs DATASETS.TARGET_FACTOR])")
    a("--ema-alpha", type=common.unit_float, default=EMA_ALPHA, help="teacher EMA decay, in "
      "[0, 1] (default %(default)s; official: 0.999 [C config.py SAM.ALPHA_EMA])")
    a("--ema-every", type=common.positive_int, default=EMA_EVERY, help="iterations between "
      "teacher updates (default %(default)s; official: 100 [C config.py ITERATION_UPDATE])")
    a("--sam", choices=("mobile_sam", "vit_h", "vit_l", "vit_b", "fake", "none"),
      default="mobile_sam", help="pseudo-label refinement; none = no-SAM ablation, fake = test "
      "stand-in (default %(default)s; official: mobile_sam [C config.py SAM.MOBILE])")
    a("--sam-checkpoint", default=None, help="SAM weights (default: weights/mobile_sam.pt or "
      "weights/sam_vit_*.pth by --sam [C sam.py])")
    a("--sam-min-area", type=common.nonnegative_int, default=SAM_MIN_AREA,
      help="components larger than this get a SAM prompt (default %(default)s; official: 5000 "
      "[C config.py SAM.SIZE_THRESHOLD])")
    a("--sam-points", type=common.positive_int, default=SAM_POINTS,
      help="random positive points per component (default %(default)s; official: 5 [C config.py])")
    a("--num-queries", type=common.positive_int, default=NUM_QUERIES,
      help="object queries (default %(default)s; official: 100 [C clouds_config.yaml])")
    a("--num-points", type=common.positive_int, default=TRAIN_NUM_POINTS, help="matcher/criterion "
      "points per mask (default %(default)s; official: 12544 [C mask2former_config.yaml])")
    a("--eval-before", action=argparse.BooleanOptionalAction, default=True,
      help="evaluate before the first iteration (default %(default)s; official: yes, the sanity "
      "check of [C train_net.py], yasserben/CLOUDS GitHub issue #4)")
    # fmt: on
    return parser


def presets(first: argparse.Namespace) -> dict:
    """Defaults of the chosen --source and --phase: the official recipe [C configs], or the toy
    settings; installed before the final parse, so --help shows them."""
    src = first.source
    defaults = dict(RECIPE[(src, first.phase)], gen_factor=GEN_FACTOR[src], targets=TARGETS[src])
    defaults["generated"] = os.path.join(first.data, GENERATED_DIR[src])
    if src == "toy":
        return {**defaults, **TOY_DEFAULTS}
    return {**defaults, "pretrained": BACKBONES[first.backbone][1]}


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Parse with the presets; reject combinations the flags cannot express. Returns the args and
    the warning lines for values this configuration does not use."""
    parser, argv = build_parser(), list(sys.argv[1:] if argv is None else argv)
    # One pre-parse reads what chooses a preset (--source, --phase, --backbone, --data); its
    # defaults are installed with set_defaults, then the one real parse (a flag written wins).
    first, _ = parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    parser.set_defaults(**presets(first))
    args = parser.parse_args(argv)
    for bad, message in (  # (what is wrong, the one-line error)
        (args.phase == "joint" and not (args.init or args.resume or args.eval_only or args.bench),
         "--phase joint needs --init WARMUP_CHECKPOINT (the last.pt of a --phase warmup run)"),
        (args.init and args.resume, "give --init (start a joint run) or --resume, not both"),
        (args.make_toy_generated and args.source != "toy",
         "--make-toy-generated is for --source toy; real runs read --generated"),
        (args.crop < SIZE_DIVISIBILITY, f"--crop {args.crop}: use at least {SIZE_DIVISIBILITY}"),
    ):  # fmt: skip
        if bad:
            raise common.UsageError(message)
    notes = []
    if args.phase == "warmup":
        unused = [n for n in JOINT_FLAGS if getattr(args, n) != parser.get_default(n)]
        if unused:
            flags = ", ".join("--" + n.replace("_", "-") for n in unused)
            notes.append(f"{flags}: only the joint phase uses them; this warm-up run ignores them")
    elif args.sam_checkpoint and args.sam in ("none", "fake"):
        notes.append(f"--sam-checkpoint is not used with --sam {args.sam}")
    return args, notes


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["generate"]:
        return generate_main(argv[1:])
    args, notes = parse_args(argv)
    dist = common.setup(args)
    for note in notes:
        common.warn(note)
    if args.bench:
        return run_bench(args, dist)
    common.prepare_out_dir(args)
    if args.source == "toy":
        common.make_toy_dataset(args.data)
        if args.make_toy_generated and args.phase == "joint" and dist.is_main:
            make_toy_generated(args.generated, args.make_toy_generated, args.crop, args.seed)
    if dist.enabled:
        torch.distributed.barrier()
    # every checkpoint, dataset and weights file the flags name is opened now: a typo fails fast
    ckpt = read_resume(args) if args.resume else None
    targets = {t: common.build_dataset(t, args.data, "val") for t in common.parse_targets(args)}
    train_set, factors = (None, None) if args.eval_only else build_train_set(args)
    model, scaler, weights = build_model(args, dist, ckpt)
    (b, b_train), (h, h_train) = map(common.count_parameters, (model.backbone, model.head))
    counts = {"total": b + h, "trainable": b_train + h_train, "backbone": b, "head": h}
    if model.teacher is not None:
        counts["teacher_head (EMA, not trained)"] = common.count_parameters(model.teacher.head)[0]
    common.print0("args: " + json.dumps(common.args_to_primitives(args), sort_keys=True))
    common.print0("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    per_gpu = args.batch_size // dist.world_size
    common.print0(f"batch: {args.batch_size} global, {per_gpu} per process x {dist.world_size}")
    log = common.RunLog(args.out, args, {"parameters": counts, "weights": weights}, dist.is_main)
    start = int(ckpt["iter"]) if ckpt is not None else 0
    # --eval-before: the official sanity check [C train_net.py], CLOUDS issue #4 (RNG-neutral)
    if args.eval_only or (start == 0 and args.eval_before):
        results, iteration = evaluate(model, targets, args, dist), (None if args.eval_only else 0)
        common.print0(common.format_results(results, iteration))
        log.write_results(results, iteration)
    if args.eval_only:
        return
    options = common.optimizer_options(args, dist, "adamw")  # fused AdamW on the fast path
    # betas 0.9 / 0.999, eps 1e-8 [detectron2 build_optimizer]
    optimizer = torch.optim.AdamW(param_groups(model.head), lr=args.lr, **options)
    loader = common.TrainLoader(train_set, args.batch_size, dist, args.seed, args.workers, start,
                                factors, collate_joint)  # fmt: skip
    if ckpt is not None:  # after everything that draws random numbers at start-up
        common.restore_training_state(ckpt, optimizer, scaler)
    train(args, dist, log, model, optimizer, scaler, loader, targets, start)


# =============================================================================================
# Appendix A: Mask2Former
# =============================================================================================
# A declared copy shared with rein.py (a test keeps the two identical).

# ---- BEGIN Mask2Former (declared copy: identical in rein.py and clouds.py) ----
# Host-file imports: import math; from collections.abc import Sequence; import torch;
# import torch.nn.functional as F; from scipy.optimize import linear_sum_assignment;
# from torch import nn
#
# Mask2Former (Cheng et al., "Masked-attention Mask Transformer for Universal Image Segmentation",
# CVPR 2022, arXiv 2112.01527) as both methods run it: deformable-attention pixel decoder + 9-layer
# masked-attention transformer decoder + Hungarian set criterion with point-sampled mask losses.
# [C mask2former/...] = facebookresearch/Mask2Former on detectron2 (detectron2 inits);
# [C mmdet/...] = mmdetection 3.x Mask2Former (same computation, other inits: see `init`).
# The compiled CUDA deformable-attention op is replaced by its pure-PyTorch grid_sample form, which
# the official file ships as the reference implementation of the same computation.

# Fixed architecture values, identical in both official configs.
M2F_DIM = 256  # conv_dim = mask_dim = hidden_dim [C mask2former/config.py]
# GroupNorm(32) in the pixel decoder [C mask2former/modeling/pixel_decoder/msdeformattn.py]
M2F_GN_GROUPS = 32
# deformable attention over res3, res4, res5 [C msdeformattn.py::MSDeformAttnPixelDecoder]
M2F_ENC_LEVELS = 3
M2F_ENC_LAYERS = 6  # TRANSFORMER_ENC_LAYERS [C mask2former/config.py]
M2F_ENC_HEADS = 8
M2F_ENC_POINTS = 4  # sampling points per head per level
M2F_ENC_FFN_DIM = 1024  # hard-coded in MSDeformAttnPixelDecoder [C msdeformattn.py]
# DEC_LAYERS 10 minus the prediction on the initial queries [C mask2former_transformer_decoder.py]
M2F_DEC_LAYERS = 9
M2F_DEC_HEADS = 8  # NHEADS
M2F_DEC_FFN_DIM = 2048  # DIM_FEEDFORWARD
M2F_POS_TEMPERATURE = 10000.0  # [C mask2former/modeling/transformer_decoder/position_encoding.py]
# detectron2 / mmdet weight-matrix inits, see `init_transformer_weights`
M2F_INITS = ("xavier_uniform", "xavier_normal")


def init_transformer_weights(module: nn.Module, init: str) -> None:
    """Xavier init of every parameter with dim > 1 (weight matrices) of a transformer block.

    detectron2 uses the uniform form [C mask2former_transformer_decoder.py::
    SelfAttentionLayer._reset_parameters, msdeformattn.py::MSDeformAttnTransformerEncoderOnly.
    _reset_parameters]; mmdet uses the normal form for the decoder layers
    [C mmdet/models/dense_heads/mask2former_head.py::init_weights] and for the deformable encoder
    [C mmdet/models/layers/msdeformattn_pixel_decoder.py::init_weights].
    """
    if init not in M2F_INITS:
        raise ValueError(f"init must be one of {M2F_INITS}, got {init!r}")
    fill = nn.init.xavier_uniform_ if init == "xavier_uniform" else nn.init.xavier_normal_
    for p in module.parameters():
        if p.dim() > 1:
            fill(p)


def c2_xavier_fill(conv: nn.Conv2d) -> None:
    """Caffe2 'xavier': Kaiming-uniform a=1, bias 0 [C fvcore/nn/weight_init.py::c2_xavier_fill]."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class PositionEmbeddingSine(nn.Module):
    """Fixed 2-D sine code: num_feats channels for y, then num_feats for x.

    Coordinates are the 1-based row/column index normalised by the map size and scaled to (0, 2π];
    channel 2k holds sin(c / T^(2k/F)), channel 2k+1 cos(c / T^(2k/F))
    [C mask2former/modeling/transformer_decoder/position_encoding.py::PositionEmbeddingSine].
    """

    def __init__(
        self,
        num_feats: int = M2F_DIM // 2,
        temperature: float = M2F_POS_TEMPERATURE,
        scale: float = 2 * math.pi,
    ) -> None:
        super().__init__()
        self.num_feats = num_feats
        self.temperature = temperature
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), only its size is used -> (1, 2·num_feats, H, W) fp32, broadcast on B."""
        h, w = x.shape[-2:]
        eps = 1e-6  # [C position_encoding.py]
        y_embed = (
            torch.arange(1, h + 1, dtype=torch.float32, device=x.device) / (h + eps) * self.scale
        )
        x_embed = (
            torch.arange(1, w + 1, dtype=torch.float32, device=x.device) / (w + eps) * self.scale
        )
        k = torch.arange(self.num_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / self.num_feats)
        pos_y = y_embed[:, None] / dim_t  # (H, F)
        pos_x = x_embed[:, None] / dim_t  # (W, F)
        # interleave sin (even channels) and cos (odd channels): (H, F/2, 2) -> (H, F)
        pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
        pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
        pos = torch.cat(
            (pos_y[:, None, :].expand(h, w, -1), pos_x[None, :, :].expand(h, w, -1)), dim=2
        )  # (H, W, 2F)
        return pos.permute(2, 0, 1)[None]  # (1, 2F, H, W)


# ---------------------------------------------------------------- multi-scale deformable attention


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Σ_l Σ_p A[b,q,m,l,p] · bilinear(V_l[b,:,m], loc[b,q,m,l,p]) for every head m.

    value (B, S, M, D) with S = Σ_l H_l·W_l (levels in `spatial_shapes` order); sampling_locations
    (B, Lq, M, L, P, 2) as (x, y) in [0, 1]; attention_weights (B, Lq, M, L, P) -> (B, Lq, M·D).
    Bilinear reads with grid_sample(align_corners=False, zero padding) at 2·loc − 1
    [C mask2former/modeling/pixel_decoder/ops/functions/ms_deform_attn_func.py::
    ms_deform_attn_core_pytorch]. Levels have different sizes, so one grid_sample per level; each
    level's weighted sum is accumulated instead of stacking all samples, which keeps peak memory at
    one level's samples.
    """
    b, _, m, d = value.shape
    _, lq, _, _, p, _ = sampling_locations.shape
    grids = 2 * sampling_locations - 1
    values = value.split([h * w for h, w in spatial_shapes], dim=1)
    out = value.new_zeros(b * m, d, lq)
    for lvl, (h, w) in enumerate(spatial_shapes):
        value_l = values[lvl].permute(0, 2, 3, 1).reshape(b * m, d, h, w)  # (B·M, D, H_l, W_l)
        grid_l = grids[:, :, :, lvl].transpose(1, 2).reshape(b * m, lq, p, 2)  # (B·M, Lq, P, 2)
        sampled = F.grid_sample(
            value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False
        )  # (B·M, D, Lq, P)
        weight_l = attention_weights[:, :, :, lvl].transpose(1, 2).reshape(b * m, 1, lq, p)
        out = out + (sampled * weight_l).sum(-1)  # (B·M, D, Lq)
    return out.view(b, m * d, lq).transpose(1, 2)  # (B, Lq, M·D), head-major channels


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR) as used in the pixel decoder.

    Always computes in fp32 with autocast off: the official pixel decoder disables autocast because
    the deformable op does not support half precision
    [C msdeformattn.py::MSDeformAttnPixelDecoder.forward_features].
    """

    def __init__(
        self,
        dim: int = M2F_DIM,
        num_heads: int = M2F_ENC_HEADS,
        num_levels: int = M2F_ENC_LEVELS,
        num_points: int = M2F_ENC_POINTS,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Offsets start on a star: head h looks along θ_h = 2πh/M, the direction scaled so its
        largest component is 1, and point k (0-based) sits k+1 steps out, on every level; attention
        starts uniform [C mask2former/modeling/pixel_decoder/ops/modules/ms_deform_attn.py::
        MSDeformAttn._reset_parameters].
        """
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        direction = torch.stack([theta.cos(), theta.sin()], dim=-1)  # (M, 2)
        direction = direction / direction.abs().max(dim=-1, keepdim=True).values
        step = torch.arange(1, self.num_points + 1, dtype=torch.float32)  # (P,)
        grid = direction[:, None, None, :] * step[None, None, :, None]  # (M, 1, P, 2)
        grid = grid.expand(-1, self.num_levels, -1, -1)  # (M, L, P, 2)
        self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value_in: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        """query (B, Lq, C), reference_points (B or 1, Lq, L, 2) as (x, y) in [0, 1],
        value_in (B, S, C) -> (B, Lq, C)."""
        with torch.autocast(device_type=query.device.type, enabled=False):
            query, value_in = query.float(), value_in.float()
            b, lq, _ = query.shape
            m, lv, p = self.num_heads, self.num_levels, self.num_points
            value = self.value_proj(value_in)
            value = value.view(b, value.shape[1], m, -1)  # (B, S, M, D)
            offsets = self.sampling_offsets(query).view(b, lq, m, lv, p, 2)
            # softmax over the L·P samples of each head
            weights = self.attention_weights(query).view(b, lq, m, lv * p).softmax(-1)
            weights = weights.view(b, lq, m, lv, p)
            # offsets are in pixels of each level: divide by that level's (W, H)
            normalizer = torch.tensor(
                [[w, h] for h, w in spatial_shapes], dtype=torch.float32, device=query.device
            )  # (L, 2)
            locations = (
                reference_points[:, :, None, :, None, :]
                + offsets / normalizer[None, None, None, :, None, :]
            )  # (B, Lq, M, L, P, 2)
            out = ms_deform_attn(value, spatial_shapes, locations, weights)
            return self.output_proj(out)


# ---------------------------------------------------------------- pixel decoder


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: x = LN(x + MSDeformAttn(x + pos)); x = LN(x + FFN(x)); dropout 0 so omitted
    [C msdeformattn.py::MSDeformAttnTransformerEncoderLayer]."""

    def __init__(self, dim: int = M2F_DIM, ffn_dim: int = M2F_ENC_FFN_DIM) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(
        self,
        src: torch.Tensor,
        pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        src = self.norm1(src + self.self_attn(src + pos, reference_points, src, spatial_shapes))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


def encoder_reference_points(
    spatial_shapes: Sequence[tuple[int, int]], device: torch.device
) -> torch.Tensor:
    """Pixel centres ((j + 0.5)/W, (i + 0.5)/H) of every level's tokens -> (1, S, L, 2).

    No padding masks, so every valid ratio is 1 and each token uses the same point on all levels
    [C msdeformattn.py::MSDeformAttnTransformerEncoder.get_reference_points].
    """
    points = []
    for h, w in spatial_shapes:
        ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # (H, W) each
        points.append(torch.stack((grid_x, grid_y), dim=-1).reshape(-1, 2))  # (H·W, 2)
    points = torch.cat(points, dim=0)  # (S, 2)
    return points[None, :, None, :].expand(1, -1, len(spatial_shapes), -1)  # (1, S, L, 2)


class MSDeformAttnPixelDecoder(nn.Module):
    """res2..res5 -> mask_features (B, 256, H/4, W/4) and [1/32, 1/16, 1/8] maps of 256 channels.

    [C mask2former/modeling/pixel_decoder/msdeformattn.py::MSDeformAttnPixelDecoder]:
    1×1 conv + GN projections of res5, res4, res3; 6 deformable encoder layers over the 3 flattened
    levels with sine position + learned level embedding; one FPN step onto res2; 1×1 mask-feature
    conv.
    """

    def __init__(
        self, in_channels: Sequence[int], dim: int = M2F_DIM, init: str = "xavier_uniform"
    ) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(
                f"in_channels must list res2..res5 (4 values), got {list(in_channels)}"
            )
        # input_proj[0] is res5, [1] res4, [2] res3: low to high resolution
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, dim, kernel_size=1), nn.GroupNorm(M2F_GN_GROUPS, dim))
            for c in reversed(in_channels[1:])
        )
        self.pos_embed = PositionEmbeddingSine(dim // 2)
        self.level_embed = nn.Parameter(torch.empty(M2F_ENC_LEVELS, dim))
        self.encoder_layers = nn.ModuleList(
            DeformableEncoderLayer(dim) for _ in range(M2F_ENC_LAYERS)
        )
        self.lateral_conv = nn.Sequential(
            nn.Conv2d(in_channels[0], dim, kernel_size=1, bias=False),
            nn.GroupNorm(M2F_GN_GROUPS, dim),
        )
        self.output_conv = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(M2F_GN_GROUPS, dim),
            nn.ReLU(),
        )
        self.mask_features = nn.Conv2d(dim, dim, kernel_size=1)
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str) -> None:
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        # encoder: Xavier on all matrices, then the deformable-attention init on top
        # [C msdeformattn.py::MSDeformAttnTransformerEncoderOnly._reset_parameters]
        init_transformer_weights(self.encoder_layers, init)
        for layer in self.encoder_layers:
            layer.self_attn.reset_parameters()
        nn.init.normal_(self.level_embed)
        c2_xavier_fill(self.lateral_conv[0])
        c2_xavier_fill(self.output_conv[0])
        c2_xavier_fill(self.mask_features)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """features: [res2, res3, res4, res5], each (B, C_i, H/2^(i+2), W/2^(i+2))."""
        res2 = features[0]
        srcs, poss, shapes = [], [], []
        for lvl, (proj, x) in enumerate(zip(self.input_proj, reversed(features[1:]))):
            src = proj(x)  # (B, C, h, w)
            shapes.append((src.shape[-2], src.shape[-1]))
            srcs.append(src.flatten(2).transpose(1, 2))  # (B, h·w, C)
            pos = self.pos_embed(src).flatten(2).transpose(1, 2)  # (1, h·w, C)
            poss.append(pos + self.level_embed[lvl])
        src = torch.cat(srcs, dim=1)  # (B, S, C), S = Σ h·w, levels 1/32, 1/16, 1/8
        pos = torch.cat(poss, dim=1)  # (1, S, C)
        reference_points = encoder_reference_points(shapes, src.device)
        for layer in self.encoder_layers:
            src = layer(src, pos, reference_points, shapes)
        b, _, c = src.shape
        multi_scale_features = [
            tokens.transpose(1, 2).reshape(b, c, h, w)  # (B, C, h, w)
            for tokens, (h, w) in zip(src.split([h * w for h, w in shapes], dim=1), shapes)
        ]
        # FPN step onto the stride-4 level [C msdeformattn.py::forward_features]
        y = self.lateral_conv(res2)
        y = y + F.interpolate(
            multi_scale_features[-1], size=y.shape[-2:], mode="bilinear", align_corners=False
        )
        y = self.output_conv(y)
        return self.mask_features(y), multi_scale_features


# ---------------------------------------------------------------- masked-attention decoder


def masked_attention_mask(
    mask_logits: torch.Tensor, size: tuple[int, int], num_heads: int
) -> torch.Tensor:
    """Masked attention: a query only sees memory positions its current mask covers.

    mask_logits (B, Q, H, W) -> bool (B·heads, Q, h·w), True = blocked: sigmoid of the logits
    resized bilinearly to the memory size is < 0.5. A query blocked everywhere is unblocked entirely
    (else its softmax is empty) [C mask2former/modeling/transformer_decoder/
    mask2former_transformer_decoder.py::MultiScaleMaskedTransformerDecoder.forward,
    forward_prediction_heads].
    """
    resized = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
    blocked = (resized.sigmoid() < 0.5).flatten(2)  # (B, Q, h·w)
    blocked = blocked & ~blocked.all(dim=-1, keepdim=True)
    # batch-major head layout, as nn.MultiheadAttention expects for a 3-D mask
    return blocked.detach().repeat_interleave(num_heads, dim=0)  # (B·heads, Q, h·w)


class MaskedDecoderLayer(nn.Module):
    """Masked cross-attention -> self-attention -> FFN, each post-norm with dropout 0
    [C mask2former_transformer_decoder.py::CrossAttentionLayer, SelfAttentionLayer, FFNLayer]."""

    def __init__(
        self, dim: int = M2F_DIM, num_heads: int = M2F_DEC_HEADS, ffn_dim: int = M2F_DEC_FFN_DIM
    ) -> None:
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_cross = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_self = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm_ffn = nn.LayerNorm(dim)

    def forward(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        memory: torch.Tensor,
        memory_key: torch.Tensor,
        attn_mask: torch.Tensor,
    ) -> torch.Tensor:
        """query, query_pos (B, Q, C); memory (B, S, C); memory_key = memory + pos (B, S, C);
        attn_mask (B·heads, Q, S) bool, True = blocked."""
        attended = self.cross_attn(
            query + query_pos, memory_key, memory, attn_mask=attn_mask, need_weights=False
        )[0]
        query = self.norm_cross(query + attended)
        q_k = query + query_pos
        query = self.norm_self(query + self.self_attn(q_k, q_k, query, need_weights=False)[0])
        return self.norm_ffn(query + self.linear2(F.relu(self.linear1(query))))


class MaskedAttentionDecoder(nn.Module):
    """9 masked-attention layers cycling over the 1/32, 1/16, 1/8 memories; a class + mask
    prediction after the initial queries and after every layer [C mask2former/modeling/
    transformer_decoder/mask2former_transformer_decoder.py::MultiScaleMaskedTransformerDecoder].

    learned_queries=True: nn.Embedding query_feat (content) and query_embed (position), as in
    Mask2Former. learned_queries=False: the caller passes query_feat and query_pos (B, Q, C).
    init: "xavier_uniform" (detectron2) or "xavier_normal" (mmdet) for the layers' weight matrices.
    """

    def __init__(
        self,
        num_classes: int = 19,
        num_queries: int = 100,
        dim: int = M2F_DIM,
        learned_queries: bool = True,
        init: str = "xavier_uniform",
    ) -> None:
        super().__init__()
        self.num_heads = M2F_DEC_HEADS
        self.learned_queries = learned_queries
        self.pos_embed = PositionEmbeddingSine(dim // 2)
        self.level_embed = nn.Embedding(M2F_ENC_LEVELS, dim)
        if learned_queries:
            self.query_feat = nn.Embedding(num_queries, dim)
            self.query_embed = nn.Embedding(num_queries, dim)
        self.layers = nn.ModuleList(MaskedDecoderLayer(dim) for _ in range(M2F_DEC_LAYERS))
        self.decoder_norm = nn.LayerNorm(dim)
        self.class_embed = nn.Linear(dim, num_classes + 1)  # last logit = no-object
        self.mask_embed = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim)
        )
        init_transformer_weights(self.layers, init)

    def predict(
        self, query: torch.Tensor, mask_features: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """query (B, Q, C) -> class logits (B, Q, K+1), mask logits (B, Q, H/4, W/4)."""
        query = self.decoder_norm(query)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_embed(query), mask_features)
        return self.class_embed(query), mask_logits

    def forward(
        self,
        mask_features: torch.Tensor,
        multi_scale_features: Sequence[torch.Tensor],
        query_feat: torch.Tensor | None = None,
        query_pos: torch.Tensor | None = None,
    ) -> dict:
        b = mask_features.shape[0]
        if self.learned_queries:
            if query_feat is not None or query_pos is not None:
                raise ValueError(
                    "this decoder has learned queries; do not pass query_feat/query_pos"
                )
            query_feat = self.query_feat.weight[None].expand(b, -1, -1)  # (B, Q, C)
            query_pos = self.query_embed.weight[None].expand(b, -1, -1)  # (B, Q, C)
        elif query_feat is None or query_pos is None:
            raise ValueError("learned_queries=False: pass query_feat and query_pos, each (B, Q, C)")

        memories, keys, sizes = [], [], []
        for lvl, x in enumerate(multi_scale_features):
            sizes.append((x.shape[-2], x.shape[-1]))
            memory = x.flatten(2).transpose(1, 2) + self.level_embed.weight[lvl]  # (B, h·w, C)
            memories.append(memory)
            keys.append(memory + self.pos_embed(x).flatten(2).transpose(1, 2))  # (B, h·w, C)

        query = query_feat
        logits, masks = self.predict(query, mask_features)
        predictions = [(logits, masks)]
        for i, layer in enumerate(self.layers):
            lvl = i % len(memories)
            attn_mask = masked_attention_mask(masks, sizes[lvl], self.num_heads)
            query = layer(query, query_pos, memories[lvl], keys[lvl], attn_mask)
            logits, masks = self.predict(query, mask_features)
            predictions.append((logits, masks))
        return {
            "pred_logits": predictions[-1][0],  # (B, Q, K+1)
            "pred_masks": predictions[-1][1],  # (B, Q, H/4, W/4)
            "aux_outputs": [{"pred_logits": c, "pred_masks": m} for c, m in predictions[:-1]],
        }


class Mask2FormerHead(nn.Module):
    """Pixel decoder + masked-attention decoder; in_channels are those of res2..res5."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int = 19,
        num_queries: int = 100,
        learned_queries: bool = True,
        init: str = "xavier_uniform",
    ) -> None:
        super().__init__()
        self.pixel_decoder = MSDeformAttnPixelDecoder(in_channels, init=init)
        self.transformer_decoder = MaskedAttentionDecoder(
            num_classes, num_queries, learned_queries=learned_queries, init=init
        )

    def forward(
        self,
        features: Sequence[torch.Tensor],
        query_feat: torch.Tensor | None = None,
        query_pos: torch.Tensor | None = None,
    ) -> dict:
        """features [res2, res3, res4, res5] -> {pred_logits, pred_masks, aux_outputs (9 dicts)}."""
        mask_features, multi_scale_features = self.pixel_decoder(features)
        return self.transformer_decoder(mask_features, multi_scale_features, query_feat, query_pos)


def semantic_inference(pred_logits: torch.Tensor, pred_masks: torch.Tensor) -> torch.Tensor:
    """score[c] = Σ_q softmax(class logits_q)[c] · sigmoid(mask_q), no-object column dropped
    [C mask2former/maskformer_model.py::MaskFormer.semantic_inference].

    pred_logits (B, Q, K+1), pred_masks (B, Q, h, w) -> (B, K, h, w).
    """
    class_prob = pred_logits.softmax(-1)[..., :-1]
    return torch.einsum("bqc,bqhw->bchw", class_prob, pred_masks.sigmoid())


# ---------------------------------------------------------------- targets, matcher, losses


def semantic_to_targets(
    labels: torch.Tensor, num_classes: int = 19, ignore_index: int = 255
) -> list[dict[str, torch.Tensor]]:
    """(B, H, W) int64 train ids -> per image {labels (K,), masks (K, H, W) float}: one binary mask
    per class present, ascending, ignore label excluded [C mask2former/data/dataset_mappers/
    mask_former_semantic_dataset_mapper.py::__call__]."""
    targets = []
    for label in labels:
        classes = torch.unique(label)  # sorted
        classes = classes[classes != ignore_index]
        if len(classes) and int(classes[-1]) >= num_classes:
            bad = int(classes[-1])
            raise ValueError(
                f"label {bad} is neither a train id < {num_classes} nor {ignore_index}"
            )
        masks = (label[None] == classes[:, None, None]).float()  # (K, H, W)
        targets.append({"labels": classes, "masks": masks})
    return targets


def point_sample(inputs: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear read of inputs (N, C, H, W) at coords (N, P, 2) as (x, y) in [0, 1]² -> (N, C, P)
    [C detectron2/projects/PointRend/point_rend/point_features.py::point_sample]."""
    grid = 2.0 * coords[:, :, None, :] - 1.0  # (N, P, 1, 2)
    return F.grid_sample(inputs, grid, mode="bilinear", align_corners=False).squeeze(3)


def random_coords(counts: Sequence[int], num_points: int, device: torch.device,
                  generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:  # fmt: skip
    """Uniform (x, y) in [0, 1]², (Σ counts, num_points, 2): image b's counts[b] rows drawn from
    generators[b] (the same draws on any number of processes), or all from the global RNG."""
    if generators is None:
        counts, generators = [sum(counts)], [None]
    return torch.cat([torch.rand(n, num_points, 2, device=device, generator=g)
                      for n, g in zip(counts, generators, strict=True)])  # fmt: skip


def uncertain_point_coords(
    logits: torch.Tensor, num_points: int, oversample: float, importance: float,
    counts: Sequence[int] | None = None, generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:  # fmt: skip
    """PointRend importance sampling: of num_points·oversample uniform candidates keep the
    importance·num_points with the smallest |logit|, then add fresh uniform points to num_points.

    logits (N, 1, H, W) -> coords (N, num_points, 2) in [0, 1]², uncertain points first
    [C point_features.py::get_uncertain_point_coords_with_randomness], uncertainty = −|logit|.
    Image b's counts[b] consecutive masks draw from generators[b] (see random_coords).
    """
    counts, device = [len(logits)] if counts is None else counts, logits.device
    num_candidates = int(num_points * oversample)
    num_uncertain = int(importance * num_points)
    candidates = random_coords(counts, num_candidates, device, generators)
    uncertainty = -point_sample(logits, candidates).abs()[:, 0]  # (N, num_candidates)
    idx = uncertainty.topk(num_uncertain, dim=1).indices  # (N, num_uncertain)
    coords = candidates.gather(1, idx[:, :, None].expand(-1, -1, 2))  # (N, num_uncertain, 2)
    num_random = num_points - num_uncertain
    if num_random > 0:
        coords = torch.cat([coords, random_coords(counts, num_random, device, generators)], dim=1)
    return coords


def pairwise_bce_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean BCE over points for every (prediction, target) pair: (Q, P), (K, P) -> (Q, K).
    BCE(x, t) = t·BCE(x, 1) + (1 − t)·BCE(x, 0), so two matrix products cover all pairs
    [C mask2former/modeling/matcher.py::batch_sigmoid_ce_loss]."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    cost = torch.einsum("qp,kp->qk", pos, targets) + torch.einsum("qp,kp->qk", neg, 1 - targets)
    return cost / logits.shape[1]


def pairwise_dice_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1 − (2·Σσ(x)·t + 1) / (Σσ(x) + Σt + 1) for every pair: (Q, P), (K, P) -> (Q, K)
    [C matcher.py::batch_dice_loss]."""
    probs = logits.sigmoid()
    numerator = 2 * torch.einsum("qp,kp->qk", probs, targets)
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def sigmoid_bce_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """BCE averaged over the P points of each matched mask, summed over masks, / num_masks;
    (N, P) inputs [C mask2former/modeling/criterion.py::sigmoid_ce_loss]."""
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Σ_masks [1 − (2·Σσ(x)·t + 1) / (Σσ(x) + Σt + 1)] / num_masks; (N, P) inputs
    [C criterion.py::dice_loss]."""
    probs = logits.sigmoid()
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


class HungarianMatcher:
    """One-to-one matching of queries to target masks per image, minimising
    cost_class·(−p[class]) + cost_mask·BCE + cost_dice·dice on num_points uniform random points
    shared by all queries and targets of an image
    [C mask2former/modeling/matcher.py::HungarianMatcher.memory_efficient_forward]."""

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
    ) -> None:
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def __call__(
        self,
        pred_logits: torch.Tensor,
        pred_masks: torch.Tensor,
        targets: Sequence[dict[str, torch.Tensor]],
        generators: Sequence[torch.Generator] | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """pred_logits (B, Q, K+1), pred_masks (B, Q, h, w) -> per image
        (query indices, target indices), int64 on the CPU; image b's points from generators[b]."""
        b, q = pred_logits.shape[:2]
        probs = pred_logits.float().softmax(-1)  # (B, Q, K+1)
        # one coordinate set per image, read for all Q predictions at once (queries as channels)
        coords = random_coords([1] * b, self.num_points, pred_masks.device, generators)
        pred_points = point_sample(pred_masks.float(), coords)  # (B, Q, P)
        costs = []
        for i, target in enumerate(targets):
            labels, masks = target["labels"], target["masks"]
            if len(labels) == 0:
                continue
            target_points = point_sample(masks[None].float(), coords[i : i + 1])[0]  # (K, P)
            cost = (
                self.cost_class * -probs[i][:, labels]
                + self.cost_mask * pairwise_bce_cost(pred_points[i], target_points)
                + self.cost_dice * pairwise_dice_cost(pred_points[i], target_points)
            )  # (Q, K)
            costs.append(cost)
        # one device -> host copy for the whole batch, then scipy per image
        costs = torch.cat(costs, dim=1).cpu() if costs else torch.zeros(q, 0)
        costs = costs.split([len(t["labels"]) for t in targets], dim=1)
        indices = []
        for cost in costs:
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices


def global_counts(targets: Sequence[dict[str, torch.Tensor]], num_queries: int, eos_coef: float,
                  device: torch.device) -> tuple[float, float]:  # fmt: skip
    """Per process, the global batch's target masks (≥ 1) [C criterion.py::SetCriterion.forward]
    and CE class weights (1 per matched query, min(Q, K) per image; eos_coef per other query; the
    official CE uses its process's own sum: equal on one process; this makes 2 processes = 1)."""
    masks = sum(len(t["labels"]) for t in targets)
    matched = sum(min(len(t["labels"]), num_queries) for t in targets)
    weights = matched + eos_coef * (len(targets) * num_queries - matched)
    t = torch.tensor([masks, weights], dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return max(t[0].item(), 1.0), t[1].item()


class SetCriterion(nn.Module):
    """Mask2Former loss with deep supervision: for the final and each of the 9 auxiliary
    predictions, Hungarian matching then weight_ce·CE + weight_mask·BCE + weight_dice·dice
    [C mask2former/modeling/criterion.py::SetCriterion].

    Returns 30 already-weighted terms (loss_ce, loss_mask, loss_dice, then each with _0.._8 for
    aux_outputs[0..8]); the training loss is their sum.
    """

    def __init__(
        self,
        num_classes: int = 19,
        eos_coef: float = 0.1,
        weight_ce: float = 2.0,
        weight_mask: float = 5.0,
        weight_dice: float = 5.0,
        num_points: int = 12544,
        oversample: float = 3.0,
        importance: float = 0.75,
    ) -> None:
        super().__init__()
        self.num_classes, self.eos_coef = num_classes, eos_coef
        self.weight_ce, self.weight_mask, self.weight_dice = weight_ce, weight_mask, weight_dice
        self.num_points, self.oversample, self.importance = num_points, oversample, importance
        self.matcher = HungarianMatcher(weight_ce, weight_mask, weight_dice, num_points)
        # CE class weights: 1 for real classes, eos_coef for no-object (last index)
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = eos_coef
        self.register_buffer("class_weight", class_weight, persistent=False)

    @staticmethod
    def matched_queries(
        indices: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch index, query index) of every matched prediction, image by image."""
        batch_idx = torch.cat([torch.full_like(rows, i) for i, (rows, _) in enumerate(indices)])
        query_idx = torch.cat([rows for rows, _ in indices])
        return batch_idx, query_idx

    def loss_labels(
        self,
        pred_logits: torch.Tensor,
        targets: Sequence[dict[str, torch.Tensor]],
        indices: Sequence[tuple[torch.Tensor, torch.Tensor]],
        weight_sum: float,
    ) -> torch.Tensor:
        """CE over all B·Q queries weighted by class, / weight_sum (see global_counts); unmatched
        queries target no-object (num_classes)."""
        logits = pred_logits.float()  # (B, Q, K+1)
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )  # (B, Q)
        batch_idx, query_idx = self.matched_queries(indices)
        matched_labels = torch.cat(
            [t["labels"][cols.to(t["labels"].device)] for t, (_, cols) in zip(targets, indices)]
        )
        target_classes[batch_idx.to(logits.device), query_idx.to(logits.device)] = (
            matched_labels.to(logits.device)
        )
        class_weight = self.class_weight.to(logits.device)
        ce = F.cross_entropy(logits.transpose(1, 2), target_classes, class_weight, reduction="sum")
        return ce / weight_sum

    def loss_masks(
        self,
        pred_masks: torch.Tensor,
        targets: Sequence[dict[str, torch.Tensor]],
        indices: Sequence[tuple[torch.Tensor, torch.Tensor]],
        num_masks: float,
        generators: Sequence[torch.Generator] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Point-sampled BCE and dice of each matched (prediction, target) pair, / num_masks; the
        points of image b's pairs drawn from generators[b] when given (else the global RNG)."""
        batch_idx, query_idx = self.matched_queries(indices)
        if len(batch_idx) == 0:  # no targets in the batch: zero, but still part of the graph
            zero = pred_masks.sum() * 0.0
            return zero, zero
        pred = pred_masks[batch_idx.to(pred_masks.device), query_idx.to(pred_masks.device)]
        pred = pred.float()[:, None]  # (N, 1, h, w)
        target = torch.cat(
            [t["masks"][cols.to(t["masks"].device)] for t, (_, cols) in zip(targets, indices)]
        )
        target = target.to(pred)[:, None]  # (N, 1, H, W)
        with torch.no_grad():
            coords = uncertain_point_coords(pred, self.num_points, self.oversample, self.importance,
                                            [len(r) for r, _ in indices], generators)  # fmt: skip
            target_points = point_sample(target, coords)[:, 0]  # (N, P)
        pred_points = point_sample(pred, coords)[:, 0]  # (N, P)
        return (
            sigmoid_bce_loss(pred_points, target_points, num_masks),
            dice_loss(pred_points, target_points, num_masks),
        )

    def forward(self, outputs: dict, targets: Sequence[dict[str, torch.Tensor]],
                generators: Sequence[torch.Generator] | None = None) -> dict:  # fmt: skip
        """generators: one per image for its random points (2 processes = 1); None: global RNG."""
        logits = outputs["pred_logits"]
        num_masks, weight_sum = global_counts(targets, logits.shape[1], self.eos_coef,
                                              logits.device)  # fmt: skip
        predictions = [("", outputs)] + [
            (f"_{i}", aux) for i, aux in enumerate(outputs["aux_outputs"])
        ]
        losses = {}
        for suffix, out in predictions:
            indices = self.matcher(out["pred_logits"], out["pred_masks"], targets, generators)
            loss_mask, loss_dice = self.loss_masks(out["pred_masks"], targets, indices, num_masks,
                                                   generators)  # fmt: skip
            losses["loss_ce" + suffix] = self.weight_ce * self.loss_labels(
                out["pred_logits"], targets, indices, weight_sum
            )
            losses["loss_mask" + suffix] = self.weight_mask * loss_mask
            losses["loss_dice" + suffix] = self.weight_dice * loss_dice
        return losses


# ---- END Mask2Former ----


# =============================================================================================
# Appendix B: Official weights
# =============================================================================================
# Released CLOUDS checkpoints (detectron2 .pth: backbone.clip_model.* / sem_seg_head.*), local
# CLIP weight files, open_clip tags, and this file's own checkpoints.

# Official Mask2Former parameter names -> this file's names; first matching rule wins, names not
# matched keep their form (pixel_decoder.input_proj.*, pixel_decoder.mask_features.*)
# [C msdeformattn.py::MSDeformAttnPixelDecoder, mask2former_transformer_decoder.py].
OFFICIAL_HEAD_RENAMES = (
    (r"^pixel_decoder\.transformer\.level_embed$", "pixel_decoder.level_embed"),
    (r"^pixel_decoder\.transformer\.encoder\.layers\.", "pixel_decoder.encoder_layers."),
    (r"^pixel_decoder\.adapter_1\.weight$", "pixel_decoder.lateral_conv.0.weight"),
    (r"^pixel_decoder\.adapter_1\.norm\.", "pixel_decoder.lateral_conv.1."),
    (r"^pixel_decoder\.layer_1\.weight$", "pixel_decoder.output_conv.0.weight"),
    (r"^pixel_decoder\.layer_1\.norm\.", "pixel_decoder.output_conv.1."),
    (r"^predictor\.transformer_cross_attention_layers\.(\d+)\.multihead_attn\.",
     r"transformer_decoder.layers.\1.cross_attn."),
    (r"^predictor\.transformer_cross_attention_layers\.(\d+)\.norm\.",
     r"transformer_decoder.layers.\1.norm_cross."),
    (r"^predictor\.transformer_self_attention_layers\.(\d+)\.self_attn\.",
     r"transformer_decoder.layers.\1.self_attn."),
    (r"^predictor\.transformer_self_attention_layers\.(\d+)\.norm\.",
     r"transformer_decoder.layers.\1.norm_self."),
    (r"^predictor\.transformer_ffn_layers\.(\d+)\.norm\.",
     r"transformer_decoder.layers.\1.norm_ffn."),
    (r"^predictor\.transformer_ffn_layers\.(\d+)\.", r"transformer_decoder.layers.\1."),
    # MLP(256, 256, 256, 3).layers.{0,1,2} -> Sequential(Linear, ReLU, Linear, ReLU, Linear).{0,2,4}
    (r"^predictor\.mask_embed\.layers\.(\d)\.",
     lambda m: f"transformer_decoder.mask_embed.{2 * int(m[1])}."),
    (r"^predictor\.", "transformer_decoder."),
)  # fmt: skip
# Parts of a released checkpoint deliberately not loaded, with the reason printed.
OFFICIAL_DROPPED = (
    (r"^backbone\.clip_model\.visual\.(head|trunk\.head|attnpool)\.",
     "CLIP image projection / attention pool (only the disabled geometric ensemble uses it)"),
    (r"^backbone\.clip_model\.(?!visual\.)",
     "CLIP text tower + logit scale (open-vocabulary path, off)"),
    (r"^void_embedding\.", "void class embedding (open-vocabulary path, never updated)"),
    (r"^criterion\.", "criterion buffers (rebuilt from eos_coef)"),
    (r"^sam\.", "SAM weights (loaded from --sam-checkpoint)"),
)  # fmt: skip


def rename_official_head_key(key: str) -> str:
    for pattern, replacement in OFFICIAL_HEAD_RENAMES:
        new, n = re.subn(pattern, replacement, key)
        if n:
            return new
    return key


def is_official_checkpoint(obj: dict) -> bool:
    state = obj.get("model", obj) if isinstance(obj, dict) else {}
    return isinstance(state, dict) and any(str(k).startswith("sem_seg_head.") for k in state)


def split_official_state_dict(obj: dict) -> tuple[dict, dict, dict, dict[str, list[str]]]:
    """Released detectron2 state dict -> (backbone `visual.*`, head, teacher head, dropped keys
    grouped by reason). An unknown key is an error: nothing is silently ignored."""
    state = obj.get("model", obj)
    backbone, head, teacher, dropped, unknown = {}, {}, {}, {}, []
    for key, value in state.items():
        reason = next((r for p, r in OFFICIAL_DROPPED if re.match(p, key)), None)
        if reason is not None:
            dropped.setdefault(reason, []).append(key)
        elif key.startswith("backbone.clip_model.visual."):
            backbone[key[len("backbone.clip_model.") :]] = value
        elif key.startswith("sem_seg_head."):
            head[rename_official_head_key(key[len("sem_seg_head.") :])] = value
        elif key.startswith("sem_seg_head_ema."):  # saved only when OVERWRITING=False
            teacher[rename_official_head_key(key[len("sem_seg_head_ema.") :])] = value
        else:
            unknown.append(key)
    if unknown:
        msg = f"unexpected keys in the CLOUDS checkpoint: {unknown[:5]} ({len(unknown)} in all)"
        raise common.CheckpointError(msg + "; is it a CLOUDS model_final.pth?")
    return backbone, head, teacher, dropped


def strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_official_checkpoint(obj: dict, backbone: FrozenCLIPEncoder, head: nn.Module,
                             teacher: EMATeacher | None = None) -> dict:  # fmt: skip
    """A released CLOUDS checkpoint onto our modules: zero missing / unexpected keys for the parts
    kept; prints what was deliberately dropped. Returns counts for the log."""
    backbone_sd, head_sd, teacher_sd, dropped = split_official_state_dict(obj)
    load = functools.partial(common.load_state_strict, hint="does --backbone match the checkpoint?")
    report = {"head_tensors": load(head, head_sd, "CLOUDS checkpoint head")}
    if backbone_sd:
        visual = strip(backbone_sd, "visual.")
        report["backbone_tensors"] = load(backbone.visual, visual, "CLOUDS checkpoint encoder")
    if teacher_sd and teacher is not None:
        report["teacher_tensors"] = load(teacher.head, teacher_sd, "CLOUDS checkpoint teacher")
    common.print0(f"CLOUDS checkpoint: loaded {report}")
    for reason, keys in dropped.items():
        common.print0(f"  dropped {len(keys)} keys ({keys[0]}, ...): {reason}")
    report["dropped"] = {reason: len(keys) for reason, keys in dropped.items()}
    return report


def read_weights(path: str) -> dict:
    """--pretrained FILE: a released CLOUDS .pth, a CLIP state dict (open_clip .bin / .pt /
    .safetensors, maybe under "state_dict") or OpenAI's TorchScript archive (RN50.pt, ...)."""
    if path.endswith(".safetensors"):  # an optional dependency, imported when used
        return importlib.import_module("safetensors.torch").load_file(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            scripted = any(name.endswith("/constants.pkl") for name in archive.namelist())
        if scripted:  # read as open_clip reads OpenAI's files [open_clip openai.py]; TorchScript
            with warnings.catch_warnings():  # holds no Python pickle code
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(path, map_location="cpu").state_dict()
    hint = "pass a CLIP weights file, a CLOUDS .pth, an open_clip tag or none"
    obj = common.read_weights_file(path, "--pretrained file", hint)
    if not isinstance(obj, dict):
        raise common.CheckpointError(f"--pretrained {path} holds no state dict ({hint})")
    return obj.get("state_dict", obj)


def load_clip_weights(backbone: FrozenCLIPEncoder, state: dict, path: str) -> int:
    """A local CLIP weights file into the frozen encoder: its visual.* tensors, strictly; the text
    tower and the image projection / attention pool are not used (deviation 1)."""
    state = common.strip_prefixes(state)  # open_clip training checkpoints save module.*
    clip = {f"backbone.clip_model.{k}": v for k, v in state.items()}
    visual, _, _, dropped = split_official_state_dict(clip)
    if not visual:
        msg = f"--pretrained {path} holds no visual.* tensors: not CLIP weights (pass a CLIP "
        raise common.CheckpointError(msg + "weights file, a CLOUDS .pth, an open_clip tag or none)")
    visual, own = strip(visual, "visual."), backbone.visual.state_dict()
    # BatchNorm counters a file may lack (unused: the encoder never trains)
    counters = {k: v for k, v in own.items() if k.endswith("num_batches_tracked")}
    hint = f"is it the CLIP image encoder of --backbone {backbone.size}?"
    common.load_state_strict(backbone.visual, counters | visual, f"--pretrained {path}", hint)
    n, unused = len(visual), sum(len(keys) for keys in dropped.values())
    common.print0(f"CLIP weights: loaded {n} tensors from {path} into the frozen {backbone.size} "
                  f"encoder ({unused} text-tower / projection tensors not used)")  # fmt: skip
    return n


def pretrained_kind(args: argparse.Namespace) -> str:
    """What --pretrained names: "none", "file" (a CLOUDS .pth or CLIP weights) or "tag" (open_clip
    weights: in the local cache, or downloadable; offline, this fails at once)."""
    name = args.pretrained
    if name == "none":
        return "none"
    if os.path.isfile(name):
        return "file"
    if os.sep in name or name.endswith((".pt", ".pth", ".bin", ".safetensors")):
        msg = f"--pretrained {name}: no such file (pass a CLIP weights file, a CLOUDS .pth, an "
        raise common.CheckpointError(msg + "open_clip tag or none)")
    if args.backbone == "test":
        common.warn(f"--pretrained {name} is not used: the test encoder has no released weights")
        return "none"
    hint = "pass a local CLIP weights file with --pretrained FILE, or --pretrained none"
    common.require_open_clip_tag(BACKBONES[args.backbone][0], name, hint)
    return "tag"


def load_weights(args: argparse.Namespace) -> tuple[FrozenCLIPEncoder, Mask2FormerHead, dict]:
    """The frozen encoder and the head with --pretrained (none, an open_clip tag, a local CLIP
    weights file or a released CLOUDS .pth) and --init applied. Returns counts for the log."""
    kind = pretrained_kind(args)
    obj = read_weights(args.pretrained) if kind == "file" else None
    init = read_init(args) if args.init else None  # every file read before anything is built
    with torch.random.fork_rng(devices=[]):  # the same random init on every process, on resume
        torch.default_generator.manual_seed(args.seed)  # the CPU stream only: fork_rng restores it
        backbone = FrozenCLIPEncoder(args.backbone, args.pretrained if kind == "tag" else "none")
        head = build_head(backbone, args.num_queries)
    report = {}
    if obj is not None and is_official_checkpoint(obj):  # a released CLOUDS .pth
        report.update(load_official_checkpoint(obj, backbone, head))
    elif obj is not None:  # CLIP weights
        report["clip_tensors"] = load_clip_weights(backbone, obj, args.pretrained)
    if init is not None and is_official_checkpoint(init):
        report.update(load_official_checkpoint(init, backbone, head))
    elif init is not None:
        load_model_state(backbone, head, init, f"--init {args.init}", args.pretrained)
        report.update(init=args.init, init_iter=init["iter"], init_phase=init["args"].get("phase"))
    return backbone, head, report


def build_model(args: argparse.Namespace, dist: common.Dist, resume: dict | None = None) -> tuple:
    """(CLOUDS, GradScaler or None, weights report): encoder and head with their weights, teacher,
    SAM, criterion, channels_last encoder (--fast), compiled head (--compile); `resume` applied."""
    backbone, head, weights = load_weights(args)
    backbone.memory_format = common.memory_format(args, dist)
    backbone.to(dist.device, memory_format=backbone.memory_format)
    head = head.to(dist.device)
    teacher = EMATeacher(head, args.ema_alpha, args.ema_every) if args.phase == "joint" else None
    real_sam = args.phase == "joint" and args.sam in SAM_DEFAULT_CHECKPOINTS and not args.eval_only
    sam = build_sam_predictor(args.sam, args.sam_checkpoint, dist.device) if real_sam else None
    criterion = SetCriterion(num_classes=NUM_CLASSES, num_points=args.num_points).to(dist.device)
    autocast, scaler = common.autocast(dist.device, args.amp)
    student = common.wrap_ddp(common.maybe_compile(head, args), dist)
    model = CLOUDS(backbone, head, student, criterion, teacher, sam, autocast)
    if resume is not None:
        restore_run(model, resume, f"--resume {args.resume}", args.pretrained)
    return model, scaler, weights


def model_state(model: CLOUDS) -> dict:
    """Checkpoint `model`: the head; the frozen CLIP encoder is omitted (its weights come from
    --pretrained), except the tiny random `test` encoder, saved as backbone.*."""
    state = {f"head.{k}": v for k, v in model.head.state_dict().items()}
    if model.backbone.size == "test":
        state.update({f"backbone.{k}": v for k, v in model.backbone.state_dict().items()})
    return state


def save_checkpoint(args, iteration: int, model: CLOUDS, optimizer, scaler) -> None:
    """out/last.pt (rank 0): head (+ test encoder), optimizer, scaler, teacher and its counter."""
    # DEVIATION 4: the teacher and its counter are saved (official: not), for an exact --resume
    t = model.teacher
    teacher = {"head": t.head.state_dict(), "iteration": t.iteration} if t is not None else None
    omitted = model.backbone.size != "test"
    fingerprint = encoder_fingerprint(model.backbone) if omitted else None
    extra = {"teacher": teacher, "backbone_omitted": omitted, "encoder_fingerprint": fingerprint}
    common.save_checkpoint(os.path.join(args.out, "last.pt"), method="clouds", iteration=iteration,
                           model_state=model_state(model), optimizer=optimizer, scaler=scaler,
                           args=args, extra=extra)  # fmt: skip


def read_resume(args: argparse.Namespace) -> dict:
    """--resume: a checkpoint of this file, this phase and these model flags (read first)."""
    ckpt = common.load_checkpoint(args.resume, "clouds")
    phase = ckpt["args"].get("phase")
    if phase != args.phase and not args.eval_only:
        msg = f"--resume {args.resume} is a --phase {phase} checkpoint; resume it with that phase "
        raise common.UsageError(msg + "(a joint run starts from a warm-up checkpoint with --init)")
    common.check_resume_args(ckpt, args, MODEL_FLAGS)
    return ckpt


def restore_run(model: CLOUDS, ckpt: dict, source: str, pretrained: str) -> None:
    """A checkpoint of this file onto the model: head, test encoder, teacher and its counter."""
    load_model_state(model.backbone, model.head, ckpt, source, pretrained)
    if model.teacher is not None and ckpt.get("teacher") is not None:
        model.teacher.head.load_state_dict(ckpt["teacher"]["head"])
        model.teacher.iteration = int(ckpt["teacher"]["iteration"])


def encoder_fingerprint(backbone: FrozenCLIPEncoder) -> float:
    """float64 sum of |w| over the frozen encoder's first and last tensors (no cancellation: the
    same on any device to ~1e-12), kept in checkpoints that leave the encoder out: a run on other
    --pretrained weights is refused."""
    params = list(backbone.parameters())
    return float(params[0].double().abs().sum() + params[-1].double().abs().sum())


def load_model_state(backbone: FrozenCLIPEncoder, head: nn.Module, ckpt: dict, source: str,
                     pretrained: str) -> int:  # fmt: skip
    """A checkpoint of this file onto the head (+ the test encoder), trained on this encoder (no
    fingerprint: an older file, not checked); else one line naming its model flags or weights."""
    fp = ckpt.get("encoder_fingerprint")
    if fp is not None and not math.isclose(fp, ours := encoder_fingerprint(backbone), rel_tol=1e-9):
        theirs, seed = ckpt["args"].get("pretrained"), " and --seed" * (pretrained == "none")
        raise common.CheckpointError(
            f"{source} was trained on the frozen encoder of --pretrained {theirs} (fingerprint "
            f"{fp:.10g}), this run has --pretrained {pretrained} (fingerprint {ours:.10g}): pass "
            f"the same --pretrained{seed}")  # fmt: skip
    trained = [ckpt["args"].get(k) for k in MODEL_FLAGS]  # backbone, num_queries
    hint = "it was trained with --backbone {} --num-queries {}".format(*trained)
    n = common.load_state_strict(head, strip(ckpt["model"], "head."), source, hint)
    if backbone.size == "test":
        n += common.load_state_strict(backbone, strip(ckpt["model"], "backbone."), source, hint)
    return n


def read_init(args: argparse.Namespace) -> dict:
    """--init: a warm-up checkpoint of this file (head, + test encoder) or a released CLOUDS .pth.
    A joint-phase checkpoint is refused: its teacher would be dropped."""
    path = args.init
    hint = "the joint phase starts from the warm-up run's last.pt (run --phase warmup first)"
    obj = common.read_weights_file(path, "--init checkpoint", hint)
    if is_official_checkpoint(obj):
        return obj
    ckpt = obj if isinstance(obj, dict) and obj.get("method") == "clouds" else None
    ckpt = ckpt or common.load_checkpoint(path, "clouds")  # its one-line reason
    if ckpt["args"].get("phase") == "joint" and not args.eval_only:
        msg = f"--init {path} is a --phase joint checkpoint: start a joint run from the warm-up "
        raise common.UsageError(msg + f"run's last.pt (--resume {path} continues that joint run)")
    return ckpt


# ---------------------------------------------------------------- the other foundation models
# SAM, and Stable Diffusion 2 on the LLM prompts for the generated folder (`python clouds.py
# generate`) [C sam.py, generate_txt_im.py]. --sam: mobile_sam (released default), vit_h / vit_l /
# vit_b, none (the "without SAM" ablation), fake (tests, demo). --prompts: prompt_llama70b.txt of
# the official repository (Apache-2.0, (c) Telecom Paris, Y. Benigmim), not shipped: download it.

SEGMENT_ANYTHING = ("segment_anything", "pip install segment-anything")  # vit_h / vit_l / vit_b
SAM_DEFAULT_CHECKPOINTS = {"mobile_sam": "weights/mobile_sam.pt",  # [C sam.py] ./weights/...
                           "vit_h": "weights/sam_vit_h_4b8939.pth",
                           "vit_l": "weights/sam_vit_l_0b3195.pth",
                           "vit_b": "weights/sam_vit_b_01ec64.pth"}  # fmt: skip
PROMPTS_MD5 = "bed7a3432ccdf99180913134fb92431e"  # prompt_llama70b.txt at bac4305c31c6
PROMPTS_LINES = 100
PROMPTS_BYTES = 5831
GEN_ARGS = dict(height=768, width=768, num_inference_steps=50, guidance_scale=7.5)
GEN_NUM_IMAGES = 5000  # --num-images per call (5,000 in total [unverified])


def build_sam_predictor(kind: str, checkpoint: str | None, device: torch.device) -> SamPredictor:
    """SAM behind the predictor interface: `mobile_sam` ("vit_t", the released default [C sam.py,
    config.py SAM.MOBILE=True]) or `segment_anything` (vit_h / vit_l / vit_b); ResizeLongestSide
    (1024) + SAM normalisation, points scaled into that frame, 3 masks binarised at logit 0.
    DEVIATION 2: eval mode (official: MobileSAM left in train mode, BatchNorm batch statistics)."""
    package, how = ("mobile_sam", "install MobileSAM") if kind == "mobile_sam" else SEGMENT_ANYTHING
    try:
        sam_lib = importlib.import_module(package)
    except ImportError:
        msg = f"--sam {kind} needs the `{package}` package ({how}); or --sam none (no-SAM ablation)"
        raise common.UsageError(msg) from None
    checkpoint = checkpoint or SAM_DEFAULT_CHECKPOINTS[kind]
    if not os.path.isfile(checkpoint):
        raise common.UsageError(f"--sam-checkpoint {checkpoint}: no such file ({kind} weights)")
    model = sam_lib.sam_model_registry["vit_t" if kind == "mobile_sam" else kind](checkpoint)
    predictor = sam_lib.SamPredictor(model.to(device).eval().requires_grad_(False))

    @torch.no_grad()
    def predict(image: np.ndarray, points_xy: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        predictor.set_image(image)  # RGB (H, W, 3) uint8
        coords = torch.as_tensor(points_xy, dtype=torch.float32, device=device)
        coords = predictor.transform.apply_coords_torch(coords, image.shape[:2])  # x, y * 1024/long
        labels = torch.ones(coords.shape[:2], device=device)  # all positive
        masks, iou, _ = predictor.predict_torch(coords, labels, multimask_output=True)
        return masks, iou  # (K, 3, H, W) bool, (K, 3)

    return predict


def fake_sam_predictor(label_map: torch.Tensor) -> SamPredictor:
    """Test/demo backend (`--sam fake`): for each prompt, mask 1 (score 0.9) is the 4-connected
    component of `label_map` under the prompt's first point, mask 0 (0.5) that point's whole class,
    mask 2 (0.1) empty. Refinement with it keeps exactly the large components."""
    lm = label_map.cpu().numpy()
    labelled = {}  # class -> its 4-connected components, computed once

    def predict(image: np.ndarray, points_xy: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        k = len(points_xy)
        masks = np.zeros((k, 3, *lm.shape), dtype=bool)
        for i, (x, y) in enumerate(points_xy[:, 0].astype(int)):
            c = lm[y, x]
            if c not in labelled:
                labelled[c] = ndimage.label(lm == c)[0]
            masks[i, 0] = lm == c
            masks[i, 1] = labelled[c] == labelled[c][y, x]
        scores = torch.tensor([[0.5, 0.9, 0.1]]).expand(k, 3)
        return torch.from_numpy(masks), scores

    return predict


def check_prompts_file(path: str | Path) -> str | None:
    """None if `path` is the official prompt_llama70b.txt, else what differs (one line)."""
    data = Path(path).read_bytes()
    md5 = hashlib.md5(data).hexdigest()
    lines = len(data.decode("utf-8", errors="replace").splitlines())
    if (md5, lines, len(data)) == (PROMPTS_MD5, PROMPTS_LINES, PROMPTS_BYTES):
        return None
    ours = f"md5 {md5}, {lines} lines, {len(data)} bytes"
    official = f"{PROMPTS_MD5}, {PROMPTS_LINES} lines, {PROMPTS_BYTES} bytes"
    return f"{path} is not the official prompt_llama70b.txt ({ours}; official {official})"


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line, stripped, empty lines skipped [C generate_txt_im.py::
    read_sentences_from_file]; a file other than the official one gets one warning line."""
    if not os.path.isfile(path):
        msg = f"--prompts {path}: no such file; download the official prompt_llama70b.txt"
        raise common.UsageError(msg)
    if warning := check_prompts_file(path):
        common.warn(warning)
    prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise common.UsageError(f"--prompts {path} holds no prompt (one prompt per line)")
    return prompts


def generate_images(pipe: Callable, prompts: Sequence[str], out_dir: str | Path, num_images: int,
                    part: int = 0, seed: int = 0,
                    make_generator: Callable | None = None) -> list[Path]:  # fmt: skip
    """Stable Diffusion 2 (`pipe(prompt, **GEN_ARGS, generator).images[0]`) over the prompts,
    round-robin [C generate_txt_im.py::main]; existing files are kept (restartable jobs).
    DEVIATION 7: image k = j + part * num_images uses seed + k (official: no seed)."""
    (out := Path(out_dir)).mkdir(parents=True, exist_ok=True)
    written = []
    for j in range(num_images):
        path = out / generated_image_name(j, part, num_images, len(prompts))
        if not path.exists():
            k = j + part * num_images
            generator = make_generator(seed + k) if make_generator is not None else None
            pipe(prompts[j % len(prompts)], **GEN_ARGS, generator=generator).images[0].save(path)
        written.append(path)
    return written


def generate_main(argv: Sequence[str]) -> None:
    """`python clouds.py generate ...`: a folder of generated images [C generate_txt_im.py]."""
    # fmt: off
    p = common.make_parser("The CLOUDS image folder: Stable Diffusion 2 on the LLM prompts.")
    a = p.add_argument
    a("--prompts", required=True, help="prompt_llama70b.txt of the official repository")
    a("--out", required=True, help="output folder of PNGs (give it to --generated)")
    a("--sd-path", required=True, help="local Stable Diffusion 2 folder (no download)")
    a("--num-images", type=common.positive_int, default=GEN_NUM_IMAGES,
      help="images of this job (default %(default)s [C generate_txt_im.py])")
    a("--part", type=common.nonnegative_int, default=0,
      help="job index: names start at part * num-images (default %(default)s)")
    a("--seed", type=int, default=0, help="image k uses seed + k (default %(default)s)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu",
      help="(default %(default)s)")
    # fmt: on
    args = p.parse_args(argv)
    prompts = read_prompts(args.prompts)
    # diffusers StableDiffusionPipeline + EulerDiscreteScheduler from a local Stable Diffusion 2
    # folder (stabilityai/stable-diffusion-2 layout), fp16 on CUDA, no download
    try:
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    except ImportError:
        msg = "generation needs diffusers (pip install diffusers transformers)"
        raise common.UsageError(msg) from None
    if not os.path.isdir(args.sd_path):
        raise common.UsageError(f"--sd-path {args.sd_path}: no such folder (a local SD 2 copy)")
    sd, device, local = args.sd_path, args.device, dict(local_files_only=True)  # no download
    scheduler = EulerDiscreteScheduler.from_pretrained(sd, subfolder="scheduler", **local)
    fp16 = dict(torch_dtype=torch.float16 if device.startswith("cuda") else torch.float32)
    pipe = StableDiffusionPipeline.from_pretrained(sd, scheduler=scheduler, **fp16, **local)
    pipe.to(device).set_progress_bar_config(disable=True)
    gen = lambda seed: torch.Generator(device).manual_seed(seed)  # noqa: E731
    paths = generate_images(pipe, prompts, args.out, args.num_images, args.part, args.seed, gen)
    print(f"{len(paths)} images in {args.out}")


# =============================================================================================
# Appendix C: Benchmark
# =============================================================================================


def synthetic_batch(batch: int, crop: int, num_generated: int, seed: int = 0) -> tuple:
    """Random images and a blocky label map; the last `num_generated` images count as generated."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8, generator=g)
    blocks = torch.randint(0, NUM_CLASSES, (batch, 1, 8, 8), generator=g).float()
    labels = F.interpolate(blocks, size=(crop, crop), mode="nearest")[:, 0].long()
    is_gen = torch.arange(batch) >= batch - num_generated
    labels[is_gen] = IGNORE_INDEX
    return images, images[is_gen].clone(), labels, is_gen


SHARES_HOW = (
    "each part run alone on inputs captured from one step and timed like the step "
    "(common.time_step, median); share = part time / step time. backbone: the frozen encoder "
    "on the student batch and the teacher's clean views; msdeformattn: the pixel decoders' "
    "MSDeformAttn calls, student forward + backward, teacher forward; loss: SetCriterion incl. "
    "the Hungarian matcher, forward + backward to the predictions"
)


def step_shares(model: CLOUDS, step: Callable, data: tuple, device: torch.device, n: int) -> dict:
    """Share of one training step spent in the frozen backbone, in MSDeformAttn and in the loss
    (how: SHARES_HOW; median of n)."""
    attn_inputs, loss_inputs = [], []
    heads = [model.head] + ([model.teacher.head] if model.teacher is not None else [])
    attns = [layer.self_attn for h in heads for layer in h.pixel_decoder.encoder_layers]
    detached = lambda x: [t.detach() if torch.is_tensor(t) else t for t in x]  # noqa: E731
    hooks = [a.register_forward_pre_hook(lambda m, x: attn_inputs.append((m, detached(x))))
             for a in attns]  # fmt: skip
    hooks.append(model.criterion.register_forward_pre_hook(lambda m, x: loss_inputs.extend(x)))
    step()
    for hook in hooks:
        hook.remove()
    leaf = lambda t: t.detach().requires_grad_()  # noqa: E731
    outputs, targets = loss_inputs
    aux = [{k: leaf(v) for k, v in a.items()} for a in outputs["aux_outputs"]]
    outputs = {k: leaf(outputs[k]) for k in PREDICTIONS} | {"aux_outputs": aux}

    def backbone() -> None:  # the student batch and the teacher's clean views
        for images in data[:2]:
            if len(images):
                model.backbone(normalize_and_pad(images.to(device)))

    def deform_attn() -> None:  # student: forward + backward; teacher: forward
        total = 0.0
        for attn, (query, ref, value, shapes) in attn_inputs:
            if next(attn.parameters()).requires_grad:
                total = total + attn(leaf(query), ref, leaf(value), shapes).sum()
            else:
                with torch.no_grad():
                    attn(query, ref, value, shapes)
        total.backward()

    def loss() -> None:  # SetCriterion incl. the Hungarian matcher, forward + backward
        with model.autocast():
            sum(model.criterion(outputs, targets).values()).backward()

    t_step = common.time_step(step, device, 1, n)
    return {
        f"share_{name}": round(common.time_step(part, device, 1, n) / t_step, 3)
        for name, part in (("backbone", backbone), ("msdeformattn", deform_attn), ("loss", loss))
    } | {"shares_how": SHARES_HOW}


def run_bench(args: argparse.Namespace, dist: common.Dist) -> None:
    """Training step (student + teacher in the joint record) on a GPU at the paper setting
    (ConvNeXt-L, batch 8, 768 crops, 2 generated), on a CPU the test encoder, batch 2, 128 crops:
    time, images/s, FLOPs, MFU (GPU), memory, component shares. Then SAM refinement's CPU work."""
    device, ns = dist.device, argparse.Namespace(**vars(args))
    gpu = device.type == "cuda"
    ns.backbone = (args.backbone if args.backbone != "test" else CONVNEXT_L) if gpu else "test"
    batch, crop, steps = (GLOBAL_BATCH, CROP, 10) if gpu else (2, 128, 3)
    ns.pretrained, ns.init, ns.phase, ns.sam, ns.eval_only = "none", None, "joint", "fake", False
    joint, scaler, _ = build_model(ns, dist)
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)  # a no-op without fp16
    options = common.optimizer_options(args, dist, "adamw")
    optimizer = torch.optim.AdamW(param_groups(joint.head), lr=args.lr, **options)
    for name, num_generated, sam in (("warmup", 0, "none"), ("joint", max(1, batch // 4), "fake")):
        model = joint if num_generated else dataclasses.replace(joint, teacher=None)
        step_args = argparse.Namespace(**{**vars(ns), "sam": sam})
        data = synthetic_batch(batch, crop, num_generated)

        def step(model: CLOUDS = model, data: tuple = data, step_args=step_args) -> None:
            optimizer.zero_grad(set_to_none=True)
            gens = [torch.Generator(device).manual_seed(k) for k in range(batch)]
            loss, _ = train_step(model, data, gens, step_args)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.head.parameters(), GRAD_CLIP)
            scaler.step(optimizer)
            scaler.update()

        shares = step_shares(model, step, data, device, steps)
        extra = dict(backbone=ns.backbone, batch=batch, crop=crop, generated=num_generated,
                     queries=ns.num_queries, num_points=ns.num_points,
                     fast=common.fast_path(args, dist), **shares)  # fmt: skip
        common.benchmark(f"clouds/{name}_step", step, device=device, warmup=2, steps=steps,
                         images_per_step=batch, precision=common.bench_precision(args, device),
                         peak=args.peak_tflops, extra=extra)  # fmt: skip
    # SAM refinement of a 768x768 pseudo-label of 6x6 blocks: (a) its own CPU work (components,
    # points, best-of-3, overlaps, unions), SAM's answer precomputed; (b) with the fake predictor
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 6, (1, 1, 6, 6), generator=g).float()
    label = F.interpolate(blocks, size=(768, 768), mode="nearest")[0, 0].long()
    image = np.zeros((768, 768, 3), np.uint8)
    fake = fake_sam_predictor(label)
    answers = {}

    def precomputed(img: np.ndarray, points: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if len(points) not in answers:
            answers[len(points)] = fake(img, points)
        return answers[len(points)]

    refine_pseudo_label_with_sam(label, image, precomputed, np.random.default_rng(0))
    (num_components,) = answers
    for name, predictor in (("precomputed_sam", precomputed), ("fake_predictor", fake)):
        rng = np.random.default_rng(0)
        refine = functools.partial(refine_pseudo_label_with_sam, label, image, predictor, rng)
        common.benchmark(f"clouds/sam_refine_{name}", refine, device=torch.device("cpu"), warmup=1,
                         steps=5, images_per_step=1, flops=False,
                         extra={"size": 768, "components": num_components})  # fmt: skip


if __name__ == "__main__":
    common.run_cli(main)
