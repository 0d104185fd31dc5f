"""FAMix: A Simple Recipe for Language-guided Domain Generalized Segmentation.

Paper: Mohammad Fahes, Tuan-Hung Vu, Andrei Bursuc, Patrick Pérez, Raoul de Charette,
CVPR 2024, arXiv 2311.17922. Official code: github.com/astra-vision/FAMix, followed at commit
65f7aa0 (main.py, patch_PIN.py, utils/PPIN.py, utils/freeze.py, utils/stats.py,
network/utils.py, network/_deeplab.py, network/backbone/resnet_clip.py).

The recipe, in three words (Freeze, Augment, Mix):
  * Freeze: a CLIP ResNet image encoder (OpenAI weights) under a DeepLabv3+ decoder; only the last
    bottleneck of layer4 and the decoder are trained (GTA5 / SYNTHIA source).
  * Augment: offline "local style mining". The source images are cut into a 3x3 grid of patches;
    for one patch per dominant class and batch, per-channel statistics (mu, sigma) of the layer1
    features are optimised (PIN) so that the CLIP embedding of the restyled patch moves toward
    a random-style text prompt such as "Retro Futurism style building". The results fill one
    style bank per class.
  * Mix: during training every layer1 patch gets the statistics of a style drawn from its dominant
    class's bank, mixed with its own by s ~ Beta(0.1, 0.1) per image and channel.

Launch (data layout: see README and common.py; --data holds gta5/ synthia/ cityscapes/ ...):
  1 GPU    python famix.py --source gta --data ./data --out out/famix-gta
           (mines the style bank into out/famix-gta/style_bank.pt first if it is missing)
  8 GPUs   torchrun --nproc_per_node 8 famix.py --source gta --data ./data --out out/famix-gta
           (--batch-size is global: 8 as in the paper, one image per GPU, SyncBN)
  mining   python famix.py --source gta --data ./data --out out/famix-gta --mine only
  CPU toy  python famix.py --source toy --pretrained none --out out/famix-demo
           (tiny random-init "test" size, toy data written by common.py: mine, train, evaluate)
  bench    python famix.py --bench [--bench-paper] [--amp]
  --pretrained: "openai" (open_clip downloads it), a local OpenAI RN50.pt / RN101.pt or CLIP state
  dict, an official FAMix .pth or a famix.py checkpoint (evaluation), or none (random init).

Evaluating the released checkpoints (official README, single run, GTA5 -> targets):
  python famix.py --eval-only --pretrained <RN50 .pth> --data ./data \
      --targets cityscapes,mapillary,acdc-night,acdc-snow,acdc-rain,acdc-fog
  should print about (C, M, ACDC night/snow/rain/fog):
    RN50   scale 1      48.51  52.39  15.02  37.38  39.56  40.99
    RN50   --scale 0.5  48.02  54.00  21.58  38.27  39.53  44.94
    RN50   --scale 0.5 --ensemble   50.80  56.04  20.05  40.40  42.10  44.93
    RN101  scale 1      49.13  53.41  21.28  41.49  42.19  44.30   (add --backbone RN101-quickgelu)
    RN101  --scale 0.5  50.06  55.31  23.97  40.34  42.41  44.98
    RN101  --scale 0.5 --ensemble   51.46  56.95  24.53  43.33  44.77  47.39
  Mapillary may differ slightly: its few portrait images are padded with ignore here, with road
  in the official code (deviation 4). Paper numbers (mean of 3 runs, RN50, scale 1) [P poster]:
  C 48.15, B 45.61, M 52.11, S 34.23, ACDC night/snow/rain/fog 14.96 / 37.09 / 38.66 / 40.25.

Paper component -> code (the paper body could not be checked, so components are named as on
the poster and in the official code; [P poster] tags cite the poster):
  CLIP ResNet encoder, OS16 surgery .......... CLIPResNet, Bottleneck, AttentionPool2d
  DeepLabv3+ decoder ......................... ASPP, DeepLabV3PlusHead, FAMixSegmenter
  Freeze (L4' scheme) ........................ freeze, trainable_modules, set_train_mode
  Augment: local style mining, PIN ........... patchify, dominant_classes, first_patch_per_class,
                                               style_prompt, encode_prompts, pin_optimize,
                                               mine_styles, run_mining
  class-wise style banks ..................... StyleBank, save_style_bank, load_style_bank
  Mix: patch-wise style mixing ............... calc_mean_std, mix_statistics, target_statistics,
                                               stylize
  loss, optimiser, poly schedule ............. segmentation_loss, build_optimizer, set_lr
  evaluation (whole image, --scale/--ensemble) make_predictor, evaluate
  official checkpoints ....................... OFFICIAL_KEY_MAP, map_official_state,
                                               load_weights_file
  ablations [P poster] ....................... --style none|pure|mixstyle|noise, --freeze

Deviations and choices (marked `DEVIATION:` where they happen):
  1. Text targets are computed in fp32 (official: fp16 CLIP on GPU) and cached per prompt;
     `--templates N` keeps the first N of the 80 templates (default 80; 2 in the toy run).
  2. Bug fixes: official RN101 mining crashes (text buffer hard-coded to 1024 dims): the size
     comes from the model here. The official patch size is hard-coded for 768 crops (64 / 256):
     here it is crop / (4 x grid) and crop / grid, and the crop must be divisible by 4 x grid.
  3. Classes with an empty bank draw from the void bank (official); if the void bank is empty
     too (possible on tiny data) from the whole bank (the official code would crash).
  4. Bug fixes: SYNTHIA random-size crops pad labels with 255, not 0 (= road) as the official
     RandomSizeAndCrop; Mapillary evaluation pads labels with 255 (common.py). SYNTHIA is mined
     with its training augmentation (the official plain 768 crop crashes on 760-px images).
  5. Bug fix: after each evaluation the trainable parts return to train mode for every source
     (official: only for GTA5; for SYNTHIA layer4[2]'s BN stayed in eval mode until the next
     epoch).
  6. The optimiser holds only the trainable parameters (official: all backbone parameters, the
     frozen ones never get a gradient): same updates.
  7. Mining under DDP splits the batches over the processes (whole batches of --mine-batch-size
     each) and gathers the banks; the official script runs on one GPU.
  8. Ablations: the MixStyle-like partner (the same patch position in another image of the
     batch) and the Gaussian-noise statistics (SNR in dB relative to the patch's own mean square
     statistics) are this file's definitions; the official repository has no code for them.
  9. Mixing convention: the code's s weights the source, the poster's alpha the style
     (s = 1 - alpha; same distribution since Beta(0.1, 0.1) is symmetric).
  10. The dominant class is counted with one bincount instead of torch.mode (same result, ties
      to the smallest id, void = 255 last). Evaluation and loader seeding do not consume the
      training random stream (exact --resume).
  11. Style bank file: <out>/style_bank.pt, flat float32 tensors mu (N, C), sigma (N, C), cls (N,)
      plus metadata (official: a pickle of per-class lists of (C, 1, 1) tensors). Checkpoints
      hold the whole model (frozen encoder included), so --eval-only needs no CLIP weights.
  12. "test" backbone size (tiny random-init CLIP ResNet, width 16, layers 1/1/1/3, ASPP 64) for
      CPU tests and the toy run, where the toy defaults also lower the PIN lr to 0.05: random
      layer1 features are about 100x smaller than CLIP's and lr 1 would throw them out of range.
  Periodic evaluation uses the source validation split only (official); the targets are
  evaluated once, at the end, on the last iteration's weights (no selection on targets).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F

import common

# Fixed architecture values [C network/backbone/resnet_clip.py, network/_deeplab.py].
# CLIP ModifiedResNet sizes: blocks per layer, width (layer1..4 give 4, 8, 16, 32 x width
# channels: 256 ... 2048 for the paper sizes), CLIP embedding size, attnpool heads, and the
# DeepLabv3+ widths (ASPP 256, low-level projection 48). DEVIATION: "test" is a tiny random-init
# size for CPU tests and the toy run (no such CLIP weights exist).
BACKBONES = {
    "RN50-quickgelu": {"layers": (3, 4, 6, 3), "width": 64, "embed_dim": 1024, "heads": 32,
                       "aspp": 256, "low_proj": 48},
    "RN101-quickgelu": {"layers": (3, 4, 23, 3), "width": 64, "embed_dim": 512, "heads": 32,
                        "aspp": 256, "low_proj": 48},
    "test": {"layers": (1, 1, 1, 3), "width": 16, "embed_dim": 64, "heads": 8, "aspp": 64,
             "low_proj": 16},
}  # fmt: skip
TEST_TEXT_CFG = {"width": 64, "heads": 2, "layers": 2}  # text tower of the "test" size
CLIP_INPUT_SIZE = 224  # attnpool positional embedding is 7x7 + 1 (224 / 32)
ASPP_RATES = (6, 12, 18)  # output stride 16 [C network/modeling.py]
ASPP_DROPOUT = 0.1
LAYER1_STRIDE = 4  # stem (2) + avgpool (2)
OS32_LAYER1_TO_LAYER4 = 8  # layer2..layer4 strides at output stride 32
PAPER_TARGETS = "cityscapes,bdd,mapillary,synthia,acdc-night,acdc-snow,acdc-rain,acdc-fog"
VOID = common.IGNORE_INDEX  # dominant "class" of a patch that is mostly unlabelled

# [C main.py] which part of the encoder is trained, per source: number of frozen layer4 blocks
# (stem and layer1..3 are always frozen; None = nothing frozen, full fine-tuning).
FREEZE_SCHEMES = {"layer4.2": 2, "layer4": 0, "head": 3, "none": None}
FREEZE_BY_SOURCE = {
    "gta": "layer4.2",
    "synthia": "layer4.2",
    "cityscapes": "layer4",
    "toy": "layer4.2",
}

# [C patch_PIN.py] the 20 random styles R; the prompt of a patch is "<style> <class name>".
STYLE_PROMPTS = (
    "Ethereal Mist style", "Cyberpunk Cityscape style", "Rustic Charm style",
    "Galactic Fantasy style", "Pastel Dreams style", "Dystopian Noir style",
    "Whimsical Wonderland style", "Urban Grit style", "Enchanted Forest style",
    "Retro Futurism style", "Monochrome Elegance style", "Vibrant Graffiti style",
    "Haunting Shadows style", "Steampunk Adventures style", "Watercolor Serenity style",
    "Industrial Chic style", "Cosmic Voyage style", "Pop Art Popularity style",
    "Abstract Symphony style", "Magical Realism style",
)  # fmt: skip
VOID_PROMPT = "photo"  # [C patch_PIN.py] prompt of void-dominant patches

# [C patch_PIN.py] the 80 ImageNet prompt templates of OpenAI CLIP, in the official order.
TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
    "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.",
    "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.",
    "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.",
    "a photo of the small {}.", "a photo of the weird {}.", "the cartoon {}.", "art of the {}.",
    "a drawing of the {}.", "a photo of the large {}.", "a black and white photo of a {}.",
    "the plushie {}.", "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.",
    "a toy {}.", "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.",
    "a tattoo of the {}.",
)  # fmt: skip

# Toy-sized values for `--source toy` (CPU, a few minutes); the paper values are the defaults.
TOY_DEFAULTS = {
    "backbone": "test", "targets": ",".join(common.TOY_TARGETS), "crop": 96, "batch_size": 8,
    "iters": 240, "eval_every": 120, "workers": 0, "mine_batch_size": 8, "mine_batches": 3,
    "pin_iters": 10, "templates": 2,
    # Random-init layer1 features are ~100x smaller than CLIP's: PIN's lr 1 would throw the
    # statistics far outside their range (even negative sigma), so the toy run steps gently.
    "pin_lr": 0.05,
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    # fmt: off
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_shared_flags(
        parser, source="gta", targets=PAPER_TARGETS, iters=40000, batch_size=8, crop=768,
        amp=False, pretrained="openai", eval_every=750, workers=4,
        cite={"iters": "paper: 40000 [C main.py]", "batch_size": "paper: 8 [C main.py]",
              "crop": "paper: 768 [C main.py]", "amp": "official: fp32 [C main.py]",
              "eval_every": "official: 750, source val only [C main.py]",
              "targets": "paper: the 8 targets of the main table [P poster]",
              "pretrained": "official: OpenAI CLIP [C network/modeling.py]"},
    )  # fmt: skip
    m = parser.add_argument_group("FAMix")
    a = m.add_argument
    a("--backbone", default="RN50-quickgelu", choices=list(BACKBONES),
      help="CLIP ResNet (paper: RN50 and RN101 [C main.py --BB]); test = tiny random-init size "
           "for CPU tests and the toy run")
    a("--freeze", default="auto", choices=["auto", *FREEZE_SCHEMES],
      help="trained encoder part: auto = layer4.2 for GTA5/SYNTHIA, layer4 for Cityscapes "
           "[C utils/freeze.py]; head = encoder fully frozen; none = full fine-tuning (ablation)")
    a("--style", default="famix", choices=["famix", "none", "pure", "mixstyle", "noise"],
      help="layer1 augmentation: famix = mined styles mixed with Beta weights; none = no "
           "augmentation (Freeze only); pure = mined style without mixing (s = 0); mixstyle = mix "
           "with another image's statistics; noise = mix with Gaussian-noise statistics "
           "(ablations [P poster])")
    a("--beta", type=float, default=0.1,
      help="mixing weight s ~ Beta(a, a) (paper: 0.1 [C network/utils.py])")
    a("--noise-snr", type=float, default=15.0,
      help="--style noise: SNR in dB of the noisy statistics (poster curve: 5..25 dB)")
    a("--grid", type=int, default=3,
      help="patches per side for mining and mixing (paper: 3 [C patch_PIN.py])")
    a("--lr", type=float, default=0.1, help="decoder learning rate (paper: 0.1 [C main.py])")
    a("--backbone-lr", type=float, default=0.01,
      help="encoder learning rate (paper: 0.01 = 0.1 x lr [C main.py])")
    a("--momentum", type=float, default=0.9, help="SGD momentum (paper: 0.9 [C main.py])")
    a("--weight-decay", type=float, default=1e-4, help="SGD weight decay (paper: 1e-4 [C main.py])")
    a("--poly-power", type=float, default=0.9,
      help="poly schedule power (paper: 0.9 [C utils/scheduler.py])")
    a("--min-lr", type=float, default=1e-6,
      help="poly schedule floor (official: 1e-6 [C utils/scheduler.py])")
    a("--label-smoothing", type=float, default=0.1,
      help="cross-entropy label smoothing (official: 0.1 [C main.py])")
    a("--style-bank", default=None, help="style bank file (default: <out>/style_bank.pt)")
    a("--mine", default="auto", choices=["auto", "only", "never"],
      help="auto: mine the style bank if the file is missing, then train; only: mine (or keep "
           "the existing bank) and exit; never: the bank must exist")
    a("--mine-batch-size", type=int, default=16,
      help="mining batch, per process (official: 16 [C patch_PIN.py])")
    a("--mine-batches", type=int, default=0,
      help="mining batches per process; 0 = one pass over the source "
           "(official: one pass [C patch_PIN.py])")
    a("--pin-iters", type=int, default=100,
      help="PIN optimisation steps per batch (official: 100 [C patch_PIN.py])")
    a("--pin-lr", type=float, default=1.0,
      help="PIN SGD learning rate (official: 1.0 [C patch_PIN.py])")
    a("--pin-momentum", type=float, default=0.9,
      help="PIN SGD momentum (official: 0.9 [C patch_PIN.py])")
    a("--pin-weight-decay", type=float, default=1e-4,
      help="PIN SGD weight decay (official: 1e-4 [C patch_PIN.py])")
    a("--templates", type=int, default=80,
      help="use the first N prompt templates (official: all 80 [C patch_PIN.py])")
    a("--scale", type=float, default=1.0,
      help="test-time input scale (official post-publication option; paper: 1 [C main.py])")
    a("--ensemble", action="store_true",
      help="average the logits at scale 1 and --scale [C main.py]")
    a("--bench-paper", action="store_true",
      help="--bench on CPU: also time the paper setting (slow)")
    # fmt: on
    return parser


# =============================================================================================
# 1. Image encoder: CLIP ModifiedResNet at output stride 16 [C network/backbone/resnet_clip.py]
# =============================================================================================


class Bottleneck(nn.Module):
    """CLIP bottleneck: 1x1 -> 3x3 -> [avgpool(stride)] -> 1x1 (x4), anti-aliased downsampling
    (avgpool before a stride-1 1x1 conv on the shortcut). Parameter names match OpenAI/open_clip."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride) if stride > 1 else nn.Identity()),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.avgpool(F.relu(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling: the mean token attends to all positions (+ learned positions)."""

    def __init__(self, grid: int, width: int, heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) / width**0.5)
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, output_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).permute(2, 0, 1)  # (HW, B, C)
        x = torch.cat([x.mean(0, keepdim=True), x])  # (HW + 1, B, C)
        x = x + self.positional_embedding[:, None].to(x.dtype)
        out, _ = F.multi_head_attention_forward(
            query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight, in_proj_weight=None,
            in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=self.c_proj.weight, out_proj_bias=self.c_proj.bias,
            use_separate_proj_weight=True, training=self.training, need_weights=False,
        )  # fmt: skip
        return out[0]  # (B, output_dim)


