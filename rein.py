"""Rein: frozen vision foundation models steered by learnable low-rank tokens, for DGSS.

Wei et al., "Stronger, Fewer, & Superior: Harnessing Vision Foundation Models for Domain
Generalized Semantic Segmentation", CVPR 2024 (arXiv 2312.04265). Official code:
https://github.com/w1oves/Rein (mmseg 1.x / mmdet 3.x / mmengine), followed at commit 7da85bc.
This file is plain PyTorch + timm + scipy.

What runs [C configs/dinov2/rein_dinov2_mask2former_512x512_bs1x4.py]: DINOv2 ViT-L with patch
size 16, frozen and in eval mode; after each of its 24 blocks a "Rein" layer refines the patch
tokens with 100 learnable low-rank tokens (A_i B_i, rank 16) through two layer-shared MLPs and a
learnable scale; the tokens of all layers are pooled (max, mean, last) into 100 image-independent
queries of a Mask2Former head. Only Rein (2.53M parameters, 2.99M with the query linking) and the
head are trained.

Paper -> code (the paper's section numbers are [unverified]; the code is the reference):
  Rein layer (token attention, layer-shared MLPs, scale)  -> Reins.forward; T_i = A_i B_i ->
  Reins.get_tokens; tokens linked to queries -> Reins.link_queries, ReinMask2FormerHead; frozen
  VFM, features after blocks [7, 11, 15, 23] -> ReinsBackbone, ReinSegmentor; recipe ->
  param_groups, lr_at, train; sliding window -> slide_segment, evaluate; official weights
  (Appendix B) -> build_model, load_vfm_weights, load_official_rein.

Launch (--pretrained auto = checkpoints/<the file VFM_SIZES names for --backbone>, original patch-14
or Rein-converted, else timm's copy from the Hugging Face hub (cache); or pass a path):
  python rein.py --source gta --data ./data          (1 GPU: GTA5 -> Cityscapes/BDD/Mapillary)
  torchrun --nproc_per_node 4 rein.py --source gta --data ./data   (DDP; global batch stays 4)
  torchrun --nproc_per_node 4 rein.py --recipe citys2acdc --data ./data   (Cityscapes -> ACDC)
  python rein.py --source toy --pretrained none      (CPU toy run, ~2 minutes)
  python rein.py --bench                             (benchmarks, JSON lines)
  python rein.py --eval-only --official-ckpt checkpoints/iter_40000_published.pth --data ./data

Deviations from the official code (`DEVIATION n:` in the code):
  1. timm's VisionTransformer / Eva replace the official DINOv2 / EVA-02 copies: same layers,
     weights loaded through an explicit key map; attention is PyTorch SDPA (official: xFormers
     memory-efficient attention when installed) - the same function, other kernels.
  2. EVA02-L: timm's Eva with the EVA02-L configuration (SwiGLU with sub-LN, RoPE on a 16x16
     reference grid, no layer scale), drop_path 0 (official 0.2, inactive: the frozen backbone
     stays in eval mode). Whether it equals the EVA-02 code Rein uses (xattn, subln) was not
     checked; weights in timm or original EVA-02 naming.
  3. Out indices of ViT-S/B/G ([3,5,8,11], [3,5,8,11], [9,19,29,39]) are [unverified] (their
     configs are only in the GitHub releases); ViT-L and EVA02-L: [7, 11, 15, 23] [C configs].
  4. Resizes (train RandomChoiceResize, eval Resize) are bilinear without antialiasing, labels
     nearest, as cv2 (mmcv imresize); OpenCV's fixed-point rounding may differ by one grey level.
  5. PhotoMetricDistortion in torch with OpenCV's 8-bit HSV formulas (float ties may differ by one
     grey level); draws from the loader's per-sample generator (official: numpy's global RNG).
  6. Sliding window: an image's windows run as one batch (same result in eval mode). A window
     side that is not a multiple of 16 (an image smaller than the crop, which the official
     resizes never produce) is zero-padded after normalisation, its logits cropped (official:
     assertion).
  7. Position embeddings are interpolated the DINOv2 way (+0.1 trick, bicubic) for any grid
     other than the trained 32x32, EVA02 included (official EVA2: fixed 32x32 only).
  8. Checkpoints hold only the trained tensors (like the official `state_dict` override); the
     frozen backbone is rebuilt from --pretrained and checked against a fingerprint on resume.
  9. Evaluation during training restores the RNG state afterwards (official: it advances it).
 10. --seed defaults to 0 like every script here (official randomness.seed 42); out/last.pt is
     written before each evaluation and at the end (official: every 4000 iterations, keep 3).
 11. GTA5 + SYNTHIA joint training (README: 68.1 on Cityscapes) is not offered: one --source.
 12. Mask2Former criterion (the declared copy): each image's random points come from its own
     generator of the step, and the cross-entropy is divided by the global batch's class-weight
     sum (official: the process's RNG and its own sum; identical on one process), so that
     several processes train as one [C criterion.py::SetCriterion].
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from tqdm import tqdm

import common

NUM_CLASSES = 19  # Cityscapes trainIds [C configs: num_classes]
# The Rein layer [C configs/_base_/models/rein_dinov2_mask2former.py, reins.py::Reins.__init__]
PATCH_SIZE = 16  # every Rein config changes the VFM's patch size to 16 [C configs/_base_/models]
REIN_TOKEN_LENGTH = 100  # m tokens per layer [C configs: token_length]
REIN_LORA_DIM = 16  # rank r [C configs: lora_dim]
REIN_SCALE_INIT = 1e-3  # [C reins.py: scale_init]
REIN_QUERY_DIMS = 256  # Mask2Former hidden size [C reins.py: query_dims]
# Optimisation [C configs/dinov2/rein_dinov2_mask2former_512x512_bs1x4.py: optim_wrapper]
WEIGHT_DECAY = 0.05  # [C configs: AdamW weight_decay]
ADAMW_BETAS = (0.9, 0.999)
ADAMW_EPS = 1e-8
POLY_POWER = 0.9  # [C configs: PolyLR power, eta_min 0]
WARMUP_START_FACTOR = 1e-6  # [C 1024 config: LinearLR start_factor]
# [C configs: paramwise_cfg.custom_keys] substrings of the official names with decay_mult 0
# (all lr_mult 1); norm layers also get decay 0 through norm_decay_mult=0.
NO_DECAY_KEYS = ("norm", "query_embed", "level_embed", "learnable_tokens", "reins.scale")
MASK_POINTS = 12544  # [C configs: train_cfg.num_points]
# Training pipeline [C configs/dinov2/rein_dinov2_mask2former_512x512_bs1x4.py: train_pipeline]
SCALE_STEPS = range(5, 21)  # RandomChoiceResize short sides int(crop · x · 0.1), x = 5..20
MAX_LONG_FACTOR = 4  # long side <= 4·crop: max_size 2048 for crop 512, 4096 for crop 1024
CAT_MAX_RATIO = 0.75  # [C configs: RandomCrop cat_max_ratio]
FLIP_PROB = 0.5
PMD_BRIGHTNESS_DELTA = 32  # [C mmseg transforms.py::PhotoMetricDistortion defaults]
PMD_CONTRAST_RANGE = (0.5, 1.5)
PMD_SATURATION_RANGE = (0.5, 1.5)
PMD_HUE_DELTA = 18


# =============================================================================================
# 1. The method
# =============================================================================================
# The Rein layer, then its tokens linked to Mask2Former's queries [C reins.py, rein_mask2former.py]


class Reins(nn.Module):
    """Per-layer tokens T_i (m x C), two layer-shared MLPs, a learnable scale, the linking layers.

    Rein_i(f) = f + s · MLP_delta( Softmax(f T_i^T / sqrt(C))[:, 1:] · MLP_token(T_i[1:]) + f ),
    applied to the patch tokens f of layer i; the class token passes unchanged
    [C reins.py::Reins.forward, forward_delta_feat]. Low rank: T_i = A_i B_i (A_i m x r,
    B_i r x C) [C reins.py::LoRAReins]; full rank (lora_dim=None): T_i stored directly [C Reins].
    """

    def __init__(
        self,
        num_layers: int,
        embed_dims: int,
        patch_size: int = PATCH_SIZE,
        token_length: int = REIN_TOKEN_LENGTH,
        lora_dim: int | None = REIN_LORA_DIM,
        query_dims: int = REIN_QUERY_DIMS,
        scale_init: float = REIN_SCALE_INIT,
    ) -> None:
        super().__init__()
        self.num_layers, self.embed_dims, self.lora_dim = num_layers, embed_dims, lora_dim
        # [C reins.py::create_model] an init bound borrowed from VPT: sqrt(6 / (3·p² + d)),
        # d = C for full rank and sqrt(C·r) for the low-rank factors
        d = embed_dims if lora_dim is None else math.sqrt(embed_dims * lora_dim)
        bound = math.sqrt(6.0 / (3 * patch_size * patch_size + d))
        if lora_dim is None:
            self.learnable_tokens = nn.Parameter(torch.empty(num_layers, token_length, embed_dims))
            nn.init.uniform_(self.learnable_tokens, -bound, bound)
        else:
            self.learnable_tokens_a = nn.Parameter(torch.empty(num_layers, token_length, lora_dim))
            self.learnable_tokens_b = nn.Parameter(torch.empty(num_layers, lora_dim, embed_dims))
            nn.init.uniform_(self.learnable_tokens_a, -bound, bound)
            nn.init.uniform_(self.learnable_tokens_b, -bound, bound)
        self.scale = nn.Parameter(torch.tensor(scale_init))
        # [P Fig. 2] MLPs shared by all layers; kaiming_uniform(a=√5) = PyTorch's Linear default
        self.mlp_token2feat = nn.Linear(embed_dims, embed_dims)
        self.mlp_delta_f = nn.Linear(embed_dims, embed_dims)
        # linking tokens to queries [C reins.py::return_auto]
        self.transform = nn.Linear(embed_dims, query_dims)
        self.merge = nn.Linear(query_dims * 3, query_dims)

    def get_tokens(self, layer: int | None = None) -> torch.Tensor:
        """T_i (m, C) of one layer, or all layers (L, m, C) when layer is None."""
        if self.lora_dim is None:
            return self.learnable_tokens if layer is None else self.learnable_tokens[layer]
        # [C reins.py::LoRAReins.get_tokens] T_i = A_i B_i
        if layer is None:
            return self.learnable_tokens_a @ self.learnable_tokens_b  # (L, m, C)
        return self.learnable_tokens_a[layer] @ self.learnable_tokens_b[layer]  # (m, C)

    def forward(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """x (B, 1+N, C) after block `layer`, class token first -> same shape."""
        cls_token, f = x[:, :1], x[:, 1:]  # (B, 1, C), (B, N, C)
        tokens = self.get_tokens(layer)  # (m, C)
        # [C reins.py::forward_delta_feat] S_i = Softmax(f T_i^T / sqrt(C)) over the m tokens
        attn = torch.softmax(f @ tokens.t() * self.embed_dims**-0.5, dim=-1)  # (B, N, m)
        # Δ = S_i[:, 1:] · MLP_token(T_i[1:]): token 0 is in the softmax's normaliser but
        # contributes no value [C reins.py::forward_delta_feat]
        delta = attn[..., 1:] @ self.mlp_token2feat(tokens[1:])  # (B, N, C)
        # Δ = MLP_delta(Δ + f): the residual f goes inside the second MLP [C forward_delta_feat]
        delta = self.mlp_delta_f(delta + f)
        # f' = f + s · Δ, class token unchanged [C reins.py::Reins.forward]
        return torch.cat([cls_token, f + self.scale * delta], dim=1)

    def link_queries(self) -> torch.Tensor:
        """Queries (m, 256) from the tokens of all layers, independent of the image."""
        # [C reins.py::return_auto] Q_i = transform(T_i)
        q = self.transform(self.get_tokens()).permute(1, 2, 0)  # (m, 256, L)
        # Q = merge([max_i Q_i, mean_i Q_i, Q_L]), channel-major like the code
        pooled = torch.stack([q.amax(-1), q.mean(-1), q[..., -1]], dim=-1)  # (m, 256, 3)
        return self.merge(pooled.flatten(1))  # (m, 768) -> (m, 256)


def rein_parameter_counts(reins: Reins) -> dict[str, int]:
    """Rein proper (tokens, two MLPs, scale: the paper's 2.53M for ViT-L) and the linking layers."""
    link = sum(p.numel() for m in (reins.transform, reins.merge) for p in m.parameters())
    total = sum(p.numel() for p in reins.parameters())
    return {"rein": total - link, "linking": link, "rein_with_linking": total}


class ReinMask2FormerHead(nn.Module):
    """Mask2Former (Appendix A) whose learned query embeddings are deleted; the Rein queries Q
    (m, 256) take their place [C rein_mask2former.py::ReinMask2FormerHead.forward]. Inits as
    mmdet: xavier_normal for the transformer layers [C mmdet mask2former_head.py]."""

    def __init__(self, in_channels: Sequence[int], num_classes: int = NUM_CLASSES,
                 num_queries: int = REIN_TOKEN_LENGTH) -> None:  # fmt: skip
        super().__init__()
        self.m2f = Mask2FormerHead(in_channels, num_classes, num_queries, learned_queries=False,
                                   init="xavier_normal")  # fmt: skip
        self.querys2feat = nn.Linear(REIN_QUERY_DIMS, REIN_QUERY_DIMS)

    def forward(self, features: Sequence[torch.Tensor], queries: torch.Tensor) -> dict:
        q = queries[None].expand(features[0].shape[0], -1, -1)  # (B, m, 256)
        # [C rein_mask2former.py::forward] query_feat = querys2feat(Q), query_pos = Q
        return self.m2f(features, query_feat=self.querys2feat(q), query_pos=q)


# =============================================================================================
# 2. Model
# =============================================================================================
# The frozen VFM with a Rein layer after every block, the segmentor [C dino_v2.py, reins_dinov2.py]

# A literal table of the VFM sizes. out_indices: blocks whose outputs feed the head.
# DEVIATION 3: the out_indices of ViT-S/B/G are [unverified].
VFM_SIZES: dict[str, dict] = {
    "dinov2_s": dict(family="dinov2", embed_dim=384, depth=12, num_heads=6, swiglu=False,
                     out_indices=(3, 5, 8, 11), weights="dinov2_vits14_pretrain.pth"),
    "dinov2_b": dict(family="dinov2", embed_dim=768, depth=12, num_heads=12, swiglu=False,
                     out_indices=(3, 5, 8, 11), weights="dinov2_vitb14_pretrain.pth"),
    # [C configs/_base_/models/rein_dinov2_mask2former.py]
    "dinov2_l": dict(family="dinov2", embed_dim=1024, depth=24, num_heads=16, swiglu=False,
                     out_indices=(7, 11, 15, 23), weights="dinov2_vitl14_pretrain.pth"),
    "dinov2_g": dict(family="dinov2", embed_dim=1536, depth=40, num_heads=24, swiglu=True,
                     out_indices=(9, 19, 29, 39), weights="dinov2_vitg14_pretrain.pth"),
    # [C configs/_base_/models/rein_eva02-L_mask2former.py]
    "eva02_l": dict(family="eva02", embed_dim=1024, depth=24, num_heads=16, swiglu=True,
                    out_indices=(7, 11, 15, 23), weights="eva02_L_pt_m38m_p14.pt"),
    # tiny random-init model for tests
    "test": dict(family="dinov2", embed_dim=32, depth=4, num_heads=2, swiglu=False,
                 out_indices=(0, 1, 2, 3), weights=None),
}  # fmt: skip
DINOV2_LAYER_SCALE_INIT = 1e-5  # [C dino_v2 configs: init_values]
EVA02_REF_GRID = 16  # RoPE reference grid, 224/14 [C rein_eva02-L_mask2former.py: pt_hw_seq_len]
# Feature rescaling after the four out_indices: strides 16 -> 4, 8, 16, 32 [C dino_v2.py::forward]
PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)


