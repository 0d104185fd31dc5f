"""FAMix: A Simple Recipe for Language-guided Domain Generalized Segmentation.

Paper: Mohammad Fahes, Tuan-Hung Vu, Andrei Bursuc, Patrick Pérez, Raoul de Charette, CVPR 2024,
arXiv 2311.17922. Official code: github.com/astra-vision/FAMix at commit 65f7aa0. The paper body
could not be read here: [P poster] cites the CVPR poster (imgs/poster.pdf, project_page branch).

Paper -> code, in the paper's order:
  Freeze ....... freeze, trainable_modules, set_train_mode (--freeze: the freeze curve)
  Augment ...... local style mining with PIN: calc_mean_std, patchify, dominant_classes,
                 first_patch_per_class, style_words, make_prompt, encode_prompts, pin_optimize,
                 mine_styles; class-wise style banks StyleBank (run by run_mining)
  Mix .......... patch-wise style mixing: mix_statistics, target_statistics, stylize
  model ........ FAMixSegmenter = CLIPResNet (OS16) + DeepLabV3PlusHead (Appendix A)
  training ..... segmentation_loss, build_optimizer, set_lr, train; evaluation: evaluate
  official ..... map_official_state, load_clip, read_official_bank (saved_params.pkl)

Launch (--data holds gta5/ synthia/ cityscapes/ ...; layouts in the README and common.py):
  1 GPU     python famix.py --source gta --data ./data --out out/famix-gta (mines the style
            bank into out/famix-gta/style_bank.pt first when it is missing)
  torchrun  torchrun --nproc_per_node 8 famix.py --source gta --data ./data --out out/famix-gta
            (--batch-size is global: 8 as in the paper, one image per GPU, SyncBN)
  mining    python famix.py --source gta --data ./data --out out/famix-gta --mine only
  CPU toy   python famix.py --source toy --pretrained none --out out/famix-demo
  evaluate  python famix.py --eval-only --pretrained <official .pth | last.pt> --data ./data
  --pretrained: "openai" (open_clip's cache or the hub), a local OpenAI RN50.pt / RN101.pt or
  CLIP state dict, an official FAMix .pth or a famix.py checkpoint, or none (random init).

Deviations and choices (marked `DEVIATION n:` where they happen):
  1. Text targets in fp32 (official: fp16 CLIP on GPU), cached per prompt; --templates N.
  2. Bug fixes: the text-embedding size comes from the model (official: 1024, crashes RN101);
     patches are crop / (4 grid) and crop / grid pixels (official: 64 / 256 hard-coded).
  3. An empty class bank draws from the void bank (official), an empty void bank from all.
  4. Bug fixes: SYNTHIA crops and Mapillary evaluation pad labels with 255 (official: 0 = road);
     SYNTHIA is mined with its training augmentation (the official 768 crop crashes on it).
  5. After evaluating, the trained parts return to train mode for every source (official: GTA5).
  6. SGD holds only the trainable parameters (official: all backbone ones): same updates.
  7. Mining under DDP splits whole batches over the processes (official: one GPU): same bank.
  8. Ablations without official code, defined here: --style mixstyle (the same patch of another
     image of the process) and noise (Gaussian, SNR in dB of the mean square statistic), --mix-with
     mined+source, --prompt chars* / style / class, --num-styles < 20, freeze L1, L2, L4.
  9. The code's s weights the source, the poster's alpha the style: s = 1 - alpha (same law).
  10. Dominant class by one bincount (= torch.mode); a step draws from one generator per image
      (seed, iteration, sample: N processes draw as one); evaluation, mining and loader set-up
      leave the training random stream alone (exact --resume; the same run with or without a bank).
  11. Style bank file: flat tensors mu, sigma (N, C), cls (N,) + metadata (official: a pickle of
      per-class lists, read with --style-bank *.pkl); checkpoints hold the frozen encoder too.
  12. "test" size: a tiny random-init CLIP ResNet for CPU tests and the toy run (which also
      lowers the PIN lr: random layer1 features are ~100x smaller than CLIP's).
  13. A batch whose every label pixel is 255 adds a zero loss and one warning (official: nan).
  Periodic evaluation: the source val split only (official); the targets once, at the end, on
  the last weights (no selection on targets).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import pickle
import random
import re
import string
import sys
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

import common

# Fixed architecture values [C network/backbone/resnet_clip.py, network/_deeplab.py]: blocks per
# layer, width (layer1..4 give 4, 8, 16, 32 x width channels: 256 ... 2048 for the paper sizes),
# CLIP embedding size, attnpool heads, DeepLabv3+ widths (ASPP 256, low-level projection 48).
# DEVIATION 12: "test" is a tiny random-init size for CPU tests and the toy run.
BACKBONES = {
    "RN50-quickgelu": {"layers": (3, 4, 6, 3), "width": 64, "embed_dim": 1024, "heads": 32,
                       "aspp": 256, "low_proj": 48},
    "RN101-quickgelu": {"layers": (3, 4, 23, 3), "width": 64, "embed_dim": 512, "heads": 32,
                        "aspp": 256, "low_proj": 48},
    "test": {"layers": (1, 1, 1, 3), "width": 16, "embed_dim": 64, "heads": 8, "aspp": 64,
             "low_proj": 16},
}  # fmt: skip
LAYER1_STRIDE = 4  # stem (2) + avgpool (2)
OS32_LAYER1_TO_LAYER4 = 8  # layer2..layer4 strides at output stride 32
PAPER_TARGETS = "cityscapes,bdd,mapillary,synthia,acdc-night,acdc-snow,acdc-rain,acdc-fog"
NUM_CLASSES = 19  # Cityscapes trainIds, in this order [csScripts labels.py]
CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
VOID = 255  # the ignore label, and the dominant "class" of a patch that is mostly unlabelled

# [P poster, freeze curve] the last frozen layer L1 ... L4' (layer4 but its last block), L4 (all),
# and no freezing: name (= what trains with the decoder) -> (point, first trained block).
FREEZE_SCHEMES = {
    "all": ("no freezing", None),
    "layer2-4": ("L1", "layer2.0"),
    "layer3-4": ("L2", "layer3.0"),
    "layer4": ("L3", "layer4.0"),  # [C utils/freeze.py::freeze_1_2_3] Cityscapes source
    "layer4.2": ("L4'", "layer4.2"),  # [C utils/freeze.py::freeze_1_2_3_p4] GTA5, SYNTHIA
    "head": ("L4", ""),  # the encoder frozen: decoder probing
}
# [C main.py] the official scheme of each source (the toy run follows GTA5)
FREEZE_BY_SOURCE = {"gta": "layer4.2", "synthia": "layer4.2", "cityscapes": "layer4",
                    "toy": "layer4.2"}  # fmt: skip

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
TEXT_BATCH = 512  # texts per text-encoder call
# [P poster, prompt table] random style / random characters ("wqvsecpas style": 9 letters) and/or
# the class name; "style-class" is FAMix.
PROMPTS = ("style-class", "chars-class", "style", "chars", "class")
CHARS_LENGTH = 9


# =============================================================================================
# 1. The method
# =============================================================================================
# Freeze [C utils/freeze.py] -> Augment: local style mining with PIN [C patch_PIN.py,
# utils/PPIN.py] -> Mix: patch-wise style mixing of the layer1 features [C network/utils.py].


# ---- Freeze ---------------------------------------------------------------------------------
def freeze(model: FAMixSegmenter, scheme: str) -> None:
    """requires_grad=False up to the scheme's first trained block; frozen modules also stay in
    eval mode (set_train_mode), their BNs keep CLIP's statistics [C utils/freeze.py]."""
    first = FREEZE_SCHEMES[scheme][1]
    names = [name for name, _ in model.encoder.blocks()]
    model.frozen_depth = None if first is None else names.index(first) if first else len(names)
    model.requires_grad_(True)
    model.encoder.requires_grad_(model.frozen_depth is None)
    for _, block in model.encoder.blocks()[model.frozen_depth or 0 :]:
        block.requires_grad_(True)


def trainable_modules(model: FAMixSegmenter) -> list[nn.Module]:
    if model.frozen_depth is None:
        return [model]
    return [block for _, block in model.encoder.blocks()[model.frozen_depth :]] + [model.head]


def set_train_mode(model: FAMixSegmenter) -> None:
    """Never model.train() on everything: only the trainable parts leave eval mode."""
    model.eval()
    for module in trainable_modules(model):
        module.train()