class CLIPResNet(nn.Module):
    """CLIP ModifiedResNet (3-conv stem + avgpool, anti-aliased bottlenecks).

    output_stride 16 is the segmentation encoder [C network/modeling.py, OS 16]: layer4 keeps
    resolution and, reproducing the official `_make_layer`, only its LAST block is dilated, so the
    layer4 conv2 dilations are [1, 1, 2] (torchvision would give [1, 2, 2]); attnpool is dropped.
    output_stride 32 with attnpool is the original CLIP image tower, used for style mining. Both
    variants have the same parameters: one state dict serves both.
    """

    def __init__(self, backbone: str, output_stride: int = 16, attnpool: bool = False):
        super().__init__()
        cfg = BACKBONES[backbone]
        w = cfg["width"]
        self.conv1 = nn.Conv2d(3, w // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w // 2)
        self.conv2 = nn.Conv2d(w // 2, w // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w // 2)
        self.conv3 = nn.Conv2d(w // 2, w, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(w)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = w
        self.layer1 = self._make_layer(w, cfg["layers"][0], 1, dilate=False)
        self.layer2 = self._make_layer(w * 2, cfg["layers"][1], 2, dilate=False)
        self.layer3 = self._make_layer(w * 4, cfg["layers"][2], 2, dilate=False)
        self.layer4 = self._make_layer(w * 8, cfg["layers"][3], 2, dilate=output_stride == 16)
        self.embed_dim = cfg["embed_dim"]
        self.low_channels, self.high_channels = w * 4, w * 32  # layer1, layer4 outputs
        self.attnpool = None
        if attnpool:
            self.attnpool = AttentionPool2d(
                CLIP_INPUT_SIZE // 32, w * 32, cfg["heads"], cfg["embed_dim"]
            )

    def _make_layer(self, planes: int, blocks: int, stride: int, dilate: bool) -> nn.Sequential:
        # [C network/backbone/resnet_clip.py::_make_layer] a dilated layer: stride 1 everywhere,
        # first block dilation 1, middle blocks the previous dilation (1), last block `stride`.
        dilations = [1] * blocks
        if dilate:
            dilations[-1], stride = stride, 1
        layers = [Bottleneck(self._inplanes, planes, stride, dilations[0])]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes, 1, d) for d in dilations[1:]]
        return nn.Sequential(*layers)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.avgpool(x)  # (B, 64, H/4, W/4)

    def embed_low_level(self, f1: torch.Tensor) -> torch.Tensor:
        """layer1 features -> CLIP image embedding (needs attnpool): the mining path."""
        return self.attnpool(self.layer4(self.layer3(self.layer2(f1))))


# =============================================================================================
# 2. Decoder: DeepLabv3+ [C network/_deeplab.py, from VainF/DeepLabV3Plus-Pytorch]
# =============================================================================================


def conv_bn_relu(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """1x1 branch, three 3x3 atrous branches (rates 6/12/18), image pooling branch; concat
    (5 x 256) -> 1x1 -> 256, dropout 0.1."""

    def __init__(self, cin: int, cout: int, rates: tuple = ASPP_RATES):
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(cin, cout, 1)] + [conv_bn_relu(cin, cout, 3, r) for r in rates]
        )
        self.pool_branch = conv_bn_relu(cin, cout, 1)
        self.project = conv_bn_relu(cout * (len(rates) + 2), cout, 1)
        self.dropout = nn.Dropout(ASPP_DROPOUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        pooled = self.pool_branch(F.adaptive_avg_pool2d(x, 1))  # (B, 256, 1, 1)
        outs.append(F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False))
        return self.dropout(self.project(torch.cat(outs, 1)))