def build_vfm(size: str, img_size: int) -> nn.Module:
    """The frozen VFM as a timm model with patch 16 (weights come later from load_vfm_weights).
    DEVIATION 1: timm's VisionTransformer / Eva instead of the official DINOv2 / EVA-02 copies."""
    from timm.layers import SwiGLUPacked
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    cfg = VFM_SIZES[size]
    shape = dict(img_size=img_size, patch_size=PATCH_SIZE, embed_dim=cfg["embed_dim"],
                 depth=cfg["depth"], num_heads=cfg["num_heads"], num_classes=0,
                 dynamic_img_size=True)  # fmt: skip
    if cfg["family"] == "eva02":
        # DEVIATION 2: timm's EVA02-L layout [timm eva.py::eva02_large_patch14_224] at patch 16.
        return Eva(**shape, mlp_ratio=4 * 2 / 3, qkv_fused=False, swiglu_mlp=True,
                   scale_mlp=True, use_rot_pos_emb=True,
                   ref_feat_shape=(EVA02_REF_GRID, EVA02_REF_GRID))  # fmt: skip
    # DINOv2 ViT-G: SwiGLU FFN with hidden 4096, packed as one 8192-wide fc1 in timm
    swiglu = dict(mlp_ratio=2.66667 * 2, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    return VisionTransformer(**shape, **(swiglu if cfg["swiglu"] else dict(mlp_ratio=4.0)),
                             qkv_bias=True, init_values=DINOV2_LAYER_SCALE_INIT)  # fmt: skip


def interpolate_pos_embed(pos_embed: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """DINOv2's run-time rule: the stored square grid is used as is when the token grid is the same
    square; otherwise bicubic with scale factors (h + 0.1)/g0, (w + 0.1)/g0 (the +0.1 avoids a
    floating-point off-by-one) [C dino_v2.py::interpolate_pos_encoding]. DEVIATION 7: EVA02 too.
    pos_embed (1, 1+g0², C)."""
    n, (h, w) = pos_embed.shape[1] - 1, grid_hw
    if n == h * w and h == w:
        return pos_embed
    g0, c = int(math.sqrt(n)), pos_embed.shape[-1]
    patch = pos_embed[:, 1:].float().reshape(1, g0, g0, c).permute(0, 3, 1, 2)  # (1, C, g0, g0)
    patch = F.interpolate(patch, scale_factor=((h + 0.1) / g0, (w + 0.1) / g0), mode="bicubic",
                          align_corners=False)  # fmt: skip
    patch = patch.permute(0, 2, 3, 1).reshape(1, h * w, c)  # (1, h·w, C)
    return torch.cat([pos_embed[:, :1], patch.to(pos_embed.dtype)], dim=1)


class ReinsBackbone(nn.Module):
    """Frozen VFM with a Rein layer after every block; returns the 4-level pyramid and the queries.

    [C reins_dinov2.py::ReinsDinoVisionTransformer.forward_features, dino_v2.py::forward]:
    tokens -> for each block i: x = block_i(x); x = Rein_i(x); keep x after the out_indices
    blocks (patch tokens only, no final norm), reshape to (B, C, H/16, W/16) and rescale
    bilinearly by x4, x2, x1, x0.5 -> strides 4, 8, 16, 32. No learned neck.
    """

    def __init__(self, size: str, img_size: int, reins: Reins) -> None:
        super().__init__()
        cfg = VFM_SIZES[size]
        self.is_eva = cfg["family"] == "eva02"
        self.out_indices = tuple(cfg["out_indices"])
        self.embed_dim = cfg["embed_dim"]
        self.vfm = build_vfm(size, img_size)
        self.reins = reins
        # Frozen: every VFM parameter, in eval mode [C utils.py::set_requires_grad, set_train]
        self.vfm.requires_grad_(False)
        self.vfm.eval()

    def train(self, mode: bool = True) -> ReinsBackbone:
        """Only the Rein module follows train(); the VFM stays in eval mode [C reins_dinov2.py::
        ReinsDinoVisionTransformer.train]."""
        super().train(mode)
        self.vfm.eval()
        return self

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple, torch.Tensor | None]:
        """images (B, 3, H, W), H and W multiples of 16 -> tokens (B, 1+N, C) with the class token
        first and position embeddings added, the grid (h, w), the RoPE table (EVA02) or None."""
        x = self.vfm.patch_embed(images)  # (B, h, w, C)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)  # (B, N, C)
        x = torch.cat([self.vfm.cls_token.expand(b, -1, -1), x], dim=1)  # (B, 1+N, C)
        x = x + interpolate_pos_embed(self.vfm.pos_embed, (h, w))
        rope = self.vfm.rope.get_embed(shape=(h, w)) if self.is_eva else None
        return x, (h, w), rope

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """images (B, 3, H, W) normalised -> ([4 maps (B, C, H/4..H/32, ...)], queries (M, 256))."""
        x, (h, w), rope = self.embed(images)
        b, features = x.shape[0], []
        for i, block in enumerate(self.vfm.blocks):
            x = block(x, rope=rope) if self.is_eva else block(x)
            # the Rein delta follows EVERY block, the last included [C forward_features]
            x = self.reins(x, i)
            if i in self.out_indices:
                # block outputs before the VFM's final norm [C dino_v2.py::forward]
                features.append(x[:, 1:].transpose(1, 2).reshape(b, self.embed_dim, h, w))
        # (B, C, 4h, 4w), (B, C, 2h, 2w), (B, C, h, w), (B, C, h/2, w/2)
        features = [F.interpolate(f, scale_factor=s, mode="bilinear", align_corners=False)
                    if s != 1.0 else f for f, s in zip(features, PYRAMID_SCALES)]  # fmt: skip
        return features, self.reins.link_queries()


class ReinSegmentor(nn.Module):
    """Frozen VFM + Rein -> (pyramid, queries) -> Mask2Former. The module names follow the
    official ones (backbone.reins.*, decode_head.*) so the key map stays short."""

    def __init__(self, backbone: str = "dinov2_l", img_size: int = 512,
                 token_length: int = REIN_TOKEN_LENGTH, lora_dim: int | None = REIN_LORA_DIM,
                 num_classes: int = NUM_CLASSES) -> None:  # fmt: skip
        super().__init__()
        cfg = VFM_SIZES[backbone]
        reins = Reins(cfg["depth"], cfg["embed_dim"], PATCH_SIZE, token_length, lora_dim)
        self.backbone = ReinsBackbone(backbone, img_size, reins)
        self.decode_head = ReinMask2FormerHead([cfg["embed_dim"]] * 4, num_classes, token_length)

    def forward(self, images: torch.Tensor) -> dict:
        """images (B, 3, H, W) normalised, H and W multiples of 16 -> Mask2Former outputs."""
        features, queries = self.backbone(images)
        return self.decode_head(features, queries)


def describe_parameters(model: ReinSegmentor) -> dict[str, int]:
    def count(module: nn.Module, trained_only: bool = False) -> int:
        return sum(p.numel() for p in module.parameters() if p.requires_grad or not trained_only)

    return {"total": count(model), "trainable": count(model, True),
            "frozen_vfm": count(model.backbone.vfm), "head": count(model.decode_head),
            **rein_parameter_counts(model.backbone.reins)}  # fmt: skip


@torch.no_grad()
def segment(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class scores (B, K, H, W) of normalised images: mask logits upsampled to the input size,
    then Σ_q softmax(class_q)[:K] · sigmoid(mask_q) [C mmseg mask2former_head.py::predict].
    DEVIATION 6: sides that are not multiples of 16 are zero-padded and the scores cropped."""
    h, w = images.shape[-2:]
    ph, pw = -h % PATCH_SIZE, -w % PATCH_SIZE
    if ph or pw:
        images = F.pad(images, (0, pw, 0, ph))
    out = model(images)
    masks = F.interpolate(out["pred_masks"].float(), size=images.shape[-2:], mode="bilinear",
                          align_corners=False)  # fmt: skip
    return semantic_inference(out["pred_logits"].float(), masks)[..., :h, :w]


# =============================================================================================
# 3. Data and augmentation
# =============================================================================================
# The training split of each source and the official training pipeline [C configs/_base_/datasets]

# GTA5: every images/*.png (mmseg folder scan, 24,966 frames) [C dg_gta_512x512.py]; Cityscapes:
# the train split [C dg_citys2acdc_1024x1024.py]. Rein ships no SYNTHIA config: the folder scan of
# its GTA5 config applied to SYNTHIA is every frame (9,400). toy: its GTA5-layout train list.
# DEVIATION 11: one --source per run (no GTA5 + SYNTHIA joint training).
SOURCE_SPLITS = {"gta": "train", "cityscapes": "train", "synthia": "all", "toy": "train"}


def mmcv_resize(
    image: torch.Tensor, label: torch.Tensor | None, size_hw: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """cv2-style resize (mmcv imresize): bilinear without antialiasing (rounded to uint8), label
    nearest with OpenCV's floor(dst · scale) rule. DEVIATION 4: OpenCV's fixed-point rounding."""
    if tuple(image.shape[-2:]) != tuple(size_hw):
        image = F.interpolate(image[None].float(), size=size_hw, mode="bilinear",
                              align_corners=False, antialias=False)[0]  # fmt: skip
        image = image.round().clamp(0, 255).to(torch.uint8)
        if label is not None:
            label = F.interpolate(label[None, None].float(), size=size_hw, mode="nearest")
            label = label[0, 0].long()
    return image, label


def photometric_distortion(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """mmseg PhotoMetricDistortion on uint8 RGB (3, H, W): brightness ±32, contrast 0.5-1.5 (before
    or after the HSV ops, at random), saturation 0.5-1.5, hue ±18 (of 180), each with p = 0.5,
    every step rounding to uint8 [C mmseg/datasets/transforms/transforms.py::PhotoMetricDistortion].
    DEVIATION 5: draws come from `g`."""

    def coin() -> bool:
        return bool(torch.randint(2, (), generator=g))

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=g).item()

    def contrast(x: torch.Tensor) -> torch.Tensor:
        return common.to_uint8_truncated(x, alpha=uniform(*PMD_CONTRAST_RANGE)) if coin() else x

    x = image
    if coin():
        x = common.to_uint8_truncated(x, beta=uniform(-PMD_BRIGHTNESS_DELTA, PMD_BRIGHTNESS_DELTA))
    contrast_first = coin()
    if contrast_first:
        x = contrast(x)
    if coin():
        hsv = common.rgb_to_hsv_cv2(x)
        hsv[1] = common.to_uint8_truncated(hsv[1], alpha=uniform(*PMD_SATURATION_RANGE)).long()
        x = common.hsv_to_rgb_cv2(hsv)
    if coin():
        hsv = common.rgb_to_hsv_cv2(x)
        # numpy randint(-18, 18): high exclusive
        shift = int(torch.randint(-PMD_HUE_DELTA, PMD_HUE_DELTA, (), generator=g))
        hsv[0] = torch.remainder(hsv[0] + shift, common.HSV_HUE_RANGE)
        x = common.hsv_to_rgb_cv2(hsv)
    if not contrast_first:
        x = contrast(x)
    return x


class ReinTrainTransform:
    """Resize (random short side) -> RandomCrop (cat_max_ratio 0.75) -> flip -> photometric
    distortion -> ImageNet normalisation -> pad to crop (image 0 after normalisation, label 255),
    the order of the official pipeline and SegDataPreProcessor [C configs, mmseg
    data_preprocessor.py]. Returns (float (3, crop, crop), int64 (crop, crop))."""

    def __init__(self, crop: int) -> None:
        self.crop = crop
        self.short_sides = [int(crop * x * 0.1) for x in SCALE_STEPS]
        self.max_long = MAX_LONG_FACTOR * crop

    def __call__(self, image: torch.Tensor, label: torch.Tensor,
                 g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        # [C RandomChoiceResize + ResizeShortestEdge(max_size)] a short side from the list
        short = self.short_sides[int(torch.randint(len(self.short_sides), (), generator=g))]
        h, w = image.shape[-2:]
        image, label = mmcv_resize(image, label, common.fit_size(h, w, self.max_long, short))
        image, label = common.random_crop(image, label, self.crop, g, cat_max_ratio=CAT_MAX_RATIO,
                                          pad=False)  # fmt: skip
        image, label = common.random_hflip(image, label, g, p=FLIP_PROB)
        image = photometric_distortion(image, g)
        x = common.normalize(image[None], common.IMAGENET_MEAN, common.IMAGENET_STD)[0]
        # the official preprocessor pads after normalising: padded pixels are 0 = the mean colour
        return common.pad_pair(x, label, (self.crop, self.crop))


def build_source(args: argparse.Namespace) -> torch.utils.data.Dataset:
    """The training set of --source with the official split and pipeline; its labels checked."""
    split, transform = SOURCE_SPLITS[args.source], ReinTrainTransform(args.crop)
    source = common.build_dataset(args.source, args.data, split, transform=transform)  # gta: all
    common.check_labels(source)  # a wrong label encoding stops the run now, not after training
    return source


# =============================================================================================
# 4. Training
# =============================================================================================
# Loss, parameter groups, schedule, checkpoints, the loop [C tools/train.py with the configs].

MODEL_FLAGS = ("backbone", "rein_tokens", "rein_rank", "full_rank")  # what shapes the model
# DDP's find_unused_parameters per recipe [C rein_dinov2_mask2former_1024x1024_bs4x2.py]
FIND_UNUSED = {"gta512": False, "citys2acdc": True}


def build_criterion(num_points: int = MASK_POINTS) -> SetCriterion:
    """[C configs/_base_/models/rein_dinov2_mask2former.py: loss_cls 2.0 with class_weight
    [1]*19+[0.1], loss_mask 5.0, loss_dice 5.0, 12544 points, oversample 3, importance 0.75;
    HungarianAssigner ClassificationCost 2, CrossEntropyLossCost 5, DiceCost 5]."""
    return SetCriterion(num_classes=NUM_CLASSES, eos_coef=0.1, weight_ce=2.0,
                        weight_mask=5.0, weight_dice=5.0, num_points=num_points, oversample=3.0,
                        importance=0.75)  # fmt: skip


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups, decided on the official parameter names exactly as mmengine's
    DefaultOptimWrapperConstructor does: a name containing one of NO_DECAY_KEYS, or a parameter of
    a norm layer, gets no weight decay. Frozen parameters are left out
    [C PEFTOptimWrapperConstructor].
    (So the head's level_embed has no decay, the pixel decoder's level_encoding has.)"""
    model = common.unwrap(model)
    norms = [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm))]
    norm_params = {id(p) for m in norms for p in m.parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            no = id(p) in norm_params or any(k in official_name(name) for k in NO_DECAY_KEYS)
            (no_decay if no else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, args: argparse.Namespace, dist: common.Dist
) -> torch.optim.AdamW:
    """AdamW over Rein + head with the official no-decay groups [C configs optim_wrapper]; fused
    (one kernel for every tensor) on the fast path."""
    return torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr,
                             betas=ADAMW_BETAS, eps=ADAMW_EPS,
                             **common.optimizer_options(args, dist, "adamw"))  # fmt: skip