# ---- Augment: local style mining with PIN ---------------------------------------------------
def calc_mean_std(x: Tensor, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std over the last two (spatial) dims, keepdim.
    [C utils/stats.py::calc_mean_std] mu = mean(x), sigma = sqrt(unbiased var(x) + 1e-5)."""
    flat = x.flatten(-2)  # (..., h*w)
    mu = flat.mean(-1)[..., None, None]
    sigma = (flat.var(-1, unbiased=True) + eps).sqrt()[..., None, None]
    return mu, sigma


def patchify(x: Tensor, grid: int) -> Tensor:
    """(B, C, H, W) -> (B, grid*grid, C, H/grid, W/grid); patch p = row * grid + col (row-major,
    the order of unfold in the official code)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, grid, h // grid, grid, w // grid)  # (B, C, gy, h, gx, w)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, h // grid, w // grid)


def unpatchify(patches: Tensor, grid: int) -> Tensor:
    """Inverse of patchify: (B, grid*grid, C, h, w) -> (B, C, grid*h, grid*w)."""
    b, _, c, h, w = patches.shape
    x = patches.reshape(b, grid, grid, c, h, w).permute(0, 3, 1, 4, 2, 5)  # (B, C, gy, h, gx, w)
    return x.reshape(b, c, grid * h, grid * w)


def dominant_classes(labels: Tensor, grid: int, num_classes: int = NUM_CLASSES) -> Tensor:
    """Most frequent label of each patch, void (255) pixels included; ties go to the smallest id
    (void, 255, is the largest): exactly torch.mode [C patch_PIN.py]. (B, H, W) -> (B, grid*grid).
    DEVIATION 10: counted with one bincount instead of torch.mode (same result, faster on GPU)."""
    patches = patchify(labels[:, None], grid).flatten(2)  # (B, P, h*w)
    b, p, _ = patches.shape
    bins = torch.where((patches >= 0) & (patches < num_classes), patches, num_classes)  # void last
    offset = torch.arange(b * p, device=labels.device).view(b, p, 1) * (num_classes + 1)
    counts = torch.bincount((bins + offset).flatten(), minlength=b * p * (num_classes + 1))
    dom = counts.view(b, p, num_classes + 1).argmax(-1)  # first maximum = smallest id
    return torch.where(dom == num_classes, VOID, dom)


def first_patch_per_class(dom: Tensor) -> tuple[Tensor, Tensor, Tensor]:
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


def style_words(prompt: str, n: int, seed: int) -> tuple[str, ...]:
    """R, |R| = n: the first n official styles [C patch_PIN.py]. DEVIATION 8: for chars* prompts,
    n strings of 9 random letters + " style", drawn once from `seed`."""
    if not prompt.startswith("chars"):
        return STYLE_PROMPTS[:n]
    rng = random.Random(seed)
    words = ("".join(rng.choices(string.ascii_lowercase, k=CHARS_LENGTH)) for _ in range(n))
    return tuple(w + " style" for w in words)


def make_prompt(cls: int, prompt: str, styles: tuple[str, ...], rng: random.Random) -> str:
    """[P poster, prompt table] style-class (FAMix): "<r> <class>", r drawn from R, "photo" for
    void [C patch_PIN.py]. DEVIATION 8: chars-class alike with r = "<chars> style"; class:
    "<class>" (void: "photo"); style / chars: "<r>" for every patch, void included."""
    with_class = prompt in ("style-class", "chars-class", "class")
    if with_class and cls == VOID:
        return VOID_PROMPT
    if prompt == "class":
        return CLASS_NAMES[cls]
    r = rng.choice(styles)
    return f"{r} {CLASS_NAMES[cls]}" if with_class else r


@torch.no_grad()
def encode_prompts(clip_model, tokenizer, prompts: list[str], templates: tuple, device) -> Tensor:
    """Text targets [C patch_PIN.py]: t = normalize(mean_k E_text(template_k(prompt))), the raw
    embeddings of every template (TEMPLATES, Appendix B) averaged, then L2-normalised: (N, D).
    DEVIATION 1: fp32 (official: fp16 CLIP on GPU). DEVIATION 2: embed_dim from the model."""
    texts = [t.format(p) for p in prompts for t in templates]
    chunks = tokenizer(texts).split(TEXT_BATCH)  # (N*T, 77) tokens; bounded memory per call
    emb = torch.cat([clip_model.encode_text(c.to(device)).float() for c in chunks])
    emb = emb.view(len(prompts), len(templates), -1).mean(1)  # (N, D)
    return F.normalize(emb, dim=-1)


def pin_optimize(
    patches: Tensor, targets: Tensor, embed: Callable[[Tensor], Tensor], iters: int, lr: float,
    momentum: float, weight_decay: float,
) -> tuple[Tensor, Tensor, list[float]]:  # fmt: skip
    """Prompt-driven Instance Normalisation [C utils/PPIN.py] on K patches at once. mu, sigma in
    R^C start at the patch's own statistics (identity at init) and are optimised with a fresh SGD
    (lr 1, momentum 0.9, wd 1e-4, sigma not clamped) [C patch_PIN.py].
    patches (K, C, h, w) -> mu, sigma (K, C) and the loss of every step."""
    patches = patches.float()
    mu_p, sigma_p = calc_mean_std(patches)  # (K, C, 1, 1)
    x_hat = (patches - mu_p) / sigma_p  # [P poster] (f - mu(f)) / sigma(f)
    mu, sigma = mu_p.clone().requires_grad_(True), sigma_p.clone().requires_grad_(True)
    opt = torch.optim.SGD([mu, sigma], lr=lr, momentum=momentum, weight_decay=weight_decay)
    losses = []
    for _ in range(iters):
        # [P poster] PIN(f) = sigma * (f - mu(f)) / sigma(f) + mu, then ReLU [C utils/PPIN.py]
        e = embed(F.relu(sigma * x_hat + mu))  # (K, D)
        # [C patch_PIN.py] L = mean_k (1 - cos(e_k, t_k)), e_k the CLIP embedding of patch k
        loss = (1 - F.cosine_similarity(e, targets, dim=-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())  # no .item() here: no device sync per step
    losses = torch.stack(losses).tolist() if losses else []
    return mu.detach().flatten(1), sigma.detach().flatten(1), losses


def mine_styles(
    encoder: CLIPResNet, text_targets: Callable[[list[str]], Tensor], batches, n_batches: int,
    grid: int, pin_cfg: dict, prompt_for: Callable[[int], str], log: Callable = print,
) -> dict:  # fmt: skip
    """Local style mining, one pass [C patch_PIN.py]. `encoder`: the CLIP image tower (OS32,
    attnpool, frozen); `batches` yields normalised images (B,3,H,W) and labels (B,H,W); `prompt_for`
    maps a class to its prompt. Returns one (mu (K, C), sigma (K, C), cls (K,)) per batch, CPU."""
    # [C patch_PIN.py --resize_feat] patches are pooled so that layer4 (OS32) gives the 7x7 grid
    # attnpool's positional embedding was trained on: 7 * 8 = 56.
    grid7 = round((encoder.attnpool.positional_embedding.shape[0] - 1) ** 0.5)
    feat_size = grid7 * OS32_LAYER1_TO_LAYER4

    def embed(styled: Tensor) -> Tensor:
        return encoder.embed_low_level(F.adaptive_avg_pool2d(styled, feat_size))

    found = []  # (mu, sigma, cls) of each batch
    for i in range(n_batches):
        images, labels = next(batches)
        with torch.no_grad():
            f1 = encoder.layer1(encoder.stem(images))  # (B, 256, H/4, W/4)
        dom = dominant_classes(labels, grid)  # (B, P)
        b_idx, p_idx, cls = first_patch_per_class(dom)
        patches = patchify(f1, grid)[b_idx, p_idx]  # (K, C, h, w)
        targets = text_targets([prompt_for(c) for c in cls.tolist()])  # (K, D)
        t0 = time.perf_counter()
        mu, sigma, losses = pin_optimize(patches, targets, embed, **pin_cfg)
        found.append((mu.cpu(), sigma.cpu(), cls.cpu()))
        loss = f"1 - cos {losses[0]:.4f} -> {losses[-1]:.4f} ({time.perf_counter() - t0:.1f} s)"
        log(f"mining batch {i + 1}/{n_batches}: {len(cls)} patches, {loss}")
    return found


class StyleBank:
    """The class-wise style banks T^(c) [P poster], flat: rows sorted by class, start and size of
    each class's block; VOID (255) is the void bank. DEVIATION 3: 256 is the whole bank."""

    ALL = VOID + 1

    def __init__(self, mu: Tensor, sigma: Tensor, cls: Tensor):
        order = torch.argsort(cls, stable=True)
        self.mu, self.sigma, self.cls = mu[order].float(), sigma[order].float(), cls[order].long()
        count = torch.bincount(self.cls, minlength=self.ALL)  # (256,), then ALL: the whole bank
        self.count = torch.cat([count, count.sum()[None]])
        self.start = torch.cat([torch.cumsum(count, 0) - count, count.new_zeros(1)])

    def to(self, device: torch.device) -> StyleBank:
        for name in ("mu", "sigma", "cls", "count", "start"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def sample(self, dom: Tensor, gens: list | None = None) -> tuple[Tensor, Tensor]:
        """A uniformly drawn style of each patch's class; empty class -> void bank
        [C network/utils.py]. dom (B, P) -> mu_t, sigma_t (B, P, C); image k draws from gens[k]."""
        c = torch.where(self.count[dom] > 0, dom, VOID)
        c = torch.where(self.count[c] > 0, c, self.ALL)
        u = per_sample(lambda g: torch.rand(dom.shape[1:], generator=g, device=dom.device),
                       gens or [None] * len(dom))  # fmt: skip
        offset = torch.minimum((u * self.count[c]).long(), self.count[c] - 1)
        idx = self.start[c] + offset
        return self.mu[idx], self.sigma[idx]


# ---- Mix: patch-wise style mixing -----------------------------------------------------------
def per_sample(draw: Callable[[torch.Generator | None], Tensor], gens: list) -> Tensor:
    """One draw per image, image k's from gens[k] (None: the global stream), stacked."""
    return torch.stack([draw(g) for g in gens])


def sample_beta(a: float, shape: tuple, g: torch.Generator | None, device) -> Tensor:
    """Beta(a, a) drawn from g. torch's Beta (its Gamma) takes no generator: it samples the CPU
    stream, seeded here from g inside fork_rng, which puts the global stream back after."""
    seed = int(torch.randint(2**62, (), generator=g, device=device))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return torch.distributions.Beta(float(a), float(a)).sample(shape).to(device)


def mix_statistics(x_hat: Tensor, mu_s: Tensor, sigma_s: Tensor, mu_t: Tensor, sigma_t: Tensor,
                   s: Tensor) -> Tensor:  # fmt: skip
    """sigma_mix * x_hat + mu_mix, before the ReLU. DEVIATION 9: (a convention) the code's s
    weights the source, s = 1 - alpha of the poster (Beta symmetric)."""
    # [P poster] mu_mix = (1 - alpha) mu(f) + alpha mu_t  [C network/utils.py] s = 1 - alpha
    mu_mix = s * mu_s + (1 - s) * mu_t
    # [P poster] sigma_mix = (1 - alpha) sigma(f) + alpha sigma_t
    sigma_mix = s * sigma_s + (1 - s) * sigma_t
    return sigma_mix * x_hat + mu_mix


def target_statistics(
    mode: str, mu_s: Tensor, sigma_s: Tensor, labels: Tensor, bank: StyleBank | None, grid: int,
    noise_snr: float, mix_with: str = "mined", gens: list | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The statistics each patch (B, P, C, 1, 1) is mixed with. famix / pure: a mined style of its
    dominant class (label patch (r, c) <-> feature patch (r, c)) [C network/utils.py].
    DEVIATION 8: mixstyle, the same patch of another image of the process's batch (itself if
    alone: N processes draw among fewer images than one); noise, its own statistics plus
    Gaussian noise at `noise_snr` dB; mix_with "mined+source" [P poster: source u mined], a fair
    coin per (image, patch) picks the mined style or the mixstyle partner. Image k: gens[k]."""
    b, dev, gens = mu_s.shape[0], mu_s.device, gens or [None] * mu_s.shape[0]
    if mode in ("famix", "pure"):
        mu_t, sigma_t = bank.sample(dominant_classes(labels, grid), gens)  # (B, P, C)
        mu_t, sigma_t = mu_t[..., None, None], sigma_t[..., None, None]
        if mix_with == "mined":
            return mu_t, sigma_t
        mu_o, sigma_o = target_statistics("mixstyle", mu_s, sigma_s, labels, bank, grid, noise_snr,
                                          gens=gens)  # fmt: skip
        coin = per_sample(lambda g: torch.rand(mu_s.shape[1], generator=g, device=dev), gens)
        source = coin[..., None, None, None] < 0.5  # (B, P, 1, 1, 1)
        return torch.where(source, mu_o, mu_t), torch.where(source, sigma_o, sigma_t)
    if mode == "mixstyle":  # image k -> (k + 1 + j) mod B, j uniform in [0, B - 2]
        j = per_sample(lambda g: torch.randint(max(b - 1, 1), (), generator=g, device=dev), gens)
        perm = (torch.arange(b, device=dev) + 1 + j) % b
        return mu_s[perm], sigma_s[perm]
    if mode == "noise":  # v + N(0, mean(v^2) / snr), the mean square over the C channels
        snr = 10 ** (noise_snr / 10)
        n = per_sample(lambda g: torch.randn(2, *mu_s.shape[1:], generator=g, device=dev), gens)
        mu_n, sigma_n = [v + n[:, i] * (v.pow(2).mean(2, keepdim=True) / snr).sqrt()
                         for i, v in enumerate((mu_s, sigma_s))]  # fmt: skip
        return mu_n, sigma_n
    raise ValueError(f"unknown style mode {mode!r}")


def stylize(
    f1: Tensor, labels: Tensor, bank: StyleBank | None, mode: str, grid: int, beta: float,
    noise_snr: float, mix_with: str = "mined", gens: list | None = None,
) -> Tensor:  # fmt: skip
    """Patch-wise style mixing of every image, every iteration [C network/utils.py], in fp32.
    f1 (B, C, H, W) post-ReLU layer1 features; labels (B, 4H, 4W) of the same crop; gens: one
    generator per image, drawing all its random numbers (None: the global stream)."""
    gens = gens or [None] * f1.shape[0]
    with torch.autocast(f1.device.type, enabled=False):
        patches = patchify(f1.float(), grid)  # (B, P, C, h, w)
        mu_s, sigma_s = calc_mean_std(patches)  # (B, P, C, 1, 1)
        x_hat = (patches - mu_s) / sigma_s  # [P poster] (f - mu(f)) / sigma(f)
        mu_t, sigma_t = target_statistics(mode, mu_s, sigma_s, labels, bank, grid, noise_snr,
                                          mix_with, gens)  # fmt: skip
        b, c = f1.shape[:2]
        if mode == "pure":
            s = f1.new_zeros(b, c, 1, 1, dtype=torch.float32)  # (B, C, 1, 1)
        else:
            # [C network/utils.py] s ~ Beta(0.1, 0.1), one per image and channel
            s = per_sample(lambda g: sample_beta(beta, (c, 1, 1), g, f1.device), gens)  # (B,C,1,1)
        # f' = ReLU(sigma_mix * x_hat + mu_mix) [C network/utils.py]; s shared by the P patches
        out = F.relu(mix_statistics(x_hat, mu_s, sigma_s, mu_t, sigma_t, s[:, None]))
        return unpatchify(out, grid).to(f1.dtype)


# =============================================================================================
# 2. Model
# =============================================================================================
# The segmenter: CLIP ModifiedResNet at output stride 16 and DeepLabv3+ (both in Appendix A).


class FAMixSegmenter(nn.Module):
    """CLIP ResNet (OS16) + DeepLabv3+. `stylize`, if given, replaces the layer1 features (input
    of layer2 AND of the decoder's low-level skip) [C network/utils.py]; `gens` draw the dropout.
    The frozen part (up to `frozen_depth` blocks after layer1, set by freeze) runs under no_grad."""

    def __init__(self, backbone: str = "RN50-quickgelu", num_classes: int = NUM_CLASSES):
        super().__init__()
        cfg = BACKBONES[backbone]
        self.encoder = CLIPResNet(backbone, output_stride=16, attnpool=False)
        low, high = self.encoder.low_channels, self.encoder.high_channels
        self.head = DeepLabV3PlusHead(low, high, cfg["aspp"], cfg["low_proj"], num_classes)
        self.frozen_depth: int | None = None  # None = nothing frozen

    def forward(self, x: Tensor, stylize: Callable | None = None, gens: list | None = None):
        with torch.no_grad() if self.frozen_depth is not None else nullcontext():
            low = self.encoder.layer1(self.encoder.stem(x))  # (B, 256, H/4, W/4)
            if stylize is not None:
                low = stylize(low)
            high = low
            for _, block in self.encoder.blocks()[: self.frozen_depth or 0]:
                high = block(high)
        logits = self.trained(low, high, gens)  # (B, 19, H/4, W/4)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def trained(self, low: Tensor, high: Tensor, gens: list | None = None) -> Tensor:
        """The trained part: the encoder blocks after the frozen ones, then the decoder."""
        for _, block in self.encoder.blocks()[self.frozen_depth or 0 :]:
            high = block(high)  # ends at (B, 2048, H/16, W/16)
        return self.head(low, high, gens)


# =============================================================================================
# 3. Data and augmentation
# =============================================================================================


def train_transform(source: str, crop: int, jitter: bool = True) -> common.Transform:
    """[C utils/get_dataset.py] GTA5 / Cityscapes / toy: random crop; SYNTHIA: random scale 0.5-2
    (bicubic), crop 720, resize to 768. Then ColorJitter(0.8, 0.8, 0.8) and flip (mining: without,
    jitter=False, except SYNTHIA, which the official code mines with --data_aug)."""

    def transform(image, label, g):
        if source == "synthia":
            pre = round(crop * 720 / 768)
            image, label = common.random_scale(image, label, (0.5, 2.0), g, image_interp="bicubic")
            # DEVIATION 4: pads labels with 255 (official RandomSizeAndCrop: 0 = road)
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
    """[C utils/get_dataset.py] GTA5's 12,382-image list, SYNTHIA's 6,580 RobustNet training
    frames, Cityscapes train (2,975)."""
    return common.build_dataset(args.source, args.data, "train", gta_list="famix",
                                transform=transform)  # fmt: skip


GTA_VAL_CROP_HW = (1046, 1914)  # [C utils/get_dataset.py] centre crop of GTA5 val


def center_crop(image: Tensor, label: Tensor, g: torch.Generator, size_hw=GTA_VAL_CROP_HW):
    h, w = image.shape[-2:]
    ch, cw = min(size_hw[0], h), min(size_hw[1], w)
    y, x = (h - ch) // 2, (w - cw) // 2
    return image[:, y : y + ch, x : x + cw], label[y : y + ch, x : x + cw]


def eval_dataset(name: str, args: argparse.Namespace):
    """A target, or "source-val" [C utils/get_dataset.py]: GTA5's 1,000-image list centre-cropped,
    SYNTHIA's 2,820 RobustNet val frames, Cityscapes val."""
    name = args.source if name == "source-val" else name
    crop = center_crop if name in ("gta", "toy") else None
    return common.build_dataset(name, args.data, "val", gta_list="famix", transform=crop)


# Per-target input geometry [C utils/get_dataset.py]: Mapillary is resized to height 1536
# (bicubic, label nearest) and centre-cropped to 1536x1536, the rest fed whole at native size.
# DEVIATION 4: narrower Mapillary images are padded with label 255 (official: 0 = road).
EVAL_RESIZE = {"mapillary": common.EvalResize(("height_crop", 1536), resize_gt=True,
                                              image_interp="bicubic")}  # fmt: skip


# =============================================================================================
# 4. Training
# =============================================================================================


def segmentation_loss(logits: Tensor, labels: Tensor, label_smoothing: float) -> Tensor:
    """[C main.py] L = mean over labelled pixels of (1 - 0.1) (-log p_y) + 0.1 mean_c (-log p_c):
    cross-entropy, ignore 255, label smoothing 0.1 (official code; paper body unchecked)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=common.IGNORE_INDEX,
                           label_smoothing=label_smoothing)  # fmt: skip


def build_optimizer(model: FAMixSegmenter, args, options: dict | None = None) -> torch.optim.SGD:
    """SGD: encoder lr 0.01, decoder lr 0.1, momentum 0.9, wd 1e-4 [C main.py]; `options`: foreach
    on the fast path. DEVIATION 6: only the trainable parameters are handed to SGD."""
    enc = [p for p in model.encoder.parameters() if p.requires_grad]
    head = list(model.head.parameters())
    groups = [{"params": enc, "lr": args.backbone_lr, "base_lr": args.backbone_lr},
              {"params": head, "lr": args.lr, "base_lr": args.lr}]  # fmt: skip
    return torch.optim.SGD([g for g in groups if g["params"]], lr=args.lr, momentum=args.momentum,
                           weight_decay=args.weight_decay, **(options or {}))  # fmt: skip


def set_lr(optimizer: torch.optim.Optimizer, iteration: int, args: argparse.Namespace) -> float:
    """Poly schedule, stepped every iteration; returns the decoder's lr."""
    for group in optimizer.param_groups:
        # [C utils/scheduler.py::PolyLR] lr_t = max(lr_0 (1 - t/T)^0.9, 1e-6)
        group["lr"] = common.poly_lr(group["base_lr"], iteration, args.iters, args.poly_power,
                                     args.min_lr)  # fmt: skip
    return optimizer.param_groups[-1]["lr"]


def save_checkpoint(args, iteration, model, optimizer, scaler) -> None:
    """out/last.pt (common.save_checkpoint writes it on rank 0). DEVIATION 11: the whole model,
    --eval-only needs no CLIP weights."""
    common.save_checkpoint(
        Path(args.out) / "last.pt", method="famix", iteration=iteration,
        model_state=model.state_dict(), optimizer=optimizer, scaler=scaler, args=args,
    )  # fmt: skip


def run_mining(args, dist, clip_model, encoder_state: dict, dataset, bank_path: Path) -> None:
    """Augment, run once before training: mine the style bank and save it (rank 0). DEVIATION 7:
    each process mines whole batches of --mine-batch-size."""
    import open_clip

    encoder = CLIPResNet(args.backbone, output_stride=32, attnpool=True)
    common.load_state_strict(encoder, encoder_state, "the CLIP image tower", "check --backbone")
    fmt, device = common.memory_format(args, dist), dist.device
    encoder.to(device, memory_format=fmt).eval().requires_grad_(False)
    clip_model.to(device).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer("RN50-quickgelu")  # the CLIP BPE, the same for all sizes
    templates = TEMPLATES[: args.templates]
    cache: dict[str, Tensor] = {}

    def text_targets(prompts: list[str]) -> Tensor:
        new = sorted({p for p in prompts if p not in cache})
        if new:
            cache.update(zip(new, encode_prompts(clip_model, tokenizer, new, templates, device)))
        return torch.stack([cache[p] for p in prompts])  # (K, D)

    dataset = copy.copy(dataset)
    dataset.transform = train_transform(args.source, args.crop, jitter=False)
    global_batch = args.mine_batch_size * dist.world_size
    n_batches = args.mine_batches or len(dataset) // global_batch  # one pass, drop_last
    if n_batches == 0:
        raise common.UsageError(f"fewer source images than one mining batch of {global_batch}")
    loader = common.TrainLoader(dataset, global_batch, dist, args.seed + 1, args.workers)

    def batches():  # DEVIATION 7: the prompts of a batch drawn from (seed, its index on 1 process)
        for i in range(n_batches):
            rng.seed(f"{args.seed}:{i * dist.world_size + dist.rank}")
            images, labels, _ = next(loader)
            images = common.normalize(images.to(device), common.CLIP_MEAN, common.CLIP_STD)
            yield images.contiguous(memory_format=fmt), labels.to(device)

    styles = style_words(args.prompt, args.num_styles, args.seed)
    rng = random.Random()
    prompt_for = partial(make_prompt, prompt=args.prompt, styles=styles, rng=rng)
    common.print0(f"mining styles: {n_batches} batches of {args.mine_batch_size} per process, "
                  f"{args.pin_iters} PIN steps, {len(templates)} templates, prompt {args.prompt}, "
                  f"|R| {len(styles)}")  # fmt: skip
    pin_cfg = {"iters": args.pin_iters, "lr": args.pin_lr, "momentum": args.pin_momentum,
               "weight_decay": args.pin_weight_decay}  # fmt: skip
    t0 = time.perf_counter()
    found = mine_styles(encoder, text_targets, batches(), n_batches, args.grid, pin_cfg,
                        prompt_for, common.print0)  # fmt: skip
    if dist.enabled:  # DEVIATION 7: every rank gets every batch, in the order of one process
        gathered = [None] * dist.world_size
        torch_dist.all_gather_object(gathered, found)
        found = [batch for group in zip(*gathered) for batch in group]
    bank = {k: torch.cat(t) for k, t in zip(("mu", "sigma", "cls"), zip(*found))}
    meta = {"backbone": args.backbone, "pretrained": args.pretrained, "crop": args.crop,
            "grid": args.grid, "fingerprint": encoder_fingerprint(encoder_state),
            "pin_iters": args.pin_iters, "pin_lr": args.pin_lr, "templates": len(templates),
            "prompt": args.prompt, "num_styles": args.num_styles,
            "batches": n_batches * dist.world_size}  # fmt: skip
    if dist.is_main:
        save_style_bank(bank_path, bank, meta)
    sizes = torch.bincount(bank["cls"], minlength=VOID + 1).tolist()  # (256,)
    names = dict(enumerate(CLASS_NAMES)) | {VOID: "void"}
    per_class = {names[c]: n for c, n in enumerate(sizes) if n}
    common.print0(f"style bank: {len(bank['cls'])} styles in {time.perf_counter() - t0:.1f} s -> "
                  f"{bank_path}; per class {per_class}")  # fmt: skip
    clip_model.cpu()


def prepare_style_bank(args, dist, model, clip_model, encoder_state, dataset) -> StyleBank | None:
    """Mine --style-bank when the file is missing (run_mining), then read it; an existing file is
    reused (one warning line if it was mined with other settings)."""
    if args.style not in ("famix", "pure") and args.mine != "only":
        return None
    path = Path(args.style_bank)
    if not path.is_file():
        if args.mine == "never" or path.suffix == ".pkl" or clip_model is None:
            raise common.UsageError(f"style bank {path} is missing; mining it needs CLIP "
                                    "weights (not --resume or a segmentation checkpoint) and "
                                    "--mine auto or only (.pkl banks are only read)")  # fmt: skip
        with common.rng_neutral():  # DEVIATION 10: mining or not, training draws the same numbers
            run_mining(args, dist, clip_model, encoder_state, dataset, path)
    if dist.enabled:
        torch_dist.barrier()
    fingerprint = encoder_fingerprint(model.encoder.state_dict())
    bank, meta = load_style_bank(path, args.backbone, fingerprint, model.encoder.low_channels)
    keys = [k for k in ("grid", *MINING_FLAGS) if k in meta and meta[k] != getattr(args, k)]
    differ = ", ".join(f"--{k.replace('_', '-')} {meta[k]}" for k in keys)
    if differ:
        common.warn(f"reusing {path}, mined with {differ}; delete it to mine again")
    common.print0(f"style bank {path}: {len(bank.cls)} styles")
    return bank.to(dist.device)


def train(args, dist, log, model, optimizer, scaler, loader, targets, start, net, bank) -> dict:
    """Mix on every image, cross-entropy, SGD with the poly schedule [C main.py]. `net`: the model
    as called (DDP); `bank`: the StyleBank or None."""
    amp_ctx, _ = common.autocast(dist.device, args.amp)
    fmt = common.memory_format(args, dist)
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
            # METHOD: learning rate of this iteration [C utils/scheduler.py]
            lr = set_lr(optimizer, it, args)
            # METHOD: Mix, the layer1 patches restyled with mined styles [C network/utils.py]
            images, labels, _ = batch
            labelled = bool((labels != common.IGNORE_INDEX).any())
            images = common.normalize(images.to(dist.device, non_blocking=True), common.CLIP_MEAN,
                                      common.CLIP_STD).contiguous(memory_format=fmt)  # fmt: skip
            labels = labels.to(dist.device, non_blocking=True)
            # every draw of image k (style, Beta weights, dropout) from gens[k]: (seed, it, sample)
            gens = common.step_generators(args.seed, it, args.batch_size, dist)
            mix = None if args.style == "none" else partial(
                stylize, labels=labels, bank=bank, mode=args.style, grid=args.grid,
                beta=args.beta, noise_snr=args.noise_snr, mix_with=args.mix_with,
                gens=gens)  # fmt: skip
            # METHOD: forward (the frozen part without gradients) and cross-entropy [C main.py]
            with amp_ctx():
                logits = net(images, stylize=mix, gens=gens)
            if labelled:
                loss = segmentation_loss(logits, labels, args.label_smoothing)
            else:  # DEVIATION 13: no labelled pixel, no CE (0 / 0); zero, DDP processes in step
                common.warn(f"iteration {it + 1}: every label pixel of the batch is 255: zero loss")
                loss = logits.sum() * 0.0
            terms = {"loss": loss.item()}
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
                # METHOD: source val periodically, every target at the end [C main.py]
                sets = targets if done == args.iters else {"source-val": targets["source-val"]}
                results = evaluate(model, sets, args, dist)
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


def evaluate(model: FAMixSegmenter, targets: dict, args: argparse.Namespace, dist) -> dict:
    """mIoU (nanmean of 19 IoUs, one confusion matrix per dataset) and per-class IoU of each target
    (name -> Dataset) [C metrics/stream_metrics.py]; SYNTHIA runs add the 16- and 13-class means."""
    model.eval()
    amp_ctx, _ = common.autocast(dist.device, args.amp)
    fmt, scale = common.memory_format(args, dist), args.scale

    def predict(images: Tensor) -> Tensor:
        """uint8 (1,3,H,W) -> logits (1,19,H,W), whole image at native resolution [C main.py].
        --scale s: bilinear (align_corners=True) down by s, predict, bilinear back [C main.py]."""
        x = common.normalize(images, common.CLIP_MEAN, common.CLIP_STD)
        x = x.contiguous(memory_format=fmt)
        with amp_ctx():
            logits = None if scale != 1 and not args.ensemble else model(x).float()
            if scale != 1:
                xs = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=True)
                ls = model(xs).float()
                ls = F.interpolate(ls, size=x.shape[-2:], mode="bilinear", align_corners=True)
                # [C main.py] --ensemble: (logits@1 + logits@s) / 2
                logits = ls if logits is None else (logits + ls) / 2
        return logits

    subsets = {"16": common.SYNTHIA16, "13": common.SYNTHIA13} if args.source == "synthia" else None
    results = {}
    with common.rng_neutral():  # DEVIATION 10: evaluating leaves the training random stream
        for name, dataset in targets.items():
            results[name] = common.evaluate_dataset(
                predict, dataset, resize=EVAL_RESIZE.get(name, common.EvalResize()), dist=dist,
                miou_mode="nanmean", align_corners=True, workers=args.workers,
                batch_size=args.eval_batch_size, save_preds=args.save_preds,
                save_dir=Path(args.out) / "preds" / name, subsets=subsets, desc=name,
            )  # fmt: skip
    set_train_mode(model)  # DEVIATION 5: for every source (official: GTA5 only)
    return results


# =============================================================================================
# 6. Command line and main
# =============================================================================================


def build_parser() -> argparse.ArgumentParser:
    parser = common.make_parser(__doc__.split("\n\n")[0])
    common.add_shared_flags(
        parser, source="gta", targets=PAPER_TARGETS, iters=40000, batch_size=8, crop=768,
        amp=False, pretrained="openai", eval_every=750, log_every=50, workers=4,
        cite={"iters": "paper: 40000 [C main.py]", "batch_size": "paper: 8 [C main.py]",
              "crop": "paper: 768 [C main.py]", "amp": "official: fp32 [C main.py]",
              "eval_every": "official: 750, source val only [C main.py]",
              "targets": "paper: the 8 targets of the main table [P poster]",
              "pretrained": "official: OpenAI CLIP [C network/modeling.py]"},
    )  # fmt: skip
    pos_float, pos_int, choice = common.positive_float, common.positive_int, FREEZE_SCHEMES.items()
    unit, nonneg = common.unit_float, common.nonnegative_float
    freeze = ", ".join(f"{name} = {point}" for name, (point, _) in choice)

    def h(text: str, cite: str = "") -> str:
        return f"{text} (default %(default)s{'; ' + cite if cite else ''})"

    a = parser.add_argument_group("FAMix").add_argument
    # fmt: off
    a("--backbone", default="RN50-quickgelu", choices=list(BACKBONES), help=h("CLIP ResNet; test = "
      "tiny random-init size for CPU tests and the toy run", "paper: RN50, RN101 [C main.py --BB]"))
    a("--freeze", choices=list(FREEZE_SCHEMES), help=h("what trains besides the decoder (the rest "
      f"of the encoder is frozen), as the points of the paper's freeze curve: {freeze}",
      "official: layer4.2 for GTA5 and SYNTHIA, layer4 for Cityscapes [C utils/freeze.py]; curve "
      "[P poster]"))
    a("--style", default="famix", choices=["famix", "none", "pure", "mixstyle", "noise"], help=h(
      "layer1 augmentation: famix = mined styles mixed with Beta weights; none = Freeze only; pure "
      "= mined style, no mixing (s = 0); mixstyle = mixed with another image's statistics; noise "
      "= with Gaussian-noise statistics", "ablations [P poster]"))
    a("--prompt", default="style-class", choices=PROMPTS, help=h("mining prompt: random style "
      "and/or random characters and/or class name, e.g. 'Galactic Fantasy style road', 'wqvsecpas "
      "style road', 'road'", "official [C patch_PIN.py]; [P poster] prompt table"))
    a("--num-styles", type=pos_int, default=20, help=h("|R|: prompts draw from the first N of the "
      "20 official styles (N <= 20), or from N random strings with --prompt chars*", "official "
      "[C patch_PIN.py]"))
    a("--mix-with", default="mined", choices=["mined", "mined+source"], help=h(
      "mixing partner: mined styles, or mined styles and the source patches' own statistics (a "
      "fair coin per patch)", "official: mined; [P poster] source u mined"))
    a("--beta", type=pos_float, default=0.1, help=h("s ~ Beta(a, a)", "paper [C network/utils.py]"))
    a("--noise-snr", type=float, default=15.0, help=h("--style noise: SNR in dB", "[P poster]"))
    a("--grid", type=pos_int, default=3, help=h("patches per side", "paper [C patch_PIN.py]"))
    a("--lr", type=pos_float, default=0.1, help=h("decoder learning rate", "paper [C main.py]"))
    a("--backbone-lr", type=pos_float, default=0.01, help=h("encoder lr", "paper [C main.py]"))
    a("--momentum", type=unit, default=0.9, help=h("SGD momentum", "paper [C main.py]"))
    a("--weight-decay", type=nonneg, default=1e-4, help=h("SGD weight decay", "paper [C main.py]"))
    a("--poly-power", type=pos_float, default=0.9, help=h("poly power", "[C utils/scheduler.py]"))
    a("--min-lr", type=nonneg, default=1e-6, help=h("poly floor", "[C utils/scheduler.py]"))
    a("--label-smoothing", type=nonneg, default=0.1, help=h("CE smoothing", "official [C main.py]"))
    a("--style-bank", help=h("style bank: ours (mined into it when missing) or an official "
      "saved_params.pkl (*.pkl): a pickle, read only when named here, by an unpickler that admits "
      "only tensors, lists and dicts"))
    a("--mine", default="auto", choices=["auto", "only", "never"], help=h(
      "auto: mine the bank if the file is missing, then train; only: mine (or keep the bank) and "
      "exit; never: the bank must exist"))
    a("--mine-batch-size", type=pos_int, default=16, help=h("mining batch", "[C patch_PIN.py]"))
    a("--mine-batches", type=common.nonnegative_int, default=0, help=h(
      "mining batches per process; 0 = one pass over the source", "official [C patch_PIN.py]"))
    a("--pin-iters", type=pos_int, default=100, help=h("PIN steps", "official [C patch_PIN.py]"))
    a("--pin-lr", type=pos_float, default=1.0, help=h("PIN SGD lr", "official [C patch_PIN.py]"))
    a("--pin-momentum", type=unit, default=0.9, help=h("PIN momentum", "[C patch_PIN.py]"))
    a("--pin-weight-decay", type=nonneg, default=1e-4, help=h("PIN decay", "[C patch_PIN.py]"))
    a("--templates", type=pos_int, default=80, help=h("the first N prompt templates", "official"))
    a("--scale", type=pos_float, default=1.0, help=h("test-time input scale <= 1", "paper: 1; "
      "post-publication option [C main.py]"))
    a("--ensemble", action="store_true", help=h("mean of logits at 1 and --scale", "[C main.py]"))
    a("--bench-paper", action="store_true", help=h("--bench on CPU: also the paper setting"))
    # fmt: on
    return parser


# Toy-sized values for `--source toy` (CPU); the paper values are the defaults.
TOY_DEFAULTS = {
    "backbone": "test", "targets": ",".join(common.TOY_TARGETS), "crop": 96, "batch_size": 8,
    "iters": 240, "eval_every": 120, "workers": 0, "mine_batch_size": 8, "mine_batches": 3,
    "pin_iters": 10, "templates": 2, "eval_batch_size": 16,
    "cpu_threads": 1,  # a 2nd thread only spins: tiny model
    "pin_lr": 0.05,  # DEVIATION 12: PIN's lr 1 would throw random-init statistics far off
}  # fmt: skip


def presets(first: argparse.Namespace) -> dict:
    """Defaults set by the first pass: the freeze scheme of the source, bank path, toy sizes."""
    chosen = {"freeze": FREEZE_BY_SOURCE[first.source],
              "style_bank": str(Path(first.out) / "style_bank.pt")}  # fmt: skip
    return {**chosen, **TOY_DEFAULTS} if first.source == "toy" else chosen


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict]:
    """The arguments, and the defaults in force (to tell which flags were changed)."""
    parser, argv = build_parser(), list(sys.argv[1:] if argv is None else argv)
    # One pre-parse reads what chooses a preset (--source toy, --out); its defaults are
    # installed with set_defaults, then the one real parse (a flag written always wins).
    first, _ = parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    parser.set_defaults(**presets(first))
    args = parser.parse_args(argv)
    return args, {name: parser.get_default(name) for name in vars(args)}


# Flags that only shape mining: unused without mining (another --style, or an existing bank).
MINING_FLAGS = ("prompt", "num_styles", "templates", "pin_iters", "pin_lr", "pin_momentum",
                "pin_weight_decay", "mine_batch_size", "mine_batches")  # fmt: skip


def check_args(args: argparse.Namespace, dist, defaults: dict) -> None:
    """One line for a value the run cannot use: an error if it cannot work, else a warning."""
    unit = LAYER1_STRIDE * args.grid  # DEVIATION 2: the patch grid follows the crop
    if args.crop % unit:
        fix = max(args.crop // unit, 1) * unit
        raise common.UsageError(f"--crop {args.crop} must be divisible by {unit} (layer1 stride 4 "
                                f"x --grid {args.grid}) so the patch grid tiles it; e.g. --crop "
                                f"{fix}")  # fmt: skip
    if args.batch_size // dist.world_size < 2 and not (dist.enabled and dist.device.type == "cuda"):
        raise common.UsageError("--batch-size: the decoder's BatchNorm needs 2+ images per process")
    if args.scale > 1:  # the ranges argparse's types do not state
        raise common.UsageError(f"--scale {args.scale}: use a value in (0, 1]")
    if args.label_smoothing >= 1:
        raise common.UsageError(f"--label-smoothing {args.label_smoothing}: use a value in [0, 1)")
    if not math.isfinite(args.noise_snr):
        raise common.UsageError(f"--noise-snr {args.noise_snr}: use a finite number")
    if args.ensemble and args.scale == 1:
        raise common.UsageError("--ensemble averages scale 1 with --scale: add --scale 0.5")
    if args.templates > len(TEMPLATES):
        raise common.UsageError(f"--templates {args.templates}: there are {len(TEMPLATES)}")
    if args.num_styles > len(STYLE_PROMPTS) and not args.prompt.startswith("chars"):
        raise common.UsageError(f"--num-styles {args.num_styles}: 20 official styles exist "
                                "(or chars*)")  # fmt: skip
    if args.mix_with != "mined" and args.style not in ("famix", "pure"):
        raise common.UsageError(f"--mix-with {args.mix_with} needs --style famix or pure")
    if args.eval_only and args.mine == "only":
        raise common.UsageError("--eval-only and --mine only exclude each other; pick one")
    changed = {name for name, value in defaults.items() if getattr(args, name) != value}
    mining = args.style in ("famix", "pure") or args.mine == "only"
    unused = [
        (not mining, [*MINING_FLAGS, "style_bank", "mine"], f"--style {args.style} (no mining)"),
        (args.style_bank.endswith(".pkl"), [*MINING_FLAGS, *["mine"] * (args.mine != "only")],
         f"--style-bank {args.style_bank} (an official bank is read, never mined)"),
        (args.style in ("none", "pure"), ["beta"], f"--style {args.style} (no Beta mixing)"),
        (args.style != "noise", ["noise_snr"], f"--style {args.style}"),
        (args.prompt == "class", ["num_styles"], "--prompt class"),
        (bool(args.resume), ["pretrained"], "--resume (the weights come from the checkpoint)"),
        (not args.bench, ["bench_paper"], "no --bench"),
    ]  # fmt: skip
    for applies, names, reason in unused:
        flags = ["--" + n.replace("_", "-") for n in names if n in changed and applies]
        changed -= set(names) if applies else set()  # one warning per flag
        if flags:
            common.warn(f"{', '.join(flags)} not used with {reason}")


def main(argv: list[str] | None = None) -> None:
    args, defaults = parse_args(argv)
    dist = common.setup(args)
    check_args(args, dist, defaults)
    if args.bench:
        return run_bench(args, dist)
    common.prepare_out_dir(args)
    if args.source == "toy":
        common.make_toy_dataset(args.data)
    common.print0("\n".join(f"  {key}: {value}" for key, value in vars(args).items()))
    # PLUMBING: every dataset is opened before any heavy work, so a bad --data or --targets fails
    # now and not after 40k iterations; so are the weights.
    names = ["source-val"] * (not args.eval_only or args.source == "toy")
    names += [t for t in common.parse_targets(args) if t != args.source]
    targets = {name: eval_dataset(name, args) for name in names}
    transform = train_transform(args.source, args.crop)
    train_set = None if args.eval_only else source_dataset(args, transform)
    if train_set is not None:  # labels in another encoding decode to 255 everywhere
        common.check_labels(train_set)
    sizes = {"source-train": len(train_set or []), **{k: len(v) for k, v in targets.items()}}
    common.print0("datasets: " + ", ".join(f"{k} {n}" for k, n in sizes.items()))
    model = FAMixSegmenter(args.backbone)
    start_ckpt, clip_model, encoder_state = load_weights(args, model)
    freeze(model, args.freeze)
    total, trainable = common.count_parameters(model)
    common.print0(f"FAMix {args.backbone}: {total:,} parameters, {trainable:,} trainable (freeze "
                  f"{args.freeze} = {FREEZE_SCHEMES[args.freeze][0]}, style "
                  f"{args.style})")  # fmt: skip
    extra = {"params_total": total, "params_trainable": trainable}
    log = common.RunLog(args.out, args, extra, enabled=dist.is_main)
    if args.eval_only:
        model.to(dist.device, memory_format=common.memory_format(args, dist))
        results = evaluate(model, targets, args, dist)
        common.print0(common.format_results(results))
        return log.write_results(results, None)
    # METHOD: Augment, local style mining, once (a bank file that exists is reused)
    bank = prepare_style_bank(args, dist, model, clip_model, encoder_state, train_set)
    del clip_model
    if args.mine == "only":
        return
    # SyncBN + DDP (CPU, Gloo: no SyncBN, each process normalises over its own images, so 2 x 2
    # trains near 1 x 4: bound in tests); --compile the trained part (names kept: no _orig_mod)
    _, scaler = common.autocast(dist.device, args.amp)
    model.to(dist.device, memory_format=common.memory_format(args, dist))
    net = common.wrap_ddp(common.convert_sync_bn(model, dist), dist)
    model = common.unwrap(net)
    model.trained = common.maybe_compile(model.trained, args)
    optimizer = build_optimizer(model, args, common.optimizer_options(args, dist, "sgd"))
    start = common.restore_training_state(start_ckpt, optimizer, scaler) if start_ckpt else 0
    with common.rng_neutral():
        loader = common.TrainLoader(train_set, args.batch_size, dist, args.seed, args.workers,
                                    start_iter=start)  # fmt: skip
    common.print0(f"source {args.source}: {len(train_set)} training images; batch "
                  f"{args.batch_size} global, {args.batch_size // dist.world_size} per process; "
                  f"iterations {start} -> {args.iters}")  # fmt: skip
    set_train_mode(model)
    results = train(args, dist, log, model, optimizer, scaler, loader, targets, start, net, bank)
    if dist.is_main:
        print(json.dumps({"final": {k: v["miou"] for k, v in results.items()}}))


# =============================================================================================
# Appendix A: CLIP ResNet + DeepLabv3+
# =============================================================================================
# CLIP ModifiedResNet [C network/backbone/resnet_clip.py] and DeepLabv3+ [C network/_deeplab.py,
# from VainF/DeepLabV3Plus-Pytorch], assembled by FAMixSegmenter (section 2).
CLIP_INPUT_SIZE = 224  # attnpool positional embedding is 7x7 + 1 (224 / 32)
ASPP_RATES = (6, 12, 18)  # output stride 16 [C network/modeling.py]
ASPP_DROPOUT = 0.1  # [C network/_deeplab.py]


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

    def forward(self, x: Tensor) -> Tensor:
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
        self.k_proj, self.q_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.c_proj = nn.Linear(width, output_dim)
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
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
    """CLIP ModifiedResNet. Output stride 16 is the segmentation encoder [C network/modeling.py]:
    as the official `_make_layer`, only layer4's LAST block is dilated (conv2 dilations [1, 1, 2],
    torchvision: [1, 2, 2]); no attnpool. Output stride 32 with attnpool is CLIP's image tower,
    used for mining. Both have the same parameters: one state dict serves both."""

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
        heads, grid = cfg["heads"], CLIP_INPUT_SIZE // 32
        self.attnpool = AttentionPool2d(grid, w * 32, heads, self.embed_dim) if attnpool else None

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

    def stem(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.avgpool(x)  # (B, 64, H/4, W/4)

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The bottlenecks after layer1 in forward order, with their names ("layer4.2")."""
        layers = (("layer2", self.layer2), ("layer3", self.layer3), ("layer4", self.layer4))
        return [(f"{name}.{i}", block) for name, layer in layers for i, block in enumerate(layer)]

    def embed_low_level(self, f1: Tensor) -> Tensor:
        """layer1 features -> CLIP image embedding (needs attnpool): the mining path."""
        return self.attnpool(self.layer4(self.layer3(self.layer2(f1))))


def conv_bn_relu(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    conv = nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """1x1, three 3x3 atrous (6/12/18) and image-pooling branches; concat -> 1x1, dropout 0.1."""

    def __init__(self, cin: int, cout: int, rates: tuple = ASPP_RATES):
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(cin, cout, 1)] + [conv_bn_relu(cin, cout, 3, r) for r in rates]
        )
        self.pool_branch = conv_bn_relu(cin, cout, 1)
        self.project = conv_bn_relu(cout * (len(rates) + 2), cout, 1)
        self.dropout_p = ASPP_DROPOUT

    def forward(self, x: Tensor, gens: list | None = None) -> Tensor:
        outs = [branch(x) for branch in self.branches]
        pooled = self.pool_branch(F.adaptive_avg_pool2d(x, 1))  # (B, 256, 1, 1)
        outs.append(F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False))
        y = self.project(torch.cat(outs, 1))  # (B, 256, h, w)
        if not self.training:
            return y
        # nn.Dropout(0.1), its mask drawn per image from gens[k] (the same on N processes)
        u = per_sample(lambda g: torch.rand(y.shape[1:], generator=g, device=y.device),
                       gens or [None] * len(y))  # fmt: skip
        return y * (u >= self.dropout_p) / (1 - self.dropout_p)


class DeepLabV3PlusHead(nn.Module):
    """ASPP(layer4) upsampled to layer1's size ++ 48-channel layer1 projection, 3x3 conv, 1x1."""

    def __init__(self, low: int, high: int, aspp: int, proj: int, classes: int = NUM_CLASSES):
        super().__init__()
        self.low_level_proj = conv_bn_relu(low, proj, 1)
        self.aspp = ASPP(high, aspp)
        self.fuse = conv_bn_relu(proj + aspp, aspp, 3)
        self.classifier = nn.Conv2d(aspp, classes, 1)
        # [C network/_deeplab.py::_init_weight] kaiming-normal convs, BN (1, 0); the classifier
        # bias keeps PyTorch's default init.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, low: Tensor, high: Tensor, gens: list | None = None) -> Tensor:
        low = self.low_level_proj(low)  # (B, 48, H/4, W/4)
        high = F.interpolate(self.aspp(high, gens), size=low.shape[-2:], mode="bilinear",
                             align_corners=False)  # fmt: skip
        return self.classifier(self.fuse(torch.cat([low, high], 1)))  # (B, 19, H/4, W/4)


# =============================================================================================
# Appendix B: Official weights
# =============================================================================================
# CLIP weights (open_clip tags, OpenAI .pt files, CLIP state dicts), CLIP's prompt templates,
# the released FAMix checkpoints, and the official style bank (saved_params.pkl).

# [C patch_PIN.py] the 80 ImageNet prompt templates of OpenAI CLIP, in the official order: each
# mining prompt is encoded in all of them (encode_prompts, section 1).
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
    "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.", "the {} in a video game.",
    "a sketch of a {}.", "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.",
    "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.", "a photo of a large {}.",
    "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.",
    "a photo of the nice {}.", "a photo of the small {}.", "a photo of the weird {}.",
    "the cartoon {}.", "art of the {}.", "a drawing of the {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.", "itap of a {}.",
    "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)  # fmt: skip

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


def backbone_of_state(state: dict, prefix: str) -> str | None:
    """Which entry of BACKBONES a state dict holds (layer3 has 6 blocks in RN50, 23 in RN101)."""
    n = len({k.split(".")[2] for k in state if k.startswith(prefix + "layer3.")})
    return next((name for name, c in BACKBONES.items() if c["layers"][2] == n), None)


def check_backbone(state: dict, path: str, backbone: str) -> None:
    found = backbone_of_state(state, "encoder.")
    if found is None:
        raise common.CheckpointError(f"{path} holds no CLIP ResNet encoder of a known size "
                                     f"({', '.join(BACKBONES)})")  # fmt: skip
    if found != backbone:
        raise common.CheckpointError(f"{path} holds a {found} model; add --backbone {found}")


def sniff_weights(path: str) -> tuple[str, object]:
    """Classify a --pretrained file: ("clip-jit", None) for an OpenAI TorchScript archive,
    ("official", model_state), ("famix", checkpoint) or ("clip", None) for a CLIP state dict."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.endswith("constants.pkl") for n in z.namelist()):
                return "clip-jit", None
    hint = "expected a CLIP weight file, an official FAMix .pth or a famix.py checkpoint"
    obj = common.read_weights_file(path, "--pretrained", hint)
    if isinstance(obj, dict) and "model_state" in obj:
        return "official", obj["model_state"]
    if isinstance(obj, dict) and "method" in obj:
        if obj["method"] != "famix":
            raise common.CheckpointError(f"{path} is a {obj['method']} checkpoint, not a FAMix one")
        return "famix", obj
    if isinstance(obj, dict) and any(k.startswith("visual.") for k in obj):
        return "clip", None
    raise common.CheckpointError(f"--pretrained {path}: not a CLIP weight file (no visual.* keys), "
                                 "not an official FAMix checkpoint (no model_state) and not a "
                                 "famix.py checkpoint")  # fmt: skip


# Flags that shape the model or its optimiser state: a resumed run must use the checkpoint's.
RESUME_FLAGS = ("backbone", "freeze", "lr", "backbone_lr", "momentum", "weight_decay")


def load_weights(args: argparse.Namespace, model: FAMixSegmenter):
    """The weights a run starts from: our checkpoint (--resume; returned for the optimiser and
    random states), an official or our FAMix checkpoint (--pretrained FILE, evaluation), or CLIP
    weights (training; returns the CLIP model and its image tower's state for mining)."""
    hint = "check --backbone and the file"
    if args.resume:
        ckpt = common.load_checkpoint(args.resume, "famix")
        common.check_resume_args(ckpt, args, RESUME_FLAGS)
        check_backbone(ckpt["model"], args.resume, args.backbone)
        common.load_state_strict(model, ckpt["model"], args.resume, hint)
        return ckpt, None, None
    kind, obj = (
        sniff_weights(args.pretrained) if os.path.isfile(args.pretrained) else ("clip", None)
    )
    if kind in ("official", "famix"):
        state = map_official_state(obj) if kind == "official" else obj["model"]
        check_backbone(state, args.pretrained, args.backbone)
        common.load_state_strict(model, state, args.pretrained, hint)
        return None, None, None
    if args.eval_only and args.pretrained == "none":
        return None, None, None
    clip_model = load_clip(args.backbone, args.pretrained, args.seed)
    encoder_state = visual_state(clip_model, args.backbone)
    tower = {k: v for k, v in encoder_state.items() if not k.startswith("attnpool.")}
    common.load_state_strict(model.encoder, tower, "the CLIP image tower", hint)
    return None, clip_model, encoder_state


TEST_TEXT_CFG = {"width": 64, "heads": 2, "layers": 2}  # text tower of the "test" size


def load_clip(backbone: str, pretrained: str, seed: int):
    """The open_clip CLIP model (image + text towers), fp32, CPU. `pretrained`: "none" (random
    init, seeded, global RNG untouched), an open_clip tag such as "openai" (from open_clip's cache,
    else downloaded; offline that fails at once), or a local file (OpenAI .pt TorchScript archive
    or a CLIP state dict). RN50-quickgelu, not RN50: OpenAI's text tower uses QuickGELU."""
    import open_clip  # imported here: it takes seconds and only weight loading needs it

    offline = "offline machines need --pretrained /path/to/RN50.pt (or none for random init)"
    if backbone == "test" and pretrained != "none":
        raise common.UsageError("--backbone test is a tiny random-init size: use --pretrained none")
    if pretrained != "none" and not os.path.isfile(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(backbone)
        if pretrained not in tags and (os.sep in pretrained or Path(pretrained).suffix):
            raise common.CheckpointError(f"--pretrained {pretrained} not found ({offline})")
        common.require_open_clip_tag(backbone, pretrained, offline)
    try:
        if backbone == "test" or pretrained == "none":
            cfg = BACKBONES[backbone]
            with common.rng_neutral():
                torch.manual_seed(seed)
                if backbone != "test":
                    return open_clip.create_model(backbone, pretrained=None)
                return open_clip.CLIP(
                    cfg["embed_dim"], quick_gelu=True, text_cfg=TEST_TEXT_CFG,
                    vision_cfg={"layers": cfg["layers"], "width": cfg["width"],
                                "head_width": cfg["width"] * 32 // cfg["heads"]},
                )  # fmt: skip
        if os.path.isfile(pretrained) and sniff_weights(pretrained)[0] == "clip-jit":
            return open_clip.load_openai_model(pretrained, precision="fp32", device="cpu")
        return open_clip.create_model(backbone, pretrained=pretrained)
    except Exception as e:
        raise common.UsageError(f"could not load CLIP weights {pretrained!r} for {backbone} "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                                f"{offline}") from None  # fmt: skip


def visual_state(clip_model, backbone: str) -> dict:
    """The CLIP image tower's state dict (OpenAI/open_clip names = CLIPResNet names)."""
    state = clip_model.visual.state_dict()
    found = backbone_of_state({"v." + k: v for k, v in state.items()}, "v.")
    if found != backbone or "attnpool.c_proj.weight" not in state:
        raise common.UsageError(f"the CLIP weights hold a {found or 'non-ResNet'} image tower, "
                                f"not {backbone}; fix --backbone or --pretrained")  # fmt: skip
    return state


def encoder_fingerprint(encoder_state: dict) -> float:
    """A number identifying the frozen encoder weights, stored in the style bank: styles mined
    with other weights live in another feature space."""
    keys = ("conv1.weight", "layer1.0.conv1.weight")
    return float(sum(encoder_state[k].double().sum() for k in keys))


def save_style_bank(path: Path, bank: dict, meta: dict) -> None:
    """DEVIATION 11: one torch file of flat tensors + metadata (official: saved_params.pkl)."""
    common.atomic_torch_save({**bank, **meta}, path)


def load_style_bank(path: Path, backbone: str, fingerprint: float | None,
                    channels: int) -> tuple[StyleBank, dict]:  # fmt: skip
    """Our bank file, or an official saved_params.pkl (*.pkl, read_official_bank). Returns the
    bank and its metadata (the mining settings; {} for an official file)."""
    if path.suffix == ".pkl":
        raw, meta = read_official_bank(path, channels), {}
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
            meta = {k: v for k, v in raw.items() if k not in ("mu", "sigma", "cls")}
        except Exception as e:
            raise common.UsageError(f"cannot read style bank {path} ({type(e).__name__}); delete "
                                    "it to mine again") from None  # fmt: skip
        if meta.get("backbone") != backbone:
            raise common.UsageError(f"style bank {path} was mined with {meta.get('backbone')}, "
                                    f"this run uses {backbone}; pass another --style-bank or "
                                    "delete it")  # fmt: skip
        if fingerprint is not None and not math.isclose(
            meta.get("fingerprint", math.nan), fingerprint, rel_tol=1e-6, abs_tol=1e-6
        ):
            raise common.UsageError(f"style bank {path} was mined with other encoder weights "
                                    f"(--pretrained {meta.get('pretrained')}); delete it to mine "
                                    "again")  # fmt: skip
    if len(raw["cls"]) == 0:
        raise common.UsageError(f"style bank {path} is empty; delete it and mine on more data")
    return StyleBank(raw["mu"], raw["sigma"], raw["cls"]), meta


def _refuse(name: str) -> pickle.UnpicklingError:  # our words (torch's advise an unsafe load)
    return pickle.UnpicklingError(f"it holds a call to {name}, which a style bank never needs")


def _storage_from_bytes(data: bytes):
    # A pickled tensor's storage is a small torch.save archive: read it without running code.
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise _refuse(found[1] if found else "something in a tensor's storage") from None


class _BankUnpickler(pickle.Unpickler):
    """Admits what a pickled dict of lists of CPU tensors needs, nothing else: torch's tensor
    rebuild, the tensor storage (read with weights_only), OrderedDict (empty backward hooks).
    Any other global (e.g. os.system in a crafted file) is refused before it can be called."""

    ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        ("collections", "OrderedDict"): OrderedDict,
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise _refuse(f"{module}.{name}")
        return self.ALLOWED[(module, name)]


def read_official_bank(path: Path, channels: int) -> dict:
    """[C patch_PIN.py] saved_params.pkl: {"<class name>_mu" / "_std": list of (C, 1, 1) tensors,
    "255_mu" / "255_std": the void bank} -> {"mu": (N, C), "sigma": (N, C), "cls": (N,)}, rows
    in class order, each class's styles in the file's order (the same statistics). It names no
    encoder: only its width is checked against `channels`, the encoder's layer1 width (RN50 and
    RN101: 256). Anything else is one DataFileError line naming the file."""
    ids = {**{name: c for c, name in enumerate(CLASS_NAMES)}, str(VOID): VOID}
    try:
        with open(path, "rb") as f:
            raw = _BankUnpickler(f).load()
    except Exception as e:
        raise common.DataFileError(f"cannot read official style bank {path}: "
                                   f"{common.one_line(e)}") from None  # fmt: skip
    keys = [f"{name}_{s}" for name in ids for s in ("mu", "std")]
    if not isinstance(raw, dict):
        raise common.DataFileError(f"{path} holds a {type(raw).__name__}, not an official style "
                                   "bank (a dict of lists of tensors)")  # fmt: skip
    extra, missing = sorted(set(raw) - set(keys), key=str), [k for k in keys if k not in raw]
    if extra or missing:
        what = f"unexpected keys {extra[:3]}" if extra else f"no keys {missing[:3]}"
        raise common.DataFileError(f"{path} is not an official style bank ({what}; it holds the "
                                   "40 keys <class name>_mu / _std, 255_* for void)")  # fmt: skip
    for name in ids:
        for key in (f"{name}_mu", f"{name}_std"):
            if not isinstance(raw[key], list) or not all(torch.is_tensor(t) for t in raw[key]):
                raise common.DataFileError(f"{path}: {key} is not a list of tensors")
            shape = next((tuple(t.shape) for t in raw[key] if t.shape != (channels, 1, 1)), None)
            if shape is not None:  # (C', 1, 1): the statistics of another encoder's layer1
                raise common.DataFileError(f"{path}: {key} holds a tensor of shape {shape}, this "
                                           f"run's encoder needs ({channels}, 1, 1): its layer1 "
                                           "channels (another CLIP size?)")  # fmt: skip
        mu, std = raw[f"{name}_mu"], raw[f"{name}_std"]
        if len(mu) != len(std):
            raise common.DataFileError(f"{path}: {name} has {len(mu)} mu but {len(std)} std")
    rows = [(c, m, s) for name, c in ids.items() for m, s in zip(raw[f"{name}_mu"],
                                                                 raw[f"{name}_std"])]  # fmt: skip
    if not rows:
        raise common.DataFileError(f"{path} holds no style")
    cls, mu, sigma = zip(*rows)
    mu, sigma = (torch.stack([t.flatten().float() for t in ts]) for ts in (mu, sigma))  # (N, C)
    if not (mu.isfinite().all() and sigma.isfinite().all()):
        raise common.DataFileError(f"{path} holds non-finite statistics (nan or inf)")
    return {"mu": mu, "sigma": sigma, "cls": torch.tensor(cls)}


# =============================================================================================
# Appendix C: Benchmark
# =============================================================================================
# One training step (GTA5 scheme, FAMix mixing) and one mining batch on synthetic data with
# random weights, timed with FLOPs / throughput / MFU / peak memory (common.benchmark).


def synthetic_batch(batch: int, crop: int, cell: int, device: torch.device, fmt):
    """Random images, blocky labels (cell x cell blocks of one class); the same whatever ran."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, crop, crop, generator=g).to(device, memory_format=fmt)
    n = crop // cell
    labels = torch.randint(0, common.NUM_CLASSES, (batch, n, n), generator=g).to(device)
    return images, labels.repeat_interleave(cell, 1).repeat_interleave(cell, 2)  # (B, crop, crop)


def bench_train_step(model, optimizer, bank, images, labels, args, amp_ctx) -> Callable:
    """One training step as `train` runs it: gradients cleared, Mix, forward, loss, SGD."""
    mix = partial(stylize, labels=labels, bank=bank, mode="famix", grid=args.grid, beta=args.beta,
                  noise_snr=args.noise_snr)  # fmt: skip

    def step():
        optimizer.zero_grad(set_to_none=True)
        with amp_ctx():
            logits = model(images, stylize=mix)
        segmentation_loss(logits, labels, args.label_smoothing).backward()
        optimizer.step()

    return step


def bench_mine_batch(encoder, images, labels, iters: int, grid: int) -> Callable:
    """One mining batch (random unit text targets instead of CLIP's text tower)."""
    targets = F.normalize(torch.randn(VOID + 1, encoder.embed_dim, device=images.device), dim=-1)
    pin_cfg = {"iters": iters, "lr": 1.0, "momentum": 0.9, "weight_decay": 1e-4}

    def step():  # the first K random targets for K patches
        mine_styles(encoder, lambda prompts: targets[: len(prompts)], iter([(images, labels)]), 1,
                    grid, pin_cfg, str, log=lambda s: None)  # fmt: skip

    return step


# (name, batch, crop) of the timed training steps, (name, batch, crop, PIN steps) of the timed
# mining batches; "paper" (RN50, batch 8 at 768; mining 16) runs on GPU, or CPU with --bench-paper.
BENCH_TRAIN = (("small", 2, 192), ("paper", 8, 768))
BENCH_MINE = (("small", 4, 192, 10), ("paper", 16, 768, 100))


def run_bench(args: argparse.Namespace, dist) -> None:
    """Training step and mining batch per setting: one JSON record each (common.benchmark)."""
    device = dist.device
    amp_ctx, _ = common.autocast(device, args.amp)
    fmt = common.memory_format(args, dist)
    paper = device.type == "cuda" or args.bench_paper
    precision = common.bench_precision(args, device)
    torch.manual_seed(0)
    model = FAMixSegmenter(args.backbone)
    freeze(model, "layer4.2")
    model.to(device, memory_format=fmt)
    set_train_mode(model)
    optimizer = build_optimizer(model, args, common.optimizer_options(args, dist, "sgd"))
    n, c = 2000, model.encoder.low_channels
    cls = torch.randint(0, common.NUM_CLASSES, (n,))
    bank = StyleBank(torch.rand(n, c), torch.rand(n, c) + 0.1, cls).to(device)
    for name, batch, crop in [s for s in BENCH_TRAIN if paper or s[0] != "paper"]:
        images, labels = synthetic_batch(batch, crop, 16, device, fmt)
        common.benchmark(
            f"famix/train_step/{name}",
            bench_train_step(model, optimizer, bank, images, labels, args, amp_ctx),
            device=device, warmup=1, steps=2 if device.type == "cpu" else 10,
            images_per_step=batch, precision=precision, peak=args.peak_tflops,
            extra={"batch": batch, "crop": crop, "backbone": args.backbone, "amp": args.amp,
                   "fast": common.fast_path(args, dist)},
        )  # fmt: skip
    # Mining: layer1 of one batch, then PIN on one patch per class through layer2..attnpool.
    encoder = CLIPResNet(args.backbone, output_stride=32, attnpool=True)
    encoder.to(device, memory_format=fmt).eval().requires_grad_(False)
    for name, batch, crop, iters in [s for s in BENCH_MINE if paper or s[0] != "paper"]:
        images, labels = synthetic_batch(batch, crop, crop // args.grid, device, fmt)
        k = int(first_patch_per_class(dominant_classes(labels, args.grid))[2].numel())
        common.benchmark(
            f"famix/mine_batch/{name}", bench_mine_batch(encoder, images, labels, iters, args.grid),
            device=device, warmup=0, steps=1, images_per_step=batch, precision=precision,
            peak=args.peak_tflops,
            extra={"batch": batch, "crop": crop, "pin_iters": iters, "patches": k},
        )  # fmt: skip


if __name__ == "__main__":
    common.run_cli(main)