class DeepLabV3PlusHead(nn.Module):
    """ASPP on layer4, upsampled to layer1's size, concatenated with a 48-channel projection of the
    layer1 features, 3x3 conv, 1x1 classifier."""

    def __init__(
        self,
        low_channels: int,
        high_channels: int,
        aspp: int,
        low_proj: int,
        num_classes: int = common.NUM_CLASSES,
    ):
        super().__init__()
        self.low_level_proj = conv_bn_relu(low_channels, low_proj, 1)
        self.aspp = ASPP(high_channels, aspp)
        self.fuse = conv_bn_relu(low_proj + aspp, aspp, 3)
        self.classifier = nn.Conv2d(aspp, num_classes, 1)
        # [C network/_deeplab.py::_init_weight] kaiming-normal convs, BN (1, 0); the classifier
        # bias keeps PyTorch's default init.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        low = self.low_level_proj(low)  # (B, 48, H/4, W/4)
        high = F.interpolate(
            self.aspp(high), size=low.shape[-2:], mode="bilinear", align_corners=False
        )
        return self.classifier(self.fuse(torch.cat([low, high], 1)))  # (B, 19, H/4, W/4)


class FAMixSegmenter(nn.Module):
    """CLIP ResNet (OS16, no attnpool) + DeepLabv3+. `stylize`, if given, replaces the layer1
    features (the input of layer2 AND of the decoder's low-level skip) [C network/utils.py].

    The frozen part (everything before the first trainable layer4 block) runs under no_grad:
    no activations are stored for it, which is most of the network."""

    def __init__(self, backbone: str = "RN50-quickgelu", num_classes: int = common.NUM_CLASSES):
        super().__init__()
        cfg = BACKBONES[backbone]
        self.encoder = CLIPResNet(backbone, output_stride=16, attnpool=False)
        self.head = DeepLabV3PlusHead(self.encoder.low_channels, self.encoder.high_channels,
                                      cfg["aspp"], cfg["low_proj"], num_classes)  # fmt: skip
        self.frozen_layer4_blocks: int | None = None  # set by freeze(); None = nothing frozen

    def forward(self, x: torch.Tensor, stylize: Callable | None = None) -> torch.Tensor:
        k = self.frozen_layer4_blocks
        frozen = torch.no_grad() if k is not None else nullcontext()
        with frozen:
            low = self.encoder.layer1(self.encoder.stem(x))  # (B, 256, H/4, W/4)
            if stylize is not None:
                low = stylize(low)
            high = self.encoder.layer3(self.encoder.layer2(low))  # (B, 1024, H/16, W/16)
            for block in self.encoder.layer4[: k or 0]:
                high = block(high)
        for block in self.encoder.layer4[k or 0 :]:
            high = block(high)  # (B, 2048, H/16, W/16)
        logits = self.head(low, high)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


# ---- weights: CLIP (open_clip / OpenAI files), official FAMix checkpoints, our checkpoints ----

# [C network/_deeplab.py] official state-dict names -> ours (first matching prefix wins).
OFFICIAL_KEY_MAP = (
    ("backbone.", "encoder."),
    ("classifier.project.", "head.low_level_proj."),
    ("classifier.aspp.convs.4.1.", "head.aspp.pool_branch.0."),  # pool, conv, BN, ReLU
    ("classifier.aspp.convs.4.2.", "head.aspp.pool_branch.1."),
    ("classifier.aspp.convs.", "head.aspp.branches."),
    ("classifier.aspp.project.", "head.aspp.project."),
    ("classifier.classifier.3.", "head.classifier."),
    ("classifier.classifier.", "head.fuse."),
)


def map_official_state(state: dict) -> dict:
    """Official FAMix `model_state` -> FAMixSegmenter names. attnpool keys (absent from the
    released files, the official model replaces attnpool by Identity) are dropped."""
    out = {}
    for key, value in common.strip_prefixes(state).items():
        if key.startswith("backbone.attnpool."):
            continue
        for old, new in OFFICIAL_KEY_MAP:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def load_state_strict(model: nn.Module, state: dict, source: str) -> None:
    """load_state_dict(strict) with one readable error naming a few mismatching keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise common.CheckpointError(
            f"{source} does not fit the {model.__class__.__name__} being built: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(wrong)} of another shape (e.g. {wrong[:3]}); "
            "check --backbone and the file"
        )
    model.load_state_dict(state, strict=True)


def backbone_of_state(state: dict, prefix: str) -> str | None:
    """Which entry of BACKBONES a state dict holds (layer3 has 6 blocks in RN50, 23 in RN101)."""
    n = len({k.split(".")[2] for k in state if k.startswith(prefix + "layer3.")})
    return next((name for name, c in BACKBONES.items() if c["layers"][2] == n), None)


def check_backbone(state: dict, path: str, backbone: str) -> None:
    found = backbone_of_state(state, "encoder.")
    if found is None:
        raise common.CheckpointError(
            f"{path} holds no CLIP ResNet encoder of a known size ({', '.join(BACKBONES)})"
        )
    if found != backbone:
        raise common.CheckpointError(f"{path} holds a {found} model; add --backbone {found}")


def load_weights_file(path: str) -> object:
    """torch.load(weights_only=True) that also accepts numpy scalars: the official checkpoints
    store best_score as a numpy float64 [C main.py::save_ckpt]."""
    import numpy as np

    scalar = (getattr(np, "_core", None) or np.core).multiarray.scalar
    dtypes = [getattr(np.dtypes, n) for n in ("Float64DType", "Float32DType", "Int64DType")]
    allowed = [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtypes]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def sniff_weights(path: str) -> tuple[str, object]:
    """Classify a --pretrained file: ("clip-jit", None) for an OpenAI TorchScript archive,
    ("official", model_state), ("famix", checkpoint) or ("clip", None) for a CLIP state dict."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.endswith("constants.pkl") for n in z.namelist()):
                return "clip-jit", None
    try:
        obj = load_weights_file(path)
    except Exception as e:
        raise common.CheckpointError(
            f"cannot read --pretrained {path} ({type(e).__name__}): expected a CLIP weight file, "
            "an official FAMix .pth or a famix.py checkpoint"
        ) from None
    if isinstance(obj, dict) and "model_state" in obj:
        return "official", obj["model_state"]
    if isinstance(obj, dict) and "method" in obj:
        if obj["method"] != "famix":
            raise common.CheckpointError(f"{path} is a {obj['method']} checkpoint, not a FAMix one")
        return "famix", obj
    if isinstance(obj, dict) and any(k.startswith("visual.") for k in obj):
        return "clip", None
    raise common.CheckpointError(
        f"--pretrained {path}: not a CLIP weight file (no visual.* keys), not an official FAMix "
        "checkpoint (no model_state) and not a famix.py checkpoint"
    )