def lr_at(iteration: int, base_lr: float, total_iters: int, warmup_iters: int) -> float:
    """mmengine LinearLR(start 1e-6, end at warm-up) then PolyLR(power 0.9, eta_min 0) in closed
    form; mmengine counts T = end - begin - 1 steps, so the last iteration gets lr 0
    [C mmengine param_scheduler.py::LinearParamScheduler, PolyParamScheduler]."""
    if iteration < warmup_iters:
        steps = max(warmup_iters - 1, 1)
        # lr(t) = lr0 (s0 + (1 - s0) t / (W - 1)), s0 = 1e-6
        return base_lr * (WARMUP_START_FACTOR + (1 - WARMUP_START_FACTOR) * iteration / steps)
    steps = max(total_iters - warmup_iters - 1, 1)
    t = min(iteration - warmup_iters, steps)
    # lr(t) = lr0 (1 - t / (T - 1))^0.9, t counted from the end of the warm-up
    return base_lr * (1 - t / steps) ** POLY_POWER


def set_lr(optimizer: torch.optim.Optimizer, iteration: int, args: argparse.Namespace) -> float:
    """The scheduled lr on both groups (lr_mult 1 everywhere [C configs: custom_keys])."""
    lr = lr_at(iteration, args.lr, args.iters, args.warmup_iters)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def nonfinite_predictions(outputs: dict) -> list[str]:
    """The names of what the matcher would see that holds a nan or inf (one device sync): the
    final prediction, and the sum of each of the 9 auxiliary ones (a nan or inf makes it one)."""
    aux = [a["pred_logits"].sum(dtype=torch.float32) + a["pred_masks"].sum(dtype=torch.float32)
           for a in outputs["aux_outputs"]]  # fmt: skip
    checked = {"pred_logits": outputs["pred_logits"], "pred_masks": outputs["pred_masks"],
               "aux_outputs": torch.stack(aux)}  # fmt: skip
    finite = torch.stack([torch.isfinite(v).all() for v in checked.values()]).tolist()
    return [name for name, ok in zip(checked, finite) if not ok]


def loss_terms(loss: torch.Tensor, losses: dict, model: nn.Module) -> dict[str, float]:
    """The logged numbers (one device sync): the loss, its three final terms, Rein's scale s."""
    names = ("loss_ce", "loss_mask", "loss_dice")
    values = torch.stack([loss, *(losses[k] for k in names), model.backbone.reins.scale])
    values = values.detach().tolist()
    return dict(zip(("loss", *names, "scale"), values))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors only (Rein + head); DEVIATION 8: the frozen VFM is rebuilt from
    --pretrained (the official checkpoints hold the same subset [C reins_dinov2.py::state_dict])."""
    model = common.unwrap(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}


def frozen_fingerprint(model: nn.Module) -> float:
    """A cheap checksum of the frozen VFM, stored in checkpoints to catch a resume with other
    --pretrained / --backbone weights."""
    vfm = common.unwrap(model).backbone.vfm
    return float(sum(p.double().abs().sum() for p in vfm.parameters()))


def save_checkpoint(args: argparse.Namespace, iteration: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None) -> None:  # fmt: skip
    """out/last.pt (process 0): the trained tensors, DEVIATION 8: not the frozen VFM, whose
    fingerprint is kept instead; DEVIATION 10: written before each evaluation and at the end."""
    extra = {"frozen_fingerprint": frozen_fingerprint(model),
             "omitted_keys": "backbone.vfm.* (frozen VFM, rebuilt from --pretrained)"}  # fmt: skip
    common.save_checkpoint(Path(args.out) / "last.pt", method="rein", iteration=iteration,
                           model_state=trainable_state(model), optimizer=optimizer, scaler=scaler,
                           args=args, extra=extra)  # fmt: skip


def check_checkpoint(ckpt: dict, args: argparse.Namespace) -> None:
    """Before the model is built: --resume was made by a model of the same shape and, to train,
    has iterations left."""
    common.check_resume_args(ckpt, args, MODEL_FLAGS)
    if not args.eval_only and ckpt["iter"] >= args.iters:
        raise common.UsageError(
            f"--resume {args.resume} is at iteration {ckpt['iter']} of --iters {args.iters}: "
            "nothing to train; pass a larger --iters, or --eval-only to evaluate it"
        )


def load_trained(model: nn.Module, ckpt: dict, args: argparse.Namespace) -> None:
    """The trained tensors of one of our checkpoints (--resume), trained on the same frozen VFM
    (its fingerprint: deviation 8); only the VFM may be absent."""
    fp = ckpt.get("frozen_fingerprint")
    if fp is not None and not math.isclose(fp, frozen_fingerprint(model), rel_tol=1e-9):
        raise common.CheckpointError(
            f"--resume {args.resume}: the frozen VFM differs from the one it was trained with; "
            f"pass the same --pretrained ({ckpt['args'].get('pretrained')}) and --seed"
        )
    hint = "use the same --backbone, --rein-tokens, --rein-rank and --full-rank as the run that "
    common.load_state_strict(model, ckpt["model"], args.resume, hint + "wrote it",
                             may_lack=("backbone.vfm.",))  # fmt: skip


def train(args: argparse.Namespace, dist: common.Dist, log: common.RunLog, net: nn.Module,
          optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
          loader: common.TrainLoader, targets: dict[str, torch.utils.data.Dataset], start: int,
          criterion: SetCriterion, amp_ctx: Callable) -> dict:  # fmt: skip
    """Iterations start..--iters of `net` (DDP, compiled); returns the last evaluation's results."""
    model = common.unwrap(net)
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
            # METHOD: learning rate of this iteration [C configs param_scheduler: PolyLR, LinearLR]
            lr = set_lr(optimizer, it, args)
            # METHOD: frozen VFM + Rein -> Mask2Former; every prediction checked before the
            # matcher sees it; 30 weighted set-prediction loss terms [C rein_mask2former.py],
            # each image's random points drawn from its own generator (2 processes = 1)
            images = batch[0].to(dist.device, non_blocking=True)
            labels = batch[1].to(dist.device, non_blocking=True)
            with amp_ctx():
                outputs = net(images)
            bad = nonfinite_predictions(outputs)
            if bad:
                raise common.DivergenceError(it + 1, saved, predictions=bad)
            gens = common.step_generators(args.seed, it, args.batch_size, dist)
            losses = criterion(outputs, semantic_to_targets(labels, NUM_CLASSES), gens)
            loss = sum(losses.values())
            terms = loss_terms(loss, losses, model)
            # PLUMBING: the global batch's terms (all processes stop together on a non-finite
            # loss), then backward (scaled in fp16)
            terms = common.global_mean(terms, dist)
            if not all(math.isfinite(v) for v in terms.values()):
                raise common.DivergenceError(it + 1, saved, terms)
            (loss if scaler is None else scaler.scale(loss)).backward()
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
                # METHOD: Rein's evaluation: per-target resize, sliding windows [C configs test_cfg]
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
# Per-target resize, sliding windows, mIoU [C configs test_cfg, rein/dg_metrics.py::DGIoUMetric]