def load_clip(backbone: str, pretrained: str, seed: int):
    """The full open_clip CLIP model (image + text towers) in fp32 on the CPU.
    `pretrained`: "none" (random init, seeded; never touches the network), an open_clip tag such
    as "openai" (downloaded by open_clip if not cached), or a local file (OpenAI .pt TorchScript
    archive or a CLIP state dict). RN50-quickgelu, not RN50: OpenAI's text tower uses QuickGELU."""
    import open_clip  # imported here: it takes seconds and only weight loading needs it

    if backbone == "test" and pretrained != "none":
        raise common.UsageError("--backbone test is a tiny random-init size: use --pretrained none")
    try:
        if backbone == "test":
            cfg = BACKBONES["test"]
            with torch.random.fork_rng(devices=[]):  # seeded init, global RNG untouched
                torch.manual_seed(seed)
                return open_clip.CLIP(
                    cfg["embed_dim"], quick_gelu=True, text_cfg=TEST_TEXT_CFG,
                    vision_cfg={"layers": cfg["layers"], "width": cfg["width"],
                                "head_width": cfg["width"] * 32 // cfg["heads"]},
                )  # fmt: skip
        if pretrained == "none":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return open_clip.create_model(backbone, pretrained=None)
        if os.path.isfile(pretrained):
            kind, _ = sniff_weights(pretrained)
            if kind == "clip-jit":
                return open_clip.load_openai_model(pretrained, precision="fp32", device="cpu")
            return open_clip.create_model(backbone, pretrained=pretrained)
        return open_clip.create_model(backbone, pretrained=pretrained)
    except common.UsageError:
        raise
    except Exception as e:
        raise common.UsageError(
            f"could not load CLIP weights {pretrained!r} for {backbone} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160]}); offline machines need --pretrained /path/to/RN50.pt "
            "(or none for random init)"
        ) from None


def visual_state(clip_model, backbone: str) -> dict:
    """The CLIP image tower's state dict (OpenAI/open_clip names = CLIPResNet names)."""
    state = clip_model.visual.state_dict()
    found = backbone_of_state({"v." + k: v for k, v in state.items()}, "v.")
    if found != backbone or "attnpool.c_proj.weight" not in state:
        raise common.UsageError(
            f"the CLIP weights hold a {found or 'non-ResNet'} image tower, not {backbone}; "
            "fix --backbone or --pretrained"
        )
    return state


def encoder_fingerprint(encoder_state: dict) -> float:
    """A number identifying the frozen encoder weights, stored in the style bank: styles mined
    with other weights live in another feature space."""
    return float(
        sum(encoder_state[k].double().sum() for k in ("conv1.weight", "layer1.0.conv1.weight"))
    )


# =============================================================================================
# 3. Freeze [C utils/freeze.py: freeze_1_2_3_p4 (GTA5, SYNTHIA), freeze_1_2_3 (Cityscapes)]
# =============================================================================================


def freeze(model: FAMixSegmenter, scheme: str) -> None:
    """requires_grad=False on the frozen encoder part. Frozen modules also stay in eval mode for
    the whole run (set_train_mode): their BNs use and keep the CLIP running statistics.
    [P poster] freeze curve: training only layer4[2] (L4') is best on every target."""
    k = FREEZE_SCHEMES[scheme]
    model.frozen_layer4_blocks = k
    model.requires_grad_(True)
    if k is not None:
        model.encoder.requires_grad_(False)
        model.encoder.layer4[k:].requires_grad_(True)


def trainable_modules(model: FAMixSegmenter) -> list[nn.Module]:
    k = model.frozen_layer4_blocks
    return [model] if k is None else [*model.encoder.layer4[k:], model.head]


def set_train_mode(model: FAMixSegmenter) -> None:
    """Never model.train() on everything: only the trainable parts leave eval mode."""
    model.eval()
    for module in trainable_modules(model):
        module.train()


# =============================================================================================
# 4. Augment: local style mining with PIN [C patch_PIN.py, utils/PPIN.py, utils/stats.py]
# =============================================================================================


def calc_mean_std(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over the last two (spatial) dims, keepdim.
    [C utils/stats.py::calc_mean_std] std = sqrt(unbiased variance + 1e-5)."""
    flat = x.flatten(-2)  # (..., h*w)
    mu = flat.mean(-1)[..., None, None]
    sigma = (flat.var(-1, unbiased=True) + eps).sqrt()[..., None, None]
    return mu, sigma


def patchify(x: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, grid*grid, C, H/grid, W/grid); patch p = row * grid + col (row-major,
    the order of unfold in the official code)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, grid, h // grid, grid, w // grid)  # (B, C, gy, h, gx, w)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, h // grid, w // grid)


def unpatchify(patches: torch.Tensor, grid: int) -> torch.Tensor:
    """Inverse of patchify: (B, grid*grid, C, h, w) -> (B, C, grid*h, grid*w)."""
    b, _, c, h, w = patches.shape
    x = patches.reshape(b, grid, grid, c, h, w).permute(0, 3, 1, 4, 2, 5)  # (B, C, gy, h, gx, w)
    return x.reshape(b, c, grid * h, grid * w)


def dominant_classes(
    labels: torch.Tensor, grid: int, num_classes: int = common.NUM_CLASSES
) -> torch.Tensor:
    """Most frequent label of each patch, void (255) pixels included; ties go to the smallest id
    (void, 255, is the largest): exactly torch.mode [C patch_PIN.py]. (B, H, W) -> (B, grid*grid).
    DEVIATION: counted with one bincount instead of torch.mode: same result, faster on GPU."""
    patches = patchify(labels[:, None], grid).flatten(2)  # (B, P, h*w)
    b, p, _ = patches.shape
    bins = torch.where((patches >= 0) & (patches < num_classes), patches, num_classes)  # void last
    offset = torch.arange(b * p, device=labels.device).view(b, p, 1) * (num_classes + 1)
    counts = torch.bincount((bins + offset).flatten(), minlength=b * p * (num_classes + 1))
    dom = counts.view(b, p, num_classes + 1).argmax(-1)  # first maximum = smallest id
    return torch.where(dom == num_classes, VOID, dom)


def first_patch_per_class(dom: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[C patch_PIN.py] one patch per distinct dominant class in the batch: the first one in the
    official patch-major order (flat index p * B + b). Returns (image idx, patch idx, class)."""
    b = dom.shape[0]
    order = dom.t().reshape(-1)  # (P*B,) patch-major
    position = torch.arange(order.numel(), device=dom.device)
    first = torch.full((VOID + 1,), order.numel(), device=dom.device, dtype=torch.long)
    first = first.scatter_reduce(0, order, position, reduce="amin")
    classes = torch.unique(order)  # ascending
    flat = first[classes]
    return flat % b, flat // b, classes


def style_prompt(cls: int, rng: random.Random) -> str:
    """[C patch_PIN.py] "<random style> <class name>", or "photo" for void patches."""
    if cls == VOID:
        return VOID_PROMPT
    return f"{rng.choice(STYLE_PROMPTS)} {common.CLASS_NAMES[cls]}"


@torch.no_grad()
def encode_prompts(
    clip_model,
    tokenizer,
    prompts: list[str],
    templates: tuple,
    device: torch.device,
    chunk: int = 512,
) -> torch.Tensor:
    """Text targets: each prompt in every template, the raw embeddings averaged, then
    L2-normalised [C patch_PIN.py]. (N, embed_dim) unit vectors; embed_dim from the model.
    DEVIATION: fp32 (official: fp16 OpenAI CLIP on GPU); embed_dim is not hard-coded (official:
    1024, which crashes RN101 mining)."""
    texts = [t.format(p) for p in prompts for t in templates]
    tokens = tokenizer(texts)  # (N*T, 77)
    emb = torch.cat([clip_model.encode_text(tokens[i : i + chunk].to(device)).float()
                     for i in range(0, len(texts), chunk)])  # fmt: skip
    emb = emb.view(len(prompts), len(templates), -1).mean(1)  # (N, D)
    return F.normalize(emb, dim=-1)


def pin_optimize(
    patches: torch.Tensor,
    targets: torch.Tensor,
    embed: Callable[[torch.Tensor], torch.Tensor],
    iters: int,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Prompt-driven Instance Normalisation [C utils/PPIN.py] on K patches at once.

    [P poster] PIN(f) = sigma * (f - mu(f)) / sigma(f) + mu, followed by ReLU; mu, sigma in R^C
    start at the patch's own statistics (identity at init) and are optimised with a fresh SGD
    (lr 1, momentum 0.9, wd 1e-4, no clamping of sigma) to minimise mean_k 1 - cos(e_k, t_k),
    e_k = CLIP embedding of the restyled patch k, t_k its text target.
    patches (K, C, h, w) -> mu, sigma (K, C) and the loss of every step."""
    patches = patches.float()
    mu_p, sigma_p = calc_mean_std(patches)  # (K, C, 1, 1)
    x_hat = (patches - mu_p) / sigma_p
    mu = mu_p.clone().requires_grad_(True)
    sigma = sigma_p.clone().requires_grad_(True)
    opt = torch.optim.SGD([mu, sigma], lr=lr, momentum=momentum, weight_decay=weight_decay)
    losses = []
    for _ in range(iters):
        e = embed(F.relu(sigma * x_hat + mu))  # (K, D)
        loss = (1 - F.cosine_similarity(e, targets, dim=-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())  # no .item() here: no device sync per step
    losses = torch.stack(losses).tolist() if losses else []
    return mu.detach().flatten(1), sigma.detach().flatten(1), losses


def mine_styles(
    encoder: CLIPResNet,
    text_targets: Callable[[list[str]], torch.Tensor],
    batches,
    n_batches: int,
    grid: int,
    pin_cfg: dict,
    rng: random.Random,
    log: Callable = print,
) -> dict:
    """Local style mining, one pass [C patch_PIN.py]. `encoder`: CLIP image tower at OS32 with
    attnpool (frozen, eval). `batches` yields (normalised images (B,3,H,W), labels (B,H,W)) on the
    device. Returns {"mu": (N, C), "sigma": (N, C), "cls": (N,)} on the CPU."""
    # [C patch_PIN.py --resize_feat] patches are pooled so that layer4 (OS32) gives the 7x7 grid
    # attnpool's positional embedding was trained on: 7 * 8 = 56.
    feat_size = (
        round((encoder.attnpool.positional_embedding.shape[0] - 1) ** 0.5) * OS32_LAYER1_TO_LAYER4
    )

    def embed(styled: torch.Tensor) -> torch.Tensor:
        return encoder.embed_low_level(F.adaptive_avg_pool2d(styled, feat_size))

    mus, sigmas, classes = [], [], []
    for i in range(n_batches):
        images, labels = next(batches)
        with torch.no_grad():
            f1 = encoder.layer1(encoder.stem(images))  # (B, 256, H/4, W/4)
        dom = dominant_classes(labels, grid)  # (B, P)
        b_idx, p_idx, cls = first_patch_per_class(dom)
        patches = patchify(f1, grid)[b_idx, p_idx]  # (K, C, h, w)
        targets = text_targets([style_prompt(c, rng) for c in cls.tolist()])  # (K, D)
        t0 = time.perf_counter()
        mu, sigma, losses = pin_optimize(patches, targets, embed, **pin_cfg)
        mus.append(mu.cpu())
        sigmas.append(sigma.cpu())
        classes.append(cls.cpu())
        log(
            f"mining batch {i + 1}/{n_batches}: {len(cls)} patches, 1 - cos {losses[0]:.4f} -> "
            f"{losses[-1]:.4f} ({time.perf_counter() - t0:.1f} s)"
        )
    return {"mu": torch.cat(mus), "sigma": torch.cat(sigmas), "cls": torch.cat(classes)}


class StyleBank:
    """The class-wise style banks T^(c) [P poster], flat: rows sorted by class, with the start and
    size of each class's block. Index VOID (255) is the void bank; index 256 is the whole bank
    (DEVIATION: last-resort fallback when a class and the void bank are both empty)."""

    ALL = VOID + 1

    def __init__(self, mu: torch.Tensor, sigma: torch.Tensor, cls: torch.Tensor):
        order = torch.argsort(cls, stable=True)
        self.mu, self.sigma, self.cls = mu[order].float(), sigma[order].float(), cls[order].long()
        count = torch.zeros(self.ALL + 1, dtype=torch.long)
        count[: self.ALL] = torch.bincount(self.cls, minlength=self.ALL)
        count[self.ALL] = len(self.cls)
        start = torch.zeros_like(count)
        start[: self.ALL] = torch.cumsum(count[: self.ALL], 0) - count[: self.ALL]
        self.count, self.start = count, start

    def to(self, device: torch.device) -> StyleBank:
        for name in ("mu", "sigma", "cls", "count", "start"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def sample(self, dom: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A uniformly drawn style of each patch's class; empty class -> void bank [C
        network/utils.py]. dom (B, P) -> mu_t, sigma_t (B, P, C)."""
        c = torch.where(self.count[dom] > 0, dom, VOID)
        c = torch.where(self.count[c] > 0, c, self.ALL)
        u = torch.rand(dom.shape, device=dom.device)
        offset = torch.minimum((u * self.count[c]).long(), self.count[c] - 1)
        idx = self.start[c] + offset
        return self.mu[idx], self.sigma[idx]


def save_style_bank(path: Path, bank: dict, meta: dict) -> None:
    """DEVIATION: one torch file of flat tensors + metadata (official: saved_params.pkl, per-class
    lists of (256, 1, 1) tensors)."""
    common.atomic_torch_save({**bank, **meta}, path)


def load_style_bank(path: Path, backbone: str, fingerprint: float | None) -> StyleBank:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        mu, sigma, cls = raw["mu"], raw["sigma"], raw["cls"]
    except Exception as e:
        raise common.UsageError(
            f"cannot read style bank {path} ({type(e).__name__}); delete it to mine again"
        ) from None
    if raw.get("backbone") != backbone:
        raise common.UsageError(
            f"style bank {path} was mined with {raw.get('backbone')}, this run "
            f"uses {backbone}; pass another --style-bank or delete it"
        )
    if fingerprint is not None and not math.isclose(
        raw.get("fingerprint", math.nan), fingerprint, rel_tol=1e-6, abs_tol=1e-6
    ):
        raise common.UsageError(
            f"style bank {path} was mined with other encoder weights "
            f"(--pretrained {raw.get('pretrained')}); delete it to mine again"
        )
    if len(cls) == 0:
        raise common.UsageError(f"style bank {path} is empty; delete it and mine on more data")
    return StyleBank(mu, sigma, cls)


# =============================================================================================
# 5. Mix: patch-wise style mixing of the layer1 features [C network/utils.py]
# =============================================================================================


def mix_statistics(
    x_hat: torch.Tensor,
    mu_s: torch.Tensor,
    sigma_s: torch.Tensor,
    mu_t: torch.Tensor,
    sigma_t: torch.Tensor,
    s: torch.Tensor,
) -> torch.Tensor:
    """[P poster] mu_mix = (1 - a) mu(f) + a mu_t, sigma_mix likewise, a ~ Beta(0.1, 0.1).
    DEVIATION (convention only): the code's s weights the source, s = 1 - a (Beta symmetric).
    Returns sigma_mix * x_hat + mu_mix, before the ReLU."""
    mu_mix = s * mu_s + (1 - s) * mu_t
    sigma_mix = s * sigma_s + (1 - s) * sigma_t
    return sigma_mix * x_hat + mu_mix


def target_statistics(
    mode: str,
    mu_s: torch.Tensor,
    sigma_s: torch.Tensor,
    labels: torch.Tensor,
    bank: StyleBank | None,
    grid: int,
    noise_snr: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistics each patch is mixed with. mu_s, sigma_s (B, P, C, 1, 1).
    DEVIATION: mixstyle and noise are this file's definitions of the poster's ablations.
    famix / pure: a mined style of the patch's dominant class (label patch (r, c) <-> feature
    patch (r, c)); mixstyle: the same patch of another image of the batch; noise: the patch's own
    statistics plus Gaussian noise at `noise_snr` dB (signal power = mean square over channels)."""
    if mode in ("famix", "pure"):
        mu_t, sigma_t = bank.sample(dominant_classes(labels, grid))  # (B, P, C)
        return mu_t[..., None, None], sigma_t[..., None, None]
    if mode == "mixstyle":
        perm = torch.randperm(mu_s.shape[0], device=mu_s.device)
        return mu_s[perm], sigma_s[perm]
    if mode == "noise":

        def noisy(v: torch.Tensor) -> torch.Tensor:
            power = v.pow(2).mean(2, keepdim=True)  # (B, P, 1, 1, 1)
            return v + torch.randn_like(v) * (power / 10 ** (noise_snr / 10)).sqrt()

        return noisy(mu_s), noisy(sigma_s)
    raise ValueError(f"unknown style mode {mode!r}")


def stylize(
    f1: torch.Tensor,
    labels: torch.Tensor,
    bank: StyleBank | None,
    mode: str,
    grid: int,
    beta: float,
    noise_snr: float,
) -> torch.Tensor:
    """Patch-wise style mixing, every image, every iteration (probability 1) [C network/utils.py].
    f1 (B, C, H, W) post-ReLU layer1 features; labels (B, 4H, 4W) of the same crop.
    Statistics and mixing run in fp32 even under autocast."""
    with torch.autocast(f1.device.type, enabled=False):
        patches = patchify(f1.float(), grid)  # (B, P, C, h, w)
        mu_s, sigma_s = calc_mean_std(patches)  # (B, P, C, 1, 1)
        x_hat = (patches - mu_s) / sigma_s
        mu_t, sigma_t = target_statistics(mode, mu_s, sigma_s, labels, bank, grid, noise_snr)
        b, c = f1.shape[:2]
        if mode == "pure":
            s = f1.new_zeros(b, c, 1, 1, dtype=torch.float32)  # (B, C, 1, 1)
        else:
            conc = torch.tensor(beta, device=f1.device)
            s = torch.distributions.Beta(conc, conc).sample((b, c, 1, 1))  # (B, C, 1, 1)
        out = F.relu(mix_statistics(x_hat, mu_s, sigma_s, mu_t, sigma_t, s[:, None]))  # shared by P
        return unpatchify(out, grid).to(f1.dtype)


# =============================================================================================
# 6. Loss, optimiser, schedule [C main.py, utils/scheduler.py]
# =============================================================================================


def segmentation_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float
) -> torch.Tensor:
    """Cross-entropy, ignore 255, label smoothing 0.1 (in the official code; the paper body could
    not be checked for it) [C main.py]."""
    return F.cross_entropy(
        logits.float(), labels, ignore_index=common.IGNORE_INDEX, label_smoothing=label_smoothing
    )


def build_optimizer(model: FAMixSegmenter, args: argparse.Namespace) -> torch.optim.SGD:
    """SGD: encoder (trainable part) lr 0.01, decoder lr 0.1, momentum 0.9, wd 1e-4 [C main.py].
    DEVIATION: only trainable parameters are handed to SGD (same updates)."""
    enc = [p for p in model.encoder.parameters() if p.requires_grad]
    groups = [
        {"params": enc, "lr": args.backbone_lr, "base_lr": args.backbone_lr},
        {"params": list(model.head.parameters()), "lr": args.lr, "base_lr": args.lr},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(
        groups, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )


def set_lr(optimizer: torch.optim.Optimizer, iteration: int, args: argparse.Namespace) -> float:
    """[C utils/scheduler.py::PolyLR] lr_t = max(lr_0 (1 - t/T)^0.9, 1e-6), every iteration."""
    for group in optimizer.param_groups:
        group["lr"] = common.poly_lr(
            group["base_lr"], iteration, args.iters, args.poly_power, args.min_lr
        )
    return optimizer.param_groups[-1]["lr"]


# =============================================================================================
# 7. Evaluation [C main.py::validate]: whole image at native resolution
# =============================================================================================

# Per-target input geometry [C utils/get_dataset.py]: Mapillary is resized to height 1536
# (bicubic, label nearest) and centre-cropped to 1536x1536 (labels padded with 255); the rest
# are fed whole at native size.
EVAL_RESIZE = {
    "mapillary": common.EvalResize(("height_crop", 1536), resize_gt=True, image_interp="bicubic")
}
GTA_VAL_CROP_HW = (1046, 1914)  # [C utils/get_dataset.py] centre crop of GTA5 val


def center_crop(
    image: torch.Tensor, label: torch.Tensor, g: torch.Generator, size_hw=GTA_VAL_CROP_HW
):
    h, w = image.shape[-2:]
    ch, cw = min(size_hw[0], h), min(size_hw[1], w)
    y, x = (h - ch) // 2, (w - cw) // 2
    return image[:, y : y + ch, x : x + cw], label[y : y + ch, x : x + cw]


def fork_rng(device: torch.device):
    """Run a block without touching the global random state (loader seeding, evaluation), so
    that an interrupted and resumed run draws the same numbers as an uninterrupted one.
    DEVIATION: in the official loop evaluation draws from the training random stream."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def make_predictor(
    model: nn.Module, scale: float, ensemble: bool, amp_ctx: Callable
) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (1,3,H,W) -> logits (1,19,H,W). --scale s: bilinear (align_corners=True) down by s,
    predict, bilinear back; --ensemble: mean of the raw logits at 1 and s [C main.py]."""

    def predict(images: torch.Tensor) -> torch.Tensor:
        x = common.normalize(images, common.CLIP_MEAN, common.CLIP_STD)
        size = x.shape[-2:]
        with amp_ctx():
            logits = None if scale != 1 and not ensemble else model(x).float()
            if scale != 1:
                xs = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=True)
                ls = F.interpolate(
                    model(xs).float(), size=size, mode="bilinear", align_corners=True
                )
                logits = ls if logits is None else (logits + ls) / 2
        return logits

    return predict


def eval_dataset(name: str, args: argparse.Namespace):
    """A target (or the source's validation split, name "source-val")."""
    if name == "source-val":
        if args.source == "gta":
            return common.build_dataset(
                "gta", args.data, "val", gta_list="famix", transform=center_crop
            )
        if args.source == "toy":
            return common.build_dataset("toy", args.data, "val", transform=center_crop)
        return common.build_dataset(args.source, args.data, "val")
    if name == "gta":  # as a target: FAMix's 1,000 validation images, centre crop
        return common.build_dataset(
            "gta", args.data, "val", gta_list="famix", transform=center_crop
        )
    return common.build_dataset(name, args.data, "val", mapillary_map="hrda")


def evaluate(
    model: FAMixSegmenter,
    datasets: dict,
    args: argparse.Namespace,
    dist: common.Dist,
    amp_ctx: Callable,
) -> dict:
    """mIoU (nanmean over 19 classes, one confusion matrix per dataset) and per-class IoU of each
    dataset in `datasets` (name -> Dataset)."""
    model.eval()
    predict = make_predictor(model, args.scale, args.ensemble, amp_ctx)
    subsets = {"16": common.SYNTHIA16, "13": common.SYNTHIA13} if args.source == "synthia" else None
    results = {}
    with fork_rng(dist.device):  # evaluating must not shift the training random stream
        for name, dataset in datasets.items():
            results[name] = common.evaluate_dataset(
                predict,
                dataset,
                resize=EVAL_RESIZE.get(name, common.EvalResize()),
                dist=dist,
                miou_mode="nanmean",
                align_corners=True,
                workers=args.workers,
                save_preds=args.save_preds,
                save_dir=Path(args.out) / "preds" / name,
                subsets=subsets,
                desc=name,
            )
    set_train_mode(model)  # DEVIATION: for every source (official: GTA5 only)
    return results


# =============================================================================================
# 8. Training
# =============================================================================================


def train_transform(source: str, crop: int, jitter: bool = True) -> common.Transform:
    """[C utils/get_dataset.py] GTA5 / Cityscapes / toy: random crop (no rescale); SYNTHIA:
    random scale 0.5-2 (bicubic), random crop 720, resize to 768. Then ColorJitter(0.8, 0.8, 0.8,
    hue 0) and horizontal flip (with `jitter`; mining uses the geometry only, except for SYNTHIA
    which the official code mines with --data_aug)."""

    def transform(image, label, g):
        if source == "synthia":
            pre = round(crop * 720 / 768)
            image, label = common.random_scale(image, label, (0.5, 2.0), g, image_interp="bicubic")
            # DEVIATION: pads labels with 255 (official RandomSizeAndCrop: 0 = road)
            image, label = common.random_crop(image, label, pre, g)
            image, label = common.resize_pair(image, label, (crop, crop))
        else:
            image, label = common.random_crop(image, label, crop, g)
        if jitter or source == "synthia":
            image = common.color_jitter(image, g, brightness=0.8, contrast=0.8, saturation=0.8)
            image, label = common.random_hflip(image, label, g)
        return image, label

    return transform


def source_dataset(args: argparse.Namespace, transform: common.Transform):
    gta_list = "famix"  # [C datasets/gta5_list] 12,382 training images
    return common.build_dataset(
        args.source, args.data, "train", gta_list=gta_list, transform=transform
    )


def run_mining(
    args: argparse.Namespace,
    dist: common.Dist,
    clip_model,
    encoder_state: dict,
    dataset,
    bank_path: Path,
) -> None:
    """Mine the style bank and save it (rank 0). Each process mines whole batches."""
    import open_clip

    encoder = CLIPResNet(args.backbone, output_stride=32, attnpool=True)
    load_state_strict(encoder, encoder_state, "the CLIP image tower")
    encoder.to(dist.device).eval().requires_grad_(False)
    clip_model.to(dist.device).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer("RN50-quickgelu")  # the CLIP BPE, the same for all sizes
    templates = TEMPLATES[: args.templates]
    cache: dict[str, torch.Tensor] = {}

    def text_targets(prompts: list[str]) -> torch.Tensor:
        new = sorted({p for p in prompts if p not in cache})
        if new:
            for p, e in zip(
                new, encode_prompts(clip_model, tokenizer, new, templates, dist.device)
            ):
                cache[p] = e
        return torch.stack([cache[p] for p in prompts])  # (K, D)

    dataset = copy.copy(dataset)
    dataset.transform = train_transform(args.source, args.crop, jitter=False)
    global_batch = args.mine_batch_size * dist.world_size
    n_batches = args.mine_batches or len(dataset) // global_batch  # one pass, drop_last
    if n_batches == 0:
        raise common.UsageError(
            f"the source has {len(dataset)} images, fewer than one mining batch "
            f"of {global_batch}; lower --mine-batch-size"
        )
    loader = common.TrainLoader(dataset, global_batch, dist, args.seed + 1, args.workers)

    def batches():
        while True:
            images, labels, _ = next(loader)
            images = common.normalize(images.to(dist.device), common.CLIP_MEAN, common.CLIP_STD)
            yield images, labels.to(dist.device)

    common.print0(
        f"mining styles: {n_batches} batches of {args.mine_batch_size} per process, "
        f"{args.pin_iters} PIN steps, {len(templates)} templates"
    )
    pin_cfg = {
        "iters": args.pin_iters,
        "lr": args.pin_lr,
        "momentum": args.pin_momentum,
        "weight_decay": args.pin_weight_decay,
    }
    t0 = time.perf_counter()
    bank = mine_styles(
        encoder,
        text_targets,
        batches(),
        n_batches,
        args.grid,
        pin_cfg,
        random.Random(args.seed + dist.rank),
        log=common.print0,
    )
    if dist.enabled:  # DEVIATION: gather the per-process banks
        gathered = [None] * dist.world_size
        torch_dist.all_gather_object(gathered, bank)
        bank = {k: torch.cat([g[k] for g in gathered]) for k in bank}
    meta = {
        "backbone": args.backbone,
        "pretrained": args.pretrained,
        "crop": args.crop,
        "grid": args.grid,
        "fingerprint": encoder_fingerprint(encoder_state),
        "pin_iters": args.pin_iters,
        "templates": len(templates),
        "batches": n_batches * dist.world_size,
    }
    if dist.is_main:
        save_style_bank(bank_path, bank, meta)
    sizes = torch.bincount(bank["cls"], minlength=VOID + 1)
    per_class = {("void" if c == VOID else common.CLASS_NAMES[c]): int(sizes[c])
                 for c in [*range(common.NUM_CLASSES), VOID] if sizes[c]}  # fmt: skip
    common.print0(
        f"style bank: {len(bank['cls'])} styles in {time.perf_counter() - t0:.1f} s -> "
        f"{bank_path}; per class {per_class}"
    )
    clip_model.cpu()


def train(
    model: FAMixSegmenter,
    bank: StyleBank | None,
    dataset,
    eval_sets: dict,
    args: argparse.Namespace,
    dist: common.Dist,
    log: common.RunLog,
    start_ckpt: dict | None,
) -> dict:
    # PLUMBING: device, AMP, DDP, optimiser and resume state
    device = dist.device
    amp_ctx, scaler = common.autocast(device, args.amp)
    model.to(device)
    ddp_model = common.wrap_ddp(common.convert_sync_bn(model, dist), dist)
    model = common.unwrap(ddp_model)
    optimizer = build_optimizer(model, args)
    start = 0
    if start_ckpt is not None:
        start = common.restore_training_state(start_ckpt, optimizer, scaler)
    if bank is not None:
        bank.to(device)
    with fork_rng(device):
        loader = common.TrainLoader(
            dataset, args.batch_size, dist, args.seed, args.workers, start_iter=start
        )
    per_process = args.batch_size // dist.world_size
    common.print0(
        f"source {args.source}: {len(dataset)} training images; batch {args.batch_size} global, "
        f"{per_process} per process; iterations {start} -> {args.iters}"
    )
    set_train_mode(model)
    results = {}
    bar = common.progress(args.iters, start, dist.is_main)
    for it in range(start, args.iters):
        # PLUMBING: batch
        images, labels, _ = next(loader)
        images = common.normalize(
            images.to(device, non_blocking=True), common.CLIP_MEAN, common.CLIP_STD
        )
        labels = labels.to(device, non_blocking=True)
        # METHOD: poly learning rate [C utils/scheduler.py]
        lr = set_lr(optimizer, it, args)
        # METHOD: Mix — restyle the layer1 patches with mined styles [C network/utils.py]
        hook = None
        if args.style != "none":

            def hook(f1, labels=labels):
                return stylize(f1, labels, bank, args.style, args.grid, args.beta, args.noise_snr)

        # METHOD: forward (frozen part without grad) and loss [C main.py]
        with amp_ctx():
            logits = ddp_model(images, stylize=hook)
        loss = segmentation_loss(logits, labels, args.label_smoothing)
        # PLUMBING: backward and step
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise RuntimeError(
                f"loss is {loss_value} at iteration {it}; lower --lr or use --no-amp"
            )
        bar.update(1, loss=f"{loss_value:.3f}", lr=f"{lr:.2e}")
        if (it + 1) % 50 == 0 or it + 1 == args.iters:
            log.log({"type": "train", "iter": it + 1, "loss": loss_value, "lr": lr})
        # PLUMBING: periodic evaluation on the source validation split, checkpoint
        last = it + 1 == args.iters
        if last or (args.eval_every and (it + 1) % args.eval_every == 0):
            names = list(eval_sets) if last else ["source-val"]
            results = evaluate(model, {n: eval_sets[n] for n in names}, args, dist, amp_ctx)
            log.log({"type": "eval", "iter": it + 1, "results": results})
            log.write_results(results)
            common.print0(f"\niteration {it + 1}:\n{common.format_results(results)}")
            if dist.is_main:
                common.save_checkpoint(
                    Path(args.out) / "last.pt", method="famix", iteration=it + 1,
                    model_state=model.state_dict(), optimizer=optimizer, scaler=scaler, args=args,
                    metrics={k: v["miou"] for k, v in results.items()},
                )  # fmt: skip
    bar.close()
    return results


# =============================================================================================
# 9. Benchmark and main
# =============================================================================================


def synthetic_batch(batch: int, crop: int, cell: int, device: torch.device):
    """Random images and blocky labels (cell x cell blocks of one class) for benchmarks."""
    images = torch.randn(batch, 3, crop, crop, device=device)
    n = crop // cell
    labels = torch.randint(0, common.NUM_CLASSES, (batch, n, n), device=device)
    return images, labels.repeat_interleave(cell, 1).repeat_interleave(cell, 2)  # (B, crop, crop)


def bench_train_step(model, optimizer, bank, images, labels, args, amp_ctx) -> Callable:
    def step():
        def hook(f1):
            return stylize(f1, labels, bank, "famix", args.grid, args.beta, args.noise_snr)

        with amp_ctx():
            logits = model(images, stylize=hook)
        loss = segmentation_loss(logits, labels, args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def bench_mine_batch(encoder, images, labels, iters: int, grid: int) -> Callable:
    targets = F.normalize(torch.randn(VOID + 1, encoder.embed_dim, device=images.device), dim=-1)
    pin_cfg = {"iters": iters, "lr": 1.0, "momentum": 0.9, "weight_decay": 1e-4}

    def step():
        mine_styles(encoder, lambda prompts: targets[: len(prompts)], iter([(images, labels)]), 1,
                    grid, pin_cfg, random.Random(0), log=lambda s: None)  # fmt: skip

    return step


# (name, batch, crop) of the timed training steps and (name, batch, crop, PIN steps) of the timed
# mining batches; "paper" runs on GPU, or on CPU with --bench-paper.
BENCH_TRAIN = (("small", 2, 192), ("paper", 8, 768))
BENCH_MINE = (("small", 4, 192, 10), ("paper", 16, 768, 100))


def run_bench(args: argparse.Namespace, dist: common.Dist) -> None:
    """Training step (GTA5 scheme, FAMix mixing) and one mining batch on synthetic data, random
    weights. CPU: a small setting (and the paper setting with --bench-paper); GPU: paper setting."""
    device = dist.device
    amp_ctx, _ = common.autocast(device, args.amp)
    paper = device.type == "cuda" or args.bench_paper
    torch.manual_seed(0)
    model = FAMixSegmenter(args.backbone)
    freeze(model, "layer4.2")
    model.to(device)
    set_train_mode(model)
    optimizer = build_optimizer(model, args)
    n, c = 2000, model.encoder.low_channels
    bank = StyleBank(torch.rand(n, c), torch.rand(n, c) + 0.1,
                     torch.randint(0, common.NUM_CLASSES, (n,))).to(device)  # fmt: skip
    for name, batch, crop in [s for s in BENCH_TRAIN if paper or s[0] != "paper"]:
        images, labels = synthetic_batch(batch, crop, 16, device)
        common.benchmark(
            f"famix/train_step/{name}",
            bench_train_step(model, optimizer, bank, images, labels, args, amp_ctx),
            device=device, warmup=1, steps=2 if device.type == "cpu" else 10,
            images_per_step=batch,
            extra={"batch": batch, "crop": crop, "backbone": args.backbone, "amp": args.amp},
        )  # fmt: skip
    # Mining: layer1 of one batch, then PIN on one patch per class through layer2..attnpool.
    encoder = CLIPResNet(args.backbone, output_stride=32, attnpool=True)
    encoder.to(device).eval().requires_grad_(False)
    for name, batch, crop, iters in [s for s in BENCH_MINE if paper or s[0] != "paper"]:
        images, labels = synthetic_batch(batch, crop, crop // args.grid, device)
        k = int(first_patch_per_class(dominant_classes(labels, args.grid))[2].numel())
        common.benchmark(
            f"famix/mine_batch/{name}",
            bench_mine_batch(encoder, images, labels, iters, args.grid),
            device=device, warmup=0, steps=1, images_per_step=batch,
            extra={"batch": batch, "crop": crop, "pin_iters": iters, "patches": k},
        )  # fmt: skip


def check_args(args: argparse.Namespace, dist: common.Dist) -> None:
    # DEVIATION: the patch grid follows the crop (official: 64 / 256-pixel patches hard-coded).
    unit = LAYER1_STRIDE * args.grid
    if args.crop % unit:
        raise common.UsageError(
            f"--crop {args.crop} must be divisible by {unit} (layer1 stride 4 x "
            f"--grid {args.grid}) so the patch grid tiles it; e.g. --crop "
            f"{args.crop // unit * unit}"
        )
    if args.batch_size // dist.world_size < 2 and not (dist.enabled and dist.device.type == "cuda"):
        raise common.UsageError(
            "--batch-size must give at least 2 images per process (the decoder's "
            "BatchNorm needs more than one value per channel)"
        )
    if not 0 < args.scale <= 1:
        raise common.UsageError(f"--scale {args.scale}: use a value in (0, 1], e.g. 0.5")
    if args.ensemble and args.scale == 1:
        raise common.UsageError(
            "--ensemble averages scale 1 with --scale; also pass e.g. --scale 0.5"
        )
    if not 1 <= args.templates <= len(TEMPLATES):
        raise common.UsageError(f"--templates must be in 1..{len(TEMPLATES)}")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    common.apply_toy_defaults(parser, args, argv, **TOY_DEFAULTS)
    dist = common.setup_distributed(args.device)
    check_args(args, dist)
    common.seed_everything(args.seed, dist.rank)
    if args.bench:
        run_bench(args, dist)
        return
    if args.source == "toy":
        common.make_toy_dataset(args.data)
    args.freeze = FREEZE_BY_SOURCE[args.source] if args.freeze == "auto" else args.freeze
    bank_path = Path(args.style_bank or Path(args.out) / "style_bank.pt")
    for key, value in vars(args).items():
        common.print0(f"  {key}: {value}")

    # PLUMBING: every dataset is opened before any heavy work, so a bad --data or --targets fails
    # now and not after 40k iterations.
    targets = [t for t in common.parse_targets(args) if t != args.source]
    with_source_val = not args.eval_only or args.source == "toy"
    names = ["source-val"] * with_source_val + targets
    eval_sets = {name: eval_dataset(name, args) for name in names}
    train_set = None
    if not args.eval_only:
        train_set = source_dataset(args, train_transform(args.source, args.crop))
    sizes = {"source-train": len(train_set or []), **{k: len(v) for k, v in eval_sets.items()}}
    common.print0("datasets: " + ", ".join(f"{k} {n}" for k, n in sizes.items()))

    # PLUMBING: weights. Our checkpoint (--resume), an official/our FAMix checkpoint
    # (--pretrained FILE, evaluation), or CLIP weights (training; also needed for mining).
    model = FAMixSegmenter(args.backbone)
    start_ckpt, clip_model, encoder_state = None, None, None
    if args.resume:
        start_ckpt = common.load_checkpoint(args.resume, "famix")
        check_backbone(start_ckpt["model"], args.resume, args.backbone)
        load_state_strict(model, start_ckpt["model"], args.resume)
    else:
        kind, obj = ("clip", None)
        if os.path.isfile(args.pretrained):
            kind, obj = sniff_weights(args.pretrained)
        if kind in ("official", "famix"):
            state = map_official_state(obj) if kind == "official" else obj["model"]
            check_backbone(state, args.pretrained, args.backbone)
            load_state_strict(model, state, args.pretrained)
            if not args.eval_only and not bank_path.is_file():
                raise common.UsageError(
                    f"{args.pretrained} is a segmentation checkpoint without the "
                    "CLIP text tower needed for mining: use it with --eval-only, "
                    "or give an existing --style-bank"
                )
        elif not (args.eval_only and args.pretrained == "none"):
            clip_model = load_clip(args.backbone, args.pretrained, args.seed)
            encoder_state = visual_state(clip_model, args.backbone)
            load_state_strict(
                model.encoder,
                {k: v for k, v in encoder_state.items() if not k.startswith("attnpool.")},
                "the CLIP image tower",
            )
    freeze(model, args.freeze)
    total, trainable = common.count_parameters(model)
    common.print0(
        f"FAMix {args.backbone}: {total:,} parameters, {trainable:,} trainable "
        f"(freeze {args.freeze}, style {args.style})"
    )
    log = common.RunLog(
        args.out, args, {"params_total": total, "params_trainable": trainable}, enabled=dist.is_main
    )

    if args.eval_only:
        model.to(dist.device)
        amp_ctx, _ = common.autocast(dist.device, args.amp)
        results = evaluate(model, eval_sets, args, dist, amp_ctx)
        log.log({"type": "eval", "iter": None, "results": results})
        log.write_results(results)
        common.print0(common.format_results(results))
        return

    # METHOD: Augment — local style mining, once; reused when the bank file exists.
    bank = None
    if args.style in ("famix", "pure") or args.mine == "only":
        encoder = {k.removeprefix("encoder."): v for k, v in model.state_dict().items()}
        if not bank_path.is_file():
            if args.mine == "never":
                raise common.UsageError(
                    f"style bank {bank_path} is missing; mine it first "
                    "(--mine only) or drop --mine never"
                )
            if clip_model is None:
                raise common.UsageError(
                    f"style bank {bank_path} is missing and mining needs CLIP "
                    "weights: run without --resume first, or pass --style-bank"
                )
            run_mining(args, dist, clip_model, encoder_state, train_set, bank_path)
        if dist.enabled:
            torch_dist.barrier()
        bank = load_style_bank(bank_path, args.backbone, encoder_fingerprint(encoder))
        if args.mine == "only":
            common.print0(f"style bank ready: {bank_path} ({len(bank.cls)} styles)")
            return
    del clip_model

    results = train(model, bank, train_set, eval_sets, args, dist, log, start_ckpt)
    if dist.is_main:
        print(json.dumps({"final": {k: v["miou"] for k, v in results.items()}}))


if __name__ == "__main__":
    common.run_cli(main)