# Per-target Resize(scale, keep_ratio=True) before sliding; labels stay at their stored size
# [C configs/_base_/datasets/*.py]. Mapillary uses pre-halved files. The toy targets (256x128,
# Cityscapes-like) follow Cityscapes: halved with gta512, as 2048x1024 -> 1024x512.
EVAL_SCALES = {
    "gta512": {"cityscapes": (1024, 512), "mapillary": (1024, 512), "bdd": (1280, 720),
               "gta": (1280, 720), "acdc": (960, 540), "synthia": (1280, 760),
               "toy": (128, 64)},
    "citys2acdc": {"cityscapes": (2048, 1024), "acdc": (1920, 1080), "bdd": (1280, 720),
                   "mapillary": (2048, 1024), "gta": (1280, 720), "synthia": (1280, 760),
                   "toy": (256, 128)},
}  # fmt: skip


class _RescaledTarget(torch.utils.data.Dataset):
    """A target dataset with the official test-time resize: optional halving (Rein's Mapillary
    copies: image PIL-bicubic, label nearest [C tools/convert_datasets/mapillary_resize.py]), then
    mmcv Resize keep_ratio of the image only (cv2 bilinear)."""

    def __init__(self, dataset: torch.utils.data.Dataset, scale: tuple[int, int] | None,
                 pre_halve: bool) -> None:  # fmt: skip
        self.dataset, self.scale, self.pre_halve = dataset, scale, pre_halve

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label, name = self.dataset[i]
        if self.pre_halve:
            h, w = image.shape[-2:]
            image, label = common.resize_pair(image, label, (h // 2, w // 2), "bicubic")
        if self.scale is not None:
            h, w = image.shape[-2:]
            image, _ = mmcv_resize(image, None, common.fit_size(h, w, *self.scale))
        return image, label, name


def eval_dataset(target: str, args: argparse.Namespace) -> torch.utils.data.Dataset:
    """One --targets entry, opened (layout, counts, image/label sizes) with its test resize."""
    ds = common.build_dataset(target, args.data, "val", mapillary_map=args.mapillary_map)
    family = target.split("-")[0] if target.startswith(("acdc-", "toy-")) else target
    return _RescaledTarget(ds, EVAL_SCALES[args.recipe][family], pre_halve=target == "mapillary")


def build_targets(args: argparse.Namespace) -> dict[str, torch.utils.data.Dataset]:
    """Every --targets entry, opened at start: a typo or a missing folder fails before training."""
    return {target: eval_dataset(target, args) for target in common.parse_targets(args)}


@torch.no_grad()
def slide_segment(
    model: nn.Module, image: torch.Tensor, crop: int, stride: int, window_batch: int = 8
) -> torch.Tensor:
    """Sliding-window scores (B, K, H, W): windows of crop x crop on the mmseg grid
    (common.slide_windows), summed and divided by the per-pixel window count. DEVIATION 6: the
    windows of an image run in batches of `window_batch`."""
    b, _, h, w = image.shape
    windows = common.slide_windows(h, w, crop, stride)
    scores = image.new_zeros((b, NUM_CLASSES, h, w), dtype=torch.float32)
    count = image.new_zeros((1, 1, h, w), dtype=torch.float32)
    for start in range(0, len(windows), window_batch):
        chunk = windows[start : start + window_batch]
        crops = torch.cat([image[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])  # (n·B, 3, ..)
        out = segment(model, crops).view(len(chunk), b, NUM_CLASSES, *crops.shape[-2:])
        for (y1, y2, x1, x2), s in zip(chunk, out):
            scores[:, :, y1:y2, x1:x2] += s
            count[:, :, y1:y2, x1:x2] += 1
    return scores / count


def evaluate(
    model: nn.Module, targets: dict[str, torch.utils.data.Dataset], args: argparse.Namespace,
    dist: common.Dist,
) -> dict[str, dict]:  # fmt: skip
    """Per target: mIoU (nanmean over the 19 classes, one confusion matrix) and per-class IoU;
    scores bilinearly resized to the label size, then argmax [C rein/dg_metrics.py::DGIoUMetric].
    DEVIATION 9: the global random streams are left as they were."""
    net = common.unwrap(model)
    was_training = net.training
    net.eval()
    amp_ctx, _ = common.autocast(dist.device, args.amp)

    def predict(image: torch.Tensor) -> torch.Tensor:
        """uint8 (1, 3, h, w) on the device -> class scores (1, K, h, w)."""
        x = common.normalize(image, common.IMAGENET_MEAN, common.IMAGENET_STD)
        with amp_ctx():
            if args.inference == "whole":
                return segment(net, x)
            return slide_segment(net, x, args.crop, args.stride)

    results = {}
    with common.rng_neutral():
        for name, dataset in targets.items():
            results[name] = common.evaluate_dataset(
                predict, dataset, resize=common.EvalResize(), dist=dist, miou_mode="nanmean",
                workers=args.workers, batch_size=args.eval_batch_size, save_preds=args.save_preds,
                save_dir=Path(args.out) / "preds" / name, desc=name)  # fmt: skip
    net.train(was_training)
    return results


# =============================================================================================
# 6. Command line and main
# =============================================================================================

# Recipes of the two official configs; `--recipe` installs these defaults (flags written win).
RECIPES = {
    # [C configs/dinov2/rein_dinov2_mask2former_512x512_bs1x4.py, configs/_base_/datasets/
    # dg_gta_512x512.py, configs/_base_/models/rein_dinov2_mask2former.py]
    "gta512": dict(source="gta", targets="cityscapes,bdd,mapillary", crop=512, batch_size=4,
                   lr=1e-4, warmup_iters=0),
    # [C configs/dinov2/rein_dinov2_mask2former_1024x1024_bs4x2.py, dg_citys2acdc_1024x1024.py]
    "citys2acdc": dict(source="cityscapes",
                       targets="acdc-fog,acdc-night,acdc-rain,acdc-snow,cityscapes", crop=1024,
                       batch_size=8, lr=6e-5, warmup_iters=10000),
}  # fmt: skip

# Toy defaults (CPU, about two minutes on 2 cores; two threads take 0.89x the time of one on an
# idle machine, --cpu-threads 1 on a busy one). ViT-S, the smallest DINOv2 (the 4-block `test` ViT
# reached ~3 mIoU in 250 steps). A step costs about a read of the head's 20M weights, whatever the
# crop: 50 tokens (= queries; 8 toy classes), crop 48 and 144 points take 0.56x the time of 100
# tokens at crop 64; fused AdamW (--fast on) makes the optimizer step 3x faster on a CPU; targets
# are evaluated at half size (EVAL_SCALES), 16 images at a time. lr 5e-4, 250 steps: Rein's queries
# start nearly identical (tiny A·B behind shared linear layers) and separate only after ~150
# steps; with 1e-4 or 200-220 steps, late or never (3-9 mIoU on some targets).
TOY_DEFAULTS = dict(backbone="dinov2_s", rein_tokens=50, crop=48, num_points=144, batch_size=2,
                    iters=250, lr=5e-4, fast="on", eval_every=0, workers=0, log_every=10,
                    targets=",".join(common.TOY_TARGETS), inference="whole",
                    eval_batch_size=16)  # fmt: skip


def presets(first: argparse.Namespace) -> dict:
    """The defaults of --recipe, then the toy settings when --source toy, and the stride that
    follows the crop in force (first.crop is None unless --crop was written)."""
    table = dict(RECIPES[first.recipe], **(TOY_DEFAULTS if first.source == "toy" else {}))
    return dict(table, stride=default_stride(first.crop or table["crop"]))


def default_stride(crop: int) -> int:
    """2/3 of the crop: 341 for 512, 683 for 1024 [C configs test_cfg stride]."""
    return round(2 * crop / 3)


def build_parser() -> argparse.ArgumentParser:
    parser = common.make_parser(__doc__)
    gta = RECIPES["gta512"]
    common.add_shared_flags(
        parser, source=gta["source"], targets=gta["targets"], iters=40000,
        batch_size=gta["batch_size"], crop=gta["crop"], amp=False, pretrained="auto",
        eval_every=10000, log_every=50, workers=2,
        cite={
            "source": "toy selects ViT-S, 50 tokens, crop 48, 144 points, batch 2, 250 "
                      "iterations, lr 5e-4, --fast on, whole-image inference, no workers, "
                      "evaluation at the end, 16 images at a time (see TOY_DEFAULTS); official: "
                      "GTA5 [C dg_gta_512x512.py]",
            "iters": "official: 40000 [C rein_dinov2_mask2former_512x512_bs1x4.py]",
            "batch_size": "official: 4 on one GPU, citys2acdc 2 x 4 GPUs [C configs]",
            "crop": "a multiple of the patch size 16; official: 512, citys2acdc 1024 [C configs]",
            "amp": "official: fp32 OptimWrapper; tools/train.py --amp is optional [C]",
            "pretrained": "auto = checkpoints/<official DINOv2/EVA02 file of --backbone>, else "
                          "timm's copy (hub timm/<name>, TIMM_WEIGHTS)",
            "eval_every": "official: val_interval 10000 [C configs]",
            "log_every": "official: 50 [C default_runtime.py]",
        },
    )  # fmt: skip
    g = parser.add_argument_group("rein")
    a = g.add_argument
    # fmt: off
    a("--recipe", choices=list(RECIPES), default="gta512",
      help="official recipe whose defaults to use: gta512 (GTA5 -> C/B/M, crop 512) or citys2acdc "
      "(Cityscapes -> ACDC, crop 1024, lr 6e-5, 10k warm-up, batch 8) (default %(default)s)")
    a("--backbone", choices=list(VFM_SIZES), default="dinov2_l",
      help="frozen VFM: dinov2_s/b/l/g (DINOv2 ViT-S/B/L/G), eva02_l (EVA02-L), test (tiny, "
      "tests only) (default %(default)s; official: dinov2_l [C rein_dinov2_mask2former.py])")
    a("--rein-tokens", type=common.positive_int, default=REIN_TOKEN_LENGTH,
      help="tokens per layer = queries (default %(default)s [C configs: token_length])")
    a("--rein-rank", type=common.positive_int, default=REIN_LORA_DIM,
      help="rank r of T_i = A_i B_i (default %(default)s [C configs: lora_dim])")
    a("--full-rank", action=argparse.BooleanOptionalAction, default=False,
      help="full-rank tokens T_i (official class Reins) instead of A_i B_i (default %(default)s: "
      "the headline LoRAReins)")
    a("--lr", type=common.positive_float, default=gta["lr"],
      help="AdamW learning rate (default %(default)s; official: 1e-4, citys2acdc 6e-5 [C configs])")
    a("--weight-decay", type=common.nonnegative_float, default=WEIGHT_DECAY,
      help="AdamW weight decay (default %(default)s [C configs])")
    a("--warmup-iters", type=common.nonnegative_int, default=gta["warmup_iters"],
      help="linear warm-up iterations from lr x 1e-6 (default %(default)s; official: 0, "
      "citys2acdc 10000 [C configs])")
    a("--stride", type=common.positive_int, default=default_stride(gta["crop"]),
      help="sliding-window stride (default %(default)s = 2/3 of --crop; official: 341 for 512, "
      "683 for 1024 [C configs test_cfg])")
    a("--inference", choices=["slide", "whole"], default="slide",
      help="slide (official, windows of --crop) or whole image (default %(default)s)")
    a("--official-ckpt", default=None,
      help="load a released Rein checkpoint (backbone.reins.* + decode_head.*, mmdet names; "
      "optionally backbone.* DINOv2 keys) before training/eval (default %(default)s)")
    a("--mapillary-map", choices=["rein", "hrda"], default="rein",
      help="Mapillary 66->19 table (default %(default)s [C mapillary2cityscape.py])")
    a("--num-points", type=common.positive_int, default=MASK_POINTS,
      help="points per mask for the matcher and the mask losses (default %(default)s; "
      "official: 12544 [C configs train_cfg.num_points])")
    # fmt: on
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # One pre-parse reads what chooses a preset (--recipe, --source toy, --crop: a namespace that
    # holds crop=None keeps argparse from filling in its default), its defaults are installed
    # with set_defaults, then the one real parse (a flag written always wins).
    first, _ = parser.parse_known_args([a for a in argv if a not in ("-h", "--help")],
                                       argparse.Namespace(crop=None))  # fmt: skip
    parser.set_defaults(**presets(first))
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """What the flags cannot mean together: an error; a value this configuration does not use:
    one warning line."""
    if args.crop % PATCH_SIZE:
        raise common.UsageError(
            f"--crop {args.crop} is not a multiple of the patch size {PATCH_SIZE}; use e.g. "
            f"{args.crop // PATCH_SIZE * PATCH_SIZE or PATCH_SIZE}"
        )
    if args.inference == "slide" and args.stride > args.crop:
        raise common.UsageError(
            f"--stride {args.stride} is larger than --crop {args.crop}: the windows would leave "
            f"pixels unscored; use at most {args.crop} (default {default_stride(args.crop)})"
        )
    if not common.parse_targets(args):
        raise common.UsageError("--targets is empty; name at least one evaluation target")
    if args.resume and args.official_ckpt:
        raise common.UsageError(
            "--official-ckpt and --resume both give the trained weights; pass one of them"
        )
    if args.inference == "whole" and args.stride != default_stride(args.crop):
        common.warn(f"--stride {args.stride} is not used: --inference whole has no windows")
    if args.full_rank and args.rein_rank != REIN_LORA_DIM:
        common.warn(f"--rein-rank {args.rein_rank} is not used: --full-rank tokens have no rank")
    if not args.eval_only and args.warmup_iters >= args.iters:
        common.warn(
            f"--warmup-iters {args.warmup_iters} >= --iters {args.iters}: the whole run is warm-up"
        )
    if args.mapillary_map != "rein" and "mapillary" not in common.parse_targets(args):
        common.warn(f"--mapillary-map {args.mapillary_map} is not used: no mapillary target")
    if args.eval_only and not (args.resume or args.official_ckpt):
        common.warn("--eval-only without --resume or --official-ckpt scores an untrained model")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_args(args)
    dist = common.setup(args)  # threads, device, TF32 and cuDNN autotuning on CUDA, seeds
    if args.bench:
        bench(args, dist)
        return
    common.prepare_out_dir(args)
    if args.source == "toy" or any(t.startswith("toy") for t in common.parse_targets(args)):
        common.make_toy_dataset(args.data)  # written once; `make data-toy` does the same
    # Everything the run reads is opened now, quickest first: targets, checkpoint, weights, source.
    targets = build_targets(args)
    ckpt = common.load_checkpoint(args.resume, "rein") if args.resume else None
    if ckpt is not None:
        check_checkpoint(ckpt, args)
    model = build_model(args).to(dist.device)
    source = None if args.eval_only else build_source(args)
    counts = describe_parameters(model)
    common.print0(f"args: {json.dumps(common.args_to_primitives(args), sort_keys=True)}")
    common.print0(
        f"parameters: total {counts['total']:,} | trainable {counts['trainable']:,} = Rein "
        f"{counts['rein']:,} (tokens, MLPs, scale) + query linking {counts['linking']:,} "
        f"(Rein with linking {counts['rein_with_linking']:,}) + head {counts['head']:,} | "
        f"frozen VFM {counts['frozen_vfm']:,}"
    )
    common.print0("targets: " + ", ".join(f"{k} {len(v)} images" for k, v in targets.items()))
    log = common.RunLog(args.out, args, {"parameters": counts}, enabled=dist.is_main)
    amp_ctx, scaler = common.autocast(dist.device, args.amp)
    if ckpt is not None:
        load_trained(model, ckpt, args)
    if args.eval_only:
        results = evaluate(model, targets, args, dist)
        common.print0(common.format_results(results))
        log.write_results(results, None)
        return
    optimizer = build_optimizer(model, args, dist)
    start = 0 if ckpt is None else common.restore_training_state(ckpt, optimizer, scaler)
    common.print0(
        f"source {args.source}: {len(source)} images; global batch {args.batch_size} "
        f"({args.batch_size // dist.world_size} per process x {dist.world_size})"
    )
    loader = common.TrainLoader(source, args.batch_size, dist, args.seed, args.workers, start)
    net = common.wrap_ddp(model, dist, find_unused=FIND_UNUSED[args.recipe])  # no BatchNorm here
    net = common.maybe_compile(net, args)
    net.train()  # the VFM stays in eval mode (ReinsBackbone.train)
    criterion = build_criterion(args.num_points).to(dist.device)
    train(args, dist, log, net, optimizer, scaler, loader, targets, start, criterion, amp_ctx)


# `python rein.py` runs main() from the last line of this file, once the appendices are defined.


# =============================================================================================
# Appendix A: Mask2Former
# =============================================================================================
# The declared copy, identical in rein.py and clouds.py (a test compares them): do not edit it.

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
# DINOv2 / EVA02 files into timm [C tools/convert_models/*.py], released Rein checkpoints (mmdet)

# Keys of the original DINOv2 checkpoints that no segmentation path uses [C dino_v2.py: mask_token
# is only used by masked pre-training].
DINOV2_UNUSED_KEYS = ("mask_token",)


# timm's copies of the official VFM weights (timm.list_pretrained('*dinov2*'), 'eva02_large*'):
# hub repos timm/<name>, file model.safetensors, timm names at patch 14.
TIMM_WEIGHTS = {f"dinov2_{size[0]}": f"vit_{size}_patch14_dinov2.lvd142m"
                for size in ("small", "base", "large", "giant")}  # fmt: skip
TIMM_WEIGHTS["eva02_l"] = "eva02_large_patch14_224.mim_m38m"


def auto_weights(backbone: str) -> str:
    """--pretrained auto: checkpoints/<official file> when it is there, else timm's copy of the
    same weights from the hub cache or the hub; offline and uncached, one line at once."""
    official = VFM_SIZES[backbone]["weights"]
    if official is None:
        raise common.UsageError(f"--backbone {backbone} has no official weights; use "
                                "--pretrained none")  # fmt: skip
    if (Path("checkpoints") / official).is_file():
        return str(Path("checkpoints") / official)
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    repo, name = f"timm/{TIMM_WEIGHTS[backbone]}", "model.safetensors"
    if isinstance(cached := try_to_load_from_cache(repo, name), str):
        return cached
    common.require_download(f"{repo}/{name} (hub)", f"put {official} into checkpoints/, or pass "
                            "--pretrained PATH, or --pretrained none for random init")  # fmt: skip
    return hf_hub_download(repo, name)


def read_state_dict(path: str | Path, what: str, hint: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, out of the mmengine / EVA wrappers (state_dict, model...);
    a .safetensors file (timm's hub copies) read with safetensors."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # missing, truncated, not safetensors
            raise common.CheckpointError(f"cannot read {what} {path} ({type(e).__name__}): not "
                                         f"safetensors ({hint})") from None  # fmt: skip
    sd = common.read_weights_file(path, what, hint)
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise common.CheckpointError(f"{path} is not a state dict of tensors ({hint})")
    return sd


def resample_vfm_state(sd: dict[str, torch.Tensor], grid: int) -> dict[str, torch.Tensor]:
    """Rein's converters [C convert_dinov2_large_512x512.py, convert_eva2_512x512.py]: the patch
    embedding (C, 3, 14, 14) -> (C, 3, 16, 16) bicubic, values not rescaled; the position
    embedding (1, 1+g0², C) -> (1, 1+grid², C), its patch part bicubic to grid x grid by size,
    the class part kept (37x37 -> 32x32 for 512, 64x64 for 1024). Other tensors as they are."""
    sd, p = dict(sd), PATCH_SIZE
    weight = sd.get("patch_embed.proj.weight")
    if weight is not None and tuple(weight.shape[-2:]) != (p, p):
        weight = F.interpolate(weight.float(), size=(p, p), mode="bicubic", align_corners=False)
        sd["patch_embed.proj.weight"] = weight
    pos_embed = sd.get("pos_embed")
    if pos_embed is not None and int(math.sqrt(pos_embed.shape[1] - 1)) != grid:
        g0, c = int(math.sqrt(pos_embed.shape[1] - 1)), pos_embed.shape[2]
        patch = pos_embed[:, 1:].float().reshape(1, g0, g0, c).permute(0, 3, 1, 2)  # (1, C, g0, g0)
        patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=False)
        patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, c)  # (1, grid², C)
        sd["pos_embed"] = torch.cat([pos_embed[:, :1], patch], 1)
    return sd


def convert_dinov2_state(sd: dict[str, torch.Tensor], grid: int) -> dict[str, torch.Tensor]:
    """Original (or Rein-converted) DINOv2 names/shapes -> timm VisionTransformer at patch 16.
    Names are the same except ViT-G's SwiGLU (w12 -> fc1, w3 -> fc2); mask_token is dropped."""
    out = {}
    for k, v in resample_vfm_state(sd, grid).items():
        k = re.sub(r"^(blocks\.\d+\.mlp)\.w12\.", r"\1.fc1.", k)
        out[re.sub(r"^(blocks\.\d+\.mlp)\.w3\.", r"\1.fc2.", k)] = v
    return {k: v for k, v in out.items() if k not in DINOV2_UNUSED_KEYS}


def convert_eva02_state(sd: dict[str, torch.Tensor], vfm: nn.Module, grid: int) -> dict:
    """EVA02 (timm or original EVA-02 names): the same resampling as Rein's converter, then timm's
    own renaming of the EVA-02 layer names."""
    from timm.models.eva import checkpoint_filter_fn

    return checkpoint_filter_fn(resample_vfm_state(sd, grid), vfm)


def vfm_file(backbone: str) -> tuple[str, str]:
    """What a VFM weights file is called in messages, and how to get one."""
    official = VFM_SIZES[backbone]["weights"]
    get = f"download {official} into checkpoints/, " if official else ""
    hint = f"{get}pass --pretrained PATH, or --pretrained none for random init"
    return f"{backbone} weight file", hint


RELEASE_FILE = ("Rein checkpoint", "a released Rein file such as dinov2_rein_and_head.pth or "
                "iter_40000_published.pth")  # fmt: skip


def build_model(args: argparse.Namespace) -> ReinSegmentor:
    """The segmentor with its frozen VFM's weights (--pretrained) and, with --official-ckpt, a
    released Rein checkpoint. The files are read first, so a missing or unreadable one fails
    before the model is built. Built from a fixed seed so every process (and a resumed run)
    starts from the same random init."""
    path = None if args.pretrained == "none" else args.pretrained
    path = auto_weights(args.backbone) if path == "auto" else path
    vfm_state = read_state_dict(path, *vfm_file(args.backbone)) if path else None
    release = args.official_ckpt
    release_state = read_state_dict(release, *RELEASE_FILE) if release else None
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(args.seed)  # the CPU stream only: fork_rng restores it
        model = ReinSegmentor(
            args.backbone, args.crop, args.rein_tokens, None if args.full_rank else args.rein_rank
        )
    if path is not None:
        load_vfm_weights(model, path, args.backbone, args.crop, vfm_state)
    if release:
        load_official_rein(model, release, args.backbone, args.crop, release_state)
    return model


def load_vfm_weights(model: ReinSegmentor, path: str | Path, backbone: str, img_size: int,
                     state: dict[str, torch.Tensor] | None = None) -> None:  # fmt: skip
    """Load the frozen VFM's weights from `path` (or `state`, its tensors already read): exactly
    the VFM's keys, none missing, none left over."""
    sd = read_state_dict(path, *vfm_file(backbone)) if state is None else state
    if any(k.startswith("backbone.") for k in sd):  # a full segmentor file: take its VFM part
        sd = {k[9:]: v for k, v in sd.items()
              if k.startswith("backbone.") and not k.startswith("backbone.reins.")}  # fmt: skip
    vfm, grid, eva = model.backbone.vfm, img_size // PATCH_SIZE, model.backbone.is_eva
    sd = convert_eva02_state(sd, vfm, grid) if eva else convert_dinov2_state(sd, grid)
    common.load_state_strict(vfm, sd, str(path), f"check --backbone (now {backbone})")


# Our decode_head names -> mmdet Mask2FormerHead names [mmdet mask2former_head.py,
# msdeformattn_pixel_decoder.py; ConvModule keeps its conv as `.conv` and GroupNorm as `.gn`;
# mmcv MultiheadAttention wraps nn.MultiheadAttention as `.attn`; FFN = layers.0.0 / layers.1].
# Per layer: our sub-module -> theirs.
_ENCODER_LAYER = [("self_attn", "self_attn"), ("norm1", "norms.0"), ("norm2", "norms.1"),
                  ("linear1", "ffn.layers.0.0"), ("linear2", "ffn.layers.1")]  # fmt: skip
_DECODER_LAYER = [("cross_attn", "cross_attn.attn"), ("self_attn", "self_attn.attn"),
                  ("norm_cross", "norms.0"), ("norm_self", "norms.1"), ("norm_ffn", "norms.2"),
                  ("linear1", "ffn.layers.0.0"), ("linear2", "ffn.layers.1")]  # fmt: skip
_HEAD_KEY_RULES = [
    (r"pixel_decoder\.input_proj\.(\d)\.0\.", r"pixel_decoder.input_convs.\1.conv."),
    (r"pixel_decoder\.input_proj\.(\d)\.1\.", r"pixel_decoder.input_convs.\1.gn."),
    (r"pixel_decoder\.level_embed$", r"pixel_decoder.level_encoding.weight"),
    *[(rf"pixel_decoder\.encoder_layers\.(\d+)\.{a}\.", rf"pixel_decoder.encoder.layers.\1.{b}.")
      for a, b in _ENCODER_LAYER],
    (r"pixel_decoder\.lateral_conv\.0\.", r"pixel_decoder.lateral_convs.0.conv."),
    (r"pixel_decoder\.lateral_conv\.1\.", r"pixel_decoder.lateral_convs.0.gn."),
    (r"pixel_decoder\.output_conv\.0\.", r"pixel_decoder.output_convs.0.conv."),
    (r"pixel_decoder\.output_conv\.1\.", r"pixel_decoder.output_convs.0.gn."),
    (r"pixel_decoder\.mask_features\.", r"pixel_decoder.mask_feature."),
    (r"transformer_decoder\.level_embed\.", r"level_embed."),
    *[(rf"transformer_decoder\.layers\.(\d+)\.{a}\.", rf"transformer_decoder.layers.\1.{b}.")
      for a, b in _DECODER_LAYER],
    (r"transformer_decoder\.decoder_norm\.", r"transformer_decoder.post_norm."),
    (r"transformer_decoder\.class_embed\.", r"cls_embed."),
    (r"transformer_decoder\.mask_embed\.", r"mask_embed."),
    (r"querys2feat\.", r"querys2feat."),
]  # fmt: skip


def official_name(name: str) -> str:
    """Our parameter name -> the official (mmseg/mmdet) one; raises if no rule covers it."""
    if name.startswith("backbone.reins."):
        return name
    if name.startswith("decode_head."):
        rest = name[len("decode_head.") :].removeprefix("m2f.")
        for pattern, template in _HEAD_KEY_RULES:
            new, n = re.subn("^" + pattern, template, rest)
            if n:
                return "decode_head." + new
    raise KeyError(f"no official name for {name}")


def official_key_map(model: nn.Module) -> dict[str, str]:
    """{our key: official key} for every trained tensor (Rein + head)."""
    return {k: official_name(k) for k in trainable_state(model)}


def load_official_rein(model: ReinSegmentor, path: str | Path, backbone: str, img_size: int,
                       state: dict[str, torch.Tensor] | None = None) -> None:  # fmt: skip
    """A released Rein checkpoint ({'state_dict': backbone.reins.* + decode_head.*}, optionally
    with the DINOv2 keys as backbone.*) from `path` (or `state`, its tensors already read): every
    trained tensor must be present, nothing unknown."""
    sd = read_state_dict(path, *RELEASE_FILE) if state is None else state
    if any(k.startswith("backbone.") and not k.startswith("backbone.reins.") for k in sd):
        # full weights (generate_full_weights.py)
        load_vfm_weights(model, path, backbone, img_size, sd)
        sd = {k: v for k, v in sd.items() if k.startswith(("backbone.reins.", "decode_head."))}
    to_ours = {v: k for k, v in official_key_map(model).items()}
    missing, unexpected = sorted(set(to_ours) - set(sd)), sorted(set(sd) - set(to_ours))
    own = model.state_dict()
    wrong = sorted(k for k in set(sd) & set(to_ours) if own[to_ours[k]].shape != sd[k].shape)
    if missing or unexpected or wrong:
        raise common.CheckpointError(
            f"{path} does not fit this Rein model (--backbone {backbone}, --rein-tokens/"
            f"--rein-rank/--full-rank): {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(wrong)} of another "
            f"shape (e.g. {wrong[:2]})"
        )
    model.load_state_dict({to_ours[k]: v for k, v in sd.items()}, strict=False)


# =============================================================================================
# Appendix C: Benchmark
# =============================================================================================


# (backbone, batch, crop, points, evaluated image (h, w)): the paper setting on a GPU, a small one
# on CPU [C configs/dinov2/rein_dinov2_mask2former_512x512_bs1x4.py]
BENCH_SETTINGS = {"gpu": ("dinov2_l", 4, 512, MASK_POINTS, (512, 1024)),
                  "cpu": ("dinov2_s", 2, 128, 1024, (128, 256))}  # fmt: skip


def bench(args: argparse.Namespace, dist: common.Dist) -> None:
    """--bench: JSON records (common.benchmark: FLOPs, throughput, MFU on GPU, peak memory) of a
    training step, with the shares of its time in the frozen backbone (VFM + Rein forward and
    backward), MSDeformAttn and the loss (criterion with the matcher); of sliding-window evaluation;
    of MSDeformAttn alone. Settings: BENCH_SETTINGS."""
    device = dist.device
    gpu = device.type == "cuda"
    backbone, batch, crop, points, (h, w) = BENCH_SETTINGS["gpu" if gpu else "cpu"]
    steps = 10 if gpu else 3
    timing = dict(device=device, precision=common.bench_precision(args, device),
                  peak=args.peak_tflops)  # fmt: skip
    amp_ctx, scaler = common.autocast(device, args.amp)
    torch.manual_seed(0)
    model = ReinSegmentor(backbone, crop).to(device).train()
    net = common.maybe_compile(model, args)
    counts = describe_parameters(model)
    criterion = build_criterion(points).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, WEIGHT_DECAY), lr=1e-4,
                                  **common.optimizer_options(args, dist, "adamw"))  # fmt: skip
    images = torch.randn(batch, 3, crop, crop, device=device)
    targets = semantic_to_targets(torch.randint(0, 8, (batch, crop, crop), device=device))

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with amp_ctx():
            outputs = net(images)
        loss = sum(criterion(outputs, targets).values())
        (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()

    # The parts of the step, each timed alone on the step's inputs and shapes.
    def backbone_step() -> None:  # VFM + Rein forward, backward from unit output gradients
        model.zero_grad(set_to_none=True)
        with amp_ctx():
            features, queries = model.backbone(images)
        outs = [*features, queries]
        torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])

    shapes = [(crop // 32, crop // 32), (crop // 16, crop // 16), (crop // 8, crop // 8)]
    tokens = sum(h * w for h, w in shapes)
    src = torch.randn(batch, tokens, M2F_DIM, device=device, requires_grad=True)
    ref = encoder_reference_points(shapes, device)
    layers = model.decode_head.m2f.pixel_decoder.encoder_layers

    def deform_step() -> None:  # the 6 encoder MSDeformAttn of the pixel decoder
        outs = [layer.self_attn(src, ref, src, shapes) for layer in layers]
        torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])

    with amp_ctx():
        fixed = model(images)
    leaves = [fixed, *fixed["aux_outputs"]]
    leaves = [{k: d[k].detach().float().requires_grad_() for k in ("pred_logits", "pred_masks")}
              for d in leaves]  # fmt: skip
    outputs = {**leaves[0], "aux_outputs": leaves[1:]}

    def loss_step() -> None:  # criterion (10 matchings, point sampling, losses) and backward
        sum(criterion(outputs, targets).values()).backward()

    # Rounds of (whole step, each part), interleaved so that a change of the machine's load
    # touches all of them; medians over the rounds.
    fns = {"step": train_step, "backbone": backbone_step, "msdeformattn": deform_step,
           "loss": loss_step}  # fmt: skip
    rounds = {name: [] for name in fns}
    for fn in fns.values():
        common.time_step(fn, device, warmup=1, steps=1)
    for _ in range(steps):
        for name, fn in fns.items():
            rounds[name].append(common.time_step(fn, device, warmup=0, steps=1))
    median = {name: sorted(v)[len(v) // 2] for name, v in rounds.items()}
    shares = {
        **{f"share_{k}": round(median[k] / median["step"], 3) for k in fns if k != "step"},
        "shares_how": "median seconds of each part run alone on the step's inputs (backbone: VFM "
        "+ Rein forward and backward from unit output gradients; msdeformattn: the 6 encoder "
        "MSDeformAttn forward and backward; loss: criterion with matcher and backward on the "
        "step's detached outputs) / median seconds of the whole step, over rounds that time the "
        "step and each part in turn",
        "parts_s": {k: round(v, 5) for k, v in median.items()},
    }
    setting = {"backbone": backbone, "batch": batch, "crop": crop, "amp": args.amp}
    extra = {**setting, "points": points, "trainable_params": counts["trainable"],
             "rein_params": counts["rein"], "frozen_vfm_params": counts["frozen_vfm"],
             "fast": common.fast_path(args, dist), "compile": args.compile, **shares}  # fmt: skip
    common.benchmark("rein/train_step", train_step, warmup=2, steps=steps,
                     images_per_step=batch, extra=extra, **timing)  # fmt: skip

    model.eval()
    stride = default_stride(crop)
    image = torch.randn(1, 3, h, w, device=device)

    def eval_step() -> None:
        with torch.inference_mode(), amp_ctx():
            slide_segment(model, image, crop, stride)

    windows = len(common.slide_windows(h, w, crop, stride))
    common.benchmark("rein/slide_eval", eval_step, warmup=1, steps=steps, images_per_step=1,
                     extra={**setting, "image_hw": [h, w], "windows": windows},
                     **timing)  # fmt: skip

    attn = MSDeformAttn().to(device)

    def attn_step() -> None:
        attn(src, ref, src, shapes).sum().backward()

    common.benchmark("rein/msdeformattn_fwd_bwd", attn_step, warmup=2, steps=10,
                     images_per_step=batch, extra={"tokens": tokens, "batch": batch,
                     "note": "grid_sample is not in the FLOP count"}, **timing)  # fmt: skip


if __name__ == "__main__":
    common.run_cli(main)
