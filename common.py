"""Building blocks shared by famix.py, rein.py and clouds.py (the commands are in tools.py).
Functions and plain Datasets, one numbered section per topic; no module-level mutable state.

Where the three official repositories disagree (GTA5 training list, Mapillary 66 -> 19 table,
mIoU averaging rule, SYNTHIA 19/16/13 classes) each variant is a named option here and every
method file picks its official one. Source tags: [FAMix file], [Rein file], [CLOUDS file],
[csScripts labels.py], [mmseg file], [mmcv file], [detectron2 file].
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import itertools
import json
import math
import os
import random
import re
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from tqdm import tqdm

try:  # torchvision's libpng/libjpeg decoders (deprecated since 0.29 in favour of torchcodec)
    from torchvision.io import ImageReadMode, decode_image, decode_png, read_file
except ImportError:  # pragma: no cover - only on a torchvision without them
    decode_image = decode_png = None


# =============================================================================================
# 1. Classes, palettes, label maps
# =============================================================================================

NUM_CLASSES = 19
IGNORE_INDEX = 255

# [csScripts labels.py] the 19 evaluation classes in trainId order.
CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip

# [csScripts labels.py] RGB colour of each trainId; 255 (ignore) is drawn black.
PALETTE = np.zeros((256, 3), dtype=np.uint8)
PALETTE[:NUM_CLASSES] = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
]  # fmt: skip

# Normalisation constants on the [0, 1] scale.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP [FAMix, CLOUDS (x255)]
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # [Rein configs: 123.675, 116.28, 103.53 on 0..255]
IMAGENET_STD = (0.229, 0.224, 0.225)


def _lut(pairs: dict[int, int]) -> np.ndarray:
    """A 256-entry lookup table: every id not listed maps to 255 (ignore)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    lut[list(pairs)] = list(pairs.values())
    return lut


# [csScripts labels.py; FAMix gta5.py; Rein/CLOUDS tools/convert_datasets/gta.py]
# Cityscapes labelId -> trainId. Also used for GTA5 (palette index = labelId) and ACDC labelIds.
_CITYSCAPES_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
CITYSCAPES_ID_TO_TRAINID = _lut(_CITYSCAPES_IDS)
# The way back, trainId -> labelId (anything else -> 0, unlabeled), to write label files.
TRAINID_TO_ID = np.zeros(256, np.uint8)
TRAINID_TO_ID[list(_CITYSCAPES_IDS.values())] = list(_CITYSCAPES_IDS)
# BDD100K masks, ACDC / Cityscapes *_labelTrainIds.png: already trainIds (anything else -> 255).
TRAINID_IDENTITY = _lut({i: i for i in range(NUM_CLASSES)})

# [FAMix synthia.py = CLOUDS tools/convert_datasets/synthia.py] SYNTHIA class id (R channel of the
# 16-bit label) -> trainId. Ids 0 void, 13 parking-slot, 14 road-work, 22 lanemarking -> ignore.
SYNTHIA_ID_TO_TRAINID = _lut(
    {1: 10, 2: 2, 3: 0, 4: 1, 5: 4, 6: 8, 7: 5, 8: 13, 9: 7, 10: 11, 11: 18, 12: 17, 15: 6,
     16: 9, 17: 12, 18: 14, 19: 15, 20: 16, 21: 3}
)  # fmt: skip

# Mapillary Vistas v1.2 (66 classes) -> 19. The repositories disagree on 11 ids:
# "hrda" [FAMix datasets/mapillary.py = CLOUDS tools/convert_datasets/mapillary.py],
# "rein" [Rein tools/convert_datasets/mapillary2cityscape.py name rules applied to v1.2 names].
_MAPILLARY_COMMON = {
    2: 1, 15: 1, 17: 2, 6: 3, 3: 4, 45: 5, 47: 5, 48: 6, 50: 7, 30: 8, 29: 9, 27: 10, 19: 11,
    20: 12, 21: 12, 22: 12, 55: 13, 61: 14, 54: 15, 58: 16, 57: 17, 52: 18, 13: 0, 24: 0,
}  # fmt: skip
MAPILLARY_V12_TO_19 = {
    "hrda": _lut({**_MAPILLARY_COMMON, 41: 0}),
    # bike lane, crosswalk-plain, parking, service lane, lane-marking crosswalk -> road;
    # curb cut, pedestrian area -> sidewalk; street light -> pole; sign back, sign frame -> sign.
    "rein": _lut({**_MAPILLARY_COMMON, 7: 0, 8: 0, 10: 0, 14: 0, 23: 0, 9: 1, 11: 1, 44: 5,
                  49: 7, 46: 7}),
}  # fmt: skip

# [CLOUDS datasets/gta_list/train_dict.json] the 62 GTA5 frames CLOUDS leaves out of training.
GTA5_CLOUDS_EXCLUDED = frozenset([15188, 17705, *range(20801, 20861)])

# SYNTHIA evaluation subsets (UDA/DG convention): 16 classes = 19 minus terrain, truck, train;
# 13 classes = 16 minus wall, fence, pole. Computed from the same 19-class confusion matrix.
SYNTHIA16 = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
SYNTHIA13 = (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)


# =============================================================================================
# 2. Errors, messages, the command line
# =============================================================================================


class UsageError(Exception):
    """Bad user input. The message is one line: what is wrong and how to fix it."""


class DatasetLayoutError(UsageError):
    pass


class CheckpointError(UsageError):
    pass


class DataFileError(UsageError):
    """An image or label file that cannot be decoded, or a label whose size is not its image's."""


class DivergenceError(UsageError):
    """A non-finite loss or prediction: stop before the weights take it; `saved`: (path, iter)."""

    def __init__(self, iteration: int, saved, terms: dict | None = None, predictions=()):
        if predictions:
            what = f"the predictions {', '.join(predictions)} are not finite; training stopped "
            what += "before the loss"
        else:
            values = ", ".join(f"{k} {v:.4g}" for k, v in (terms or {}).items())
            what = f"the loss is not finite ({values}); training stopped"
        note = checkpoint_note(saved)
        super().__init__(f"iteration {iteration}: {what}, {note}; try a lower --lr or --no-amp")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C inside a training loop after `done` of `iters` iterations; `saved` as above."""

    def __init__(self, done: int, iters: int, saved):
        super().__init__()
        self.done, self.iters, self.saved = done, iters, saved


def checkpoint_note(saved) -> str:
    """Where the last good state of this run is, for a message that stops it."""
    if saved is None:
        return "no checkpoint was written by this run"
    return f"{saved[0]} holds iteration {saved[1]}"


def one_line(error: BaseException) -> str:
    """An error's message; for a DataLoader worker's, the original (its traceback's last line)."""
    text = str(error)
    if "\nOriginal Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text.splitlines()[0] if text.strip() else type(error).__name__


def resume_command(argv: Sequence[str], checkpoint: str | Path) -> str:
    """This run's command less --resume, --init and --overwrite, plus --resume CHECKPOINT."""
    kept, skip = [], False
    for token in argv:
        name = token.split("=", 1)[0]
        if skip or name == "--overwrite":
            skip = False
        elif name in ("--resume", "--init"):
            skip = "=" not in token
        else:
            kept.append(token)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"torchrun --nproc_per_node {world}" if world > 1 else "python"
    words = [launcher, Path(sys.argv[0]).name, *map(shlex.quote, kept), "--resume"]
    return " ".join([*words, shlex.quote(str(checkpoint))])


def run_cli(main: Callable[[list[str] | None], Any]) -> None:
    """Run `main`: a UsageError is one line on stderr (exit 2); Ctrl-C says how to resume (130)."""
    try:
        main(None)
    except UsageError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:  # torchrun: another process of the run stopped (its line is above)
        if not (torch_dist.is_initialized() and "closed by peer" in str(e)):
            raise
        sys.exit(2)
    except KeyboardInterrupt as e:
        where = f" at iteration {e.done} of {e.iters}" if isinstance(e, Interrupted) else ""
        saved = getattr(e, "saved", None)
        how = "no checkpoint was written by this run: run the command again"
        if saved is not None:
            how = f"{checkpoint_note(saved)}; continue with: "
            how += resume_command(sys.argv[1:], saved[0])
        print(f"interrupted{where}; {how}", file=sys.stderr)
        sys.exit(130)


def is_main() -> bool:
    """Rank 0, or the only process (asks torch.distributed: no state of our own)."""
    return not torch_dist.is_initialized() or torch_dist.get_rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def warn(message: str) -> None:
    """One warning line on stderr, from rank 0 only (above a progress bar, if one is shown)."""
    if is_main():
        tqdm.write(f"warning: {message}", file=sys.stderr)


# tqdm settings of every progress bar (rank 0 only: pass disable=not dist.is_main)
BAR = {"dynamic_ncols": True, "leave": False, "file": sys.stderr, "mininterval": 1.0}


class Parser(argparse.ArgumentParser):
    """Errors as one line on stderr, exit code 2 (argparse prints its whole usage first)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def make_parser(description: str) -> Parser:
    return Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def _number(text: str, kind: type, low: float, strict: bool, high: float = math.inf) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {text}")
    if value > high:
        raise argparse.ArgumentTypeError(f"must be in [{low:g}, {high:g}], got {text}")
    return value


# argparse types: an integer >= 1, >= 0; a finite number > 0, >= 0, in [0, 1]
positive_int = functools.partial(_number, kind=int, low=1, strict=False)
nonnegative_int = functools.partial(_number, kind=int, low=0, strict=False)
positive_float = functools.partial(_number, kind=float, low=0.0, strict=True)
nonnegative_float = functools.partial(_number, kind=float, low=0.0, strict=False)
unit_float = functools.partial(_number, kind=float, low=0.0, strict=False, high=1.0)


def add_shared_flags(parser: argparse.ArgumentParser, *, source: str, targets: str, iters: int,
                     batch_size: int, crop: int, amp: bool, pretrained: str, eval_every: int,
                     log_every: int, workers: int = 4,
                     sources: Sequence[str] = ("gta", "synthia", "cityscapes", "toy"),
                     cite: dict[str, str] | None = None) -> None:  # fmt: skip
    """The shared flags with the method's paper defaults; each help ends with its `cite[name]`."""
    cite = cite or {}

    def h(text: str, name: str) -> str:
        return f"{text} (default %(default)s{'; ' + cite[name] if name in cite else ''})"

    names = f"{', '.join(TARGET_NAMES)}; toy: {', '.join(TOY_TARGETS)}"
    on_off = argparse.BooleanOptionalAction
    a = parser.add_argument_group("shared").add_argument
    # fmt: off
    a("--source", default=source, choices=list(sources), help=h("training domain", "source"))
    a("--data", default="./data", help=h("root of gta5/ synthia/ cityscapes/ ... toy/", "data"))
    a("--targets", default=targets, help=h(f"comma-separated targets among {names}", "targets"))
    a("--iters", type=positive_int, default=iters, help=h("optimizer steps", "iters"))
    a("--batch-size", type=positive_int, default=batch_size, help=h("global batch", "batch_size"))
    a("--crop", type=positive_int, default=crop, help=h("training crop size", "crop"))
    a("--amp", action=on_off, default=amp, help=h("bf16 (else fp16) autocast on CUDA", "amp"))
    a("--tf32", action=on_off, default=True, help=h("TF32 matmuls/convolutions on CUDA", "tf32"))
    a("--fast", choices=["auto", "on", "off"], default="auto",
      help=h("channels_last, fused/foreach optimiser, cuDNN autotuning; auto: CUDA", "fast"))
    a("--compile", action="store_true", help=h("torch.compile the trained parts", "compile"))
    a("--out", default="out", help=h("output folder: last.pt, log.jsonl, results.json", "out"))
    a("--overwrite", action="store_true", help=h("start a new run in an --out that has one", "o"))
    a("--resume", default=None, help=h("continue from this checkpoint (out/last.pt)", "resume"))
    a("--device", default=None, help=h("cuda or cpu; none = cuda if available", "device"))
    a("--seed", type=int, default=0, help=h("random seed; each process adds its rank", "seed"))
    a("--pretrained", default=pretrained, help=h("weights: a name, a file or none", "pretrained"))
    a("--eval-only", action="store_true", help=h("evaluate the weights and exit", "eval_only"))
    a("--eval-every", type=nonnegative_int, default=eval_every,
      help=h("evaluate every N iterations; 0 = at the end only", "eval_every"))
    a("--log-every", type=positive_int, default=log_every, help=h("log every N", "log_every"))
    a("--workers", type=nonnegative_int, default=workers, help=h("loader workers", "workers"))
    a("--eval-batch-size", type=positive_int, default=1,
      help=h("images of one size per evaluation forward pass", "eval_batch_size"))
    a("--cpu-threads", type=nonnegative_int, default=0, help=h("0 = PyTorch's choice", "threads"))
    a("--save-preds", type=nonnegative_int, default=0,
      help=h("save image | label | prediction of the first N images per target", "save_preds"))
    a("--bench", action="store_true", help=h("run the benchmarks (JSON lines) and exit", "bench"))
    a("--peak-tflops", type=positive_float, default=None,
      help=h("--bench: peak TFLOP/s for MFU; none = from a table of GPUs", "peak_tflops"))
    # fmt: on


def parse_targets(args: argparse.Namespace) -> list[str]:
    return [t.strip() for t in args.targets.split(",") if t.strip()]


def args_to_primitives(args: argparse.Namespace | dict) -> dict:
    d = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    primitive = (int, float, str, bool, type(None))
    return {k: (v if isinstance(v, primitive) else str(v)) for k, v in d.items()}


# =============================================================================================
# 3. Images, labels and the six dataset readers
# =============================================================================================

# The archive each dataset folder under --data is extracted from: a file that cannot be read is
# replaced by extracting it again [the datasets' download pages].
ARCHIVES = {
    "gta5": ("01_images.zip ... 10_images.zip", "01_labels.zip ... 10_labels.zip"),
    "synthia": ("SYNTHIA-RAND-CITYSCAPES (RGB/)", "SYNTHIA-RAND-CITYSCAPES (GT/LABELS/)"),
    "cityscapes": ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip"),
    "bdd100k": ("bdd100k_images_10k.zip", "bdd100k_sem_seg_labels_trainval.zip"),
    "mapillary": ("the Mapillary Vistas v1.2 (or v2.0) zip", "the same zip"),
    "acdc": ("rgb_anon_trainvaltest.zip", "gt_trainval.zip"),
}
# Exceptions a decoder raises on a truncated or corrupt file (PIL: OSError, incl.
# UnidentifiedImageError, SyntaxError, ValueError; torchvision: RuntimeError).
DECODE_ERRORS = (OSError, RuntimeError, ValueError, SyntaxError)


def decode_error(path: str | Path, what: str, error: BaseException) -> DataFileError:
    """One line naming the file, what is wrong and where a good copy comes from."""
    path = Path(path)
    folder = next((p for p in path.parts if p in ARCHIVES or p == "toy"), None)
    if folder == "toy":
        fix = f"delete {Path(*path.parts[: path.parts.index('toy') + 1])} to have it written again"
    elif folder is not None:
        fix = f"re-extract it from {ARCHIVES[folder][what == 'label']}"
    else:
        fix = "replace it with a good copy"
    reason = one_line(error)[:120] or type(error).__name__
    return DataFileError(f"cannot read {what} {path} ({reason}): the file is corrupt or "
                         f"truncated; {fix}")  # fmt: skip


def read_image(path: str | Path) -> Tensor:
    """RGB uint8 (3, H, W); torchvision decodes Pillow's pixels a third faster, Pillow the rest."""
    if decode_image is not None:
        with contextlib.suppress(RuntimeError):
            return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
    except DECODE_ERRORS as e:
        raise decode_error(path, "image", e) from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)  # (3, H, W)


def read_id_png(path: str | Path) -> np.ndarray:
    """Class ids of an 8-bit label PNG (mode L or P). Palette PNGs give their indices: never
    convert("L"/"RGB") them, that would turn palette colours into luminance."""
    try:
        with Image.open(path) as im:
            mode, ids = im.mode, np.asarray(im) if im.mode in ("L", "P") else None
    except DECODE_ERRORS as e:
        raise decode_error(path, "label", e) from None
    if ids is None:
        raise DatasetLayoutError(f"{path}: label PNG has mode {mode}, expected an 8-bit id image "
                                 "(L or P); colour visualisations (*_color.png, colormaps/) are "
                                 "not labels")  # fmt: skip
    return ids


def read_synthia_label(path: str | Path) -> np.ndarray:
    """SYNTHIA GT/LABELS/*.png: 16-bit, 3-channel PNG, class id in the first (R) channel.
    Pillow silently keeps only the high byte (all ids become 0), so decode with torchvision."""
    if decode_png is None:
        raise UsageError("reading 16-bit SYNTHIA labels needs torchvision.io.decode_png, which "
                         "this torchvision lacks; install a torchvision that has it (0.19 to "
                         "0.29)")  # fmt: skip
    try:
        raw = decode_png(read_file(str(path)), mode=ImageReadMode.UNCHANGED)  # (C, H, W)
    except DECODE_ERRORS as e:
        raise decode_error(path, "label", e) from None
    if raw.dtype == torch.uint8:
        raise DatasetLayoutError(f"{path}: SYNTHIA label decoded as 8-bit; expected the 16-bit "
                                 "RAND-CITYSCAPES GT/LABELS PNG (do not re-save the labels with "
                                 "another tool)")  # fmt: skip
    return raw[0].to(torch.int64).numpy()  # (H, W) class ids


def map_ids(ids: np.ndarray, lut: np.ndarray) -> Tensor:
    """Look up trainIds; ids outside the table (e.g. > 255) become 255."""
    ids = ids.astype(np.int64)
    out = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    inside = (ids >= 0) & (ids < len(lut))
    out[inside] = lut[ids[inside]]
    return torch.from_numpy(out)


def read_label(path: str | Path, lut: np.ndarray) -> Tensor:
    return map_ids(read_id_png(path), lut)


def read_cityscapes_label(path: str | Path) -> Tensor:
    """trainIds of a Cityscapes-style label (Cityscapes, ACDC, GTA5): a *_labelTrainIds.png is
    read as it is, anything else holds labelIds (GTA5: palette index = labelId) and is mapped."""
    trainids = str(path).endswith("_labelTrainIds.png")
    return read_label(path, TRAINID_IDENTITY if trainids else CITYSCAPES_ID_TO_TRAINID)


def read_synthia_trainids(path: str | Path) -> Tensor:
    return map_ids(read_synthia_label(path), SYNTHIA_ID_TO_TRAINID)


def image_size(path: str | Path) -> tuple[int, int]:
    """(W, H) from the file header only."""
    try:
        with Image.open(path) as im:
            return im.size
    except DECODE_ERRORS as e:
        kind = "label" if "label" in str(path).lower() or "gt" in Path(path).parts else "image"
        raise decode_error(path, kind, e) from None


# Each reader returns (image uint8 (3,H,W), label int64 (H,W) trainIds, name); a transform takes
# and returns (image, label) and draws only from the generator it is given.
Transform = Callable[[Tensor, Tensor, torch.Generator], tuple[Tensor, Tensor]]

_TREES = {
    "gta": "gta5/ | images/00001.png ... (RGB) | labels/00001.png ... (palette PNG, index = "
    "Cityscapes labelId) | gtav_split_{train,val}.txt (FAMix image list only)",
    "synthia": "synthia/ | RGB/0000000.png ... | GT/LABELS/0000000.png ... (16-bit RGB PNG, "
    "class id in R) | synthia_split_val.txt (optional list of val names) | or the split layout "
    "RGB/{train,val}/*.png + GT/LABELS/{train,val}/*.png",
    "cityscapes": "cityscapes/ | leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit"
    ".png | gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png",
    "bdd": "bdd100k/ | images/10k/{train,val}/<stem>.jpg | labels/sem_seg/masks/{train,val}/"
    "<stem>.png | or seg/images/<split>/<stem>.jpg + seg/labels/<split>/<stem>_train_id.png",
    "mapillary": "mapillary/ | validation/images/<id>.jpg | validation/labels/<id>.png (v1.2 "
    "zip) or validation/v1.2/labels/<id>.png (v2.0 zip)",
    "acdc": "acdc/ | rgb_anon/<fog|night|rain|snow>/val/<seq>/<seq>_frame_<n>_rgb_anon.png | "
    "gt/<cond>/val/<seq>/<seq>_frame_<n>_gt_labelTrainIds.png (or _gt_labelIds.png)",
}


def _layout_error(kind: str, root: Path, missing: str) -> DatasetLayoutError:
    return DatasetLayoutError(f"{kind}: {missing} under {root}. Expected layout: {_TREES[kind]}")


def size_policy(split: str) -> str:
    """Pairs of different sizes: training skips them (no joint crop), evaluation stops: an error."""
    return "skip" if split in ("train", "all") else "error"


class _PairDataset(Dataset):
    """(image, label) path pairs, a label decoder, a transform. Sizes are compared from the file
    headers (`sizes`: "skip", "error", "off"; None = size_policy(split)); `skipped`: left out."""

    def __init__(self, kind: str, pairs: list[tuple[Path, Path]], decode: Callable,
                 transform: Transform | None, sizes: str | None, split: str):  # fmt: skip
        self.kind, self.decode, self.transform, self.pairs = kind, decode, transform, pairs
        self.skipped = []
        if (sizes or size_policy(split)) != "off":
            self.pairs, self.skipped = _check_sizes(kind, pairs, sizes or size_policy(split))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index):
        # The training loader passes (index, seed): augmentation draws come from that seed only.
        index, seed = index if isinstance(index, tuple) else (index, index)
        image_path, label_path = self.pairs[index]
        image, label = read_image(image_path), self.decode(label_path)
        if self.transform is not None:
            image, label = self.transform(image, label, torch.Generator().manual_seed(seed))
        return image, label, image_path.stem


# What each reader expects its label files to hold (a wrong encoding decodes to 255 everywhere).
LABEL_ENCODINGS = {
    "gta": "palette PNGs whose index is the Cityscapes labelId (7 = road, 26 = car)",
    "synthia": "16-bit RGB PNGs with the SYNTHIA class id in R (RAND-CITYSCAPES GT/LABELS)",
    "cityscapes": "*_gtFine_labelIds.png (labelIds, 7 = road) or *_labelTrainIds.png (0-18)",
    "bdd": "8-bit PNG masks of trainIds 0-18, 255 = ignore (labels/sem_seg/masks)",
    "mapillary": "v1.2 palette PNGs whose index is one of the 66 v1.2 class ids",
    "acdc": "*_gt_labelTrainIds.png (0-18) or *_gt_labelIds.png (Cityscapes labelIds)",
}


def check_labels(dataset: _PairDataset, count: int = 8) -> None:
    """Stop if the first `count` labels hold no pixel of the 19 classes (a wrong encoding)."""
    pairs = dataset.pairs[:count]
    if pairs and all(bool((dataset.decode(label) == IGNORE_INDEX).all()) for _, label in pairs):
        raise DataFileError(
            f"{dataset.kind}: the first {len(pairs)} label files (e.g. {pairs[0][1]}) hold no "
            f"pixel of the 19 classes once decoded; the reader expects "
            f"{LABEL_ENCODINGS[dataset.kind]}: check that the labels are the original files"
        )


def _check_sizes(kind: str, pairs: list[tuple[Path, Path]], policy: str) -> tuple[list, list]:
    sizes = [(image_size(image), image_size(label)) for image, label in pairs]
    bad = [(*pair, *s) for pair, s in zip(pairs, sizes) if s[0] != s[1]]
    if bad and policy == "error":
        image, label, (wi, hi), (wl, hl) = bad[0]
        more = f" (and {len(bad) - 1} more pairs)" if len(bad) > 1 else ""
        folder = next((p for p in label.parts if p in ARCHIVES), None)
        fix = f"re-extract it from {ARCHIVES[folder][1]}" if folder else "replace it"
        raise DataFileError(f"{kind}: label {label} is {wl}x{hl} but its image {image} is "
                            f"{wi}x{hi}{more}; an evaluation split is scored whole: "
                            f"{fix}")  # fmt: skip
    skipped = [image.stem for image, *_ in bad]
    if bad:
        print0(f"{kind}: skipped {len(bad)} image/label pairs of different sizes "
               f"(first: {skipped[:5]})")  # fmt: skip
    return [pair for pair, s in zip(pairs, sizes) if s[0] == s[1]], skipped


def _pairs(kind: str, root: Path, images: list[Path], labels_of: Callable[[Path], list[Path]],
           empty: str) -> list[tuple[Path, Path]]:  # fmt: skip
    """Each image with the first of its candidate labels that exists (`empty`: no image found)."""
    if not images:
        raise _layout_error(kind, root, empty)
    pairs = [(image, next((c for c in labels_of(image) if c.is_file()), None)) for image in images]
    for image, label in pairs:
        if label is None:
            looked = ", ".join(str(c) for c in labels_of(image))
            raise DatasetLayoutError(f"{kind}: image {image} has no label; looked for {looked}")
    return pairs


class GTA5(_PairDataset):
    """GTA5 (Playing for Data): images/NNNNN.png <-> labels/NNNNN.png (palette index = labelId).
    `image_list`: "all" = images/*.png (24,966) [Rein gta_512x512.py]; "clouds" = all minus
    GTA5_CLOUDS_EXCLUDED (24,904) [CLOUDS gta_list]; "famix" = root/gtav_split_{split}.txt (12,382
    train / 1,000 val, from FAMix's datasets/gta5_list/) [FAMix]. 4,826 frames are 1914x1046, not
    1914x1052: pairs of different sizes are skipped in every split (FAMix crops to 1046x1914)."""

    def __init__(self, root: str | Path, split: str = "train", image_list: str = "all",
                 transform: Transform | None = None, sizes: str | None = None):  # fmt: skip
        root = Path(root)
        if not (root / "images").is_dir() or not (root / "labels").is_dir():
            raise _layout_error("gta", root, "missing images/ or labels/")
        if image_list == "famix":
            list_file = root / f"gtav_split_{split}.txt"
            if not list_file.is_file():
                hint = "FAMix's image list; copy it from the FAMix repository's datasets/gta5_list/"
                raise _layout_error("gta", root, f"missing {list_file.name} ({hint})")
            names = [Path(word).stem for word in list_file.read_text().split()]
        elif image_list in ("all", "clouds"):
            names = sorted(p.stem for p in (root / "images").glob("*.png"))
            if image_list == "clouds":
                names = [n for n in names if not (n.isdigit() and int(n) in GTA5_CLOUDS_EXCLUDED)]
        else:
            raise UsageError(f"unknown GTA5 image list {image_list!r}; use all, clouds or famix")
        images = [root / "images" / f"{n}.png" for n in names]
        if missing := next((image for image in images if not image.is_file()), None):
            raise DatasetLayoutError(f"gta: {missing} is listed but missing")
        labels, suffixes = root / "labels", (".png", "_labelTrainIds.png")
        pairs = _pairs("gta", root, images, lambda p: [labels / (p.stem + s) for s in suffixes],
                       "no images/*.png")  # fmt: skip
        super().__init__("gta", pairs, read_cityscapes_label, transform, sizes or "skip", split)


class Synthia(_PairDataset):
    """SYNTHIA-RAND-CITYSCAPES, 9,400 frames of 1280x760, 16-bit labels (class id in R). Flat
    RGB/*.png + GT/LABELS/*.png (CLOUDS; "all" = 9,400), optional synthia_split_val.txt of the
    2,820 val names (RobustNet split, FAMix); or RGB/{train,val}/ + GT/LABELS/{train,val}/ (FAMix:
    6,580 / 2,820) [FAMix synthia.py]."""

    def __init__(self, root: str | Path, split: str = "train", transform: Transform | None = None,
                 sizes: str | None = None):  # fmt: skip
        root = Path(root)
        if not (root / "RGB").is_dir() or not (root / "GT" / "LABELS").is_dir():
            raise _layout_error("synthia", root, "missing RGB/ or GT/LABELS/")
        if (root / "RGB" / "train").is_dir():
            images = sorted((root / "RGB").glob("*/*.png" if split == "all" else f"{split}/*.png"))
        else:
            images = sorted((root / "RGB").glob("*.png"))
            val_file = root / "synthia_split_val.txt"
            if split in ("train", "val") and val_file.is_file():
                val = {Path(s).stem for s in val_file.read_text().split()}
                images = [p for p in images if (p.stem in val) == (split == "val")]
            elif split == "val":
                missing = "no val split (RGB/val/ or synthia_split_val.txt)"
                raise _layout_error("synthia", root, missing)
        labels = root / "GT" / "LABELS"
        pairs = _pairs("synthia", root, images, lambda p: [labels / p.relative_to(root / "RGB")],
                       f"no RGB images for split {split!r}")  # fmt: skip
        super().__init__("synthia", pairs, read_synthia_trainids, transform, sizes, split)


class Cityscapes(_PairDataset):
    """Cityscapes, 2,975 train / 500 val: leftImg8bit/<split>/<city>/*_leftImg8bit.png <-> gtFine/
    ... _gtFine_labelIds.png mapped on the fly (no createTrainIdLabelImgs), else _labelTrainIds."""

    def __init__(self, root: str | Path, split: str = "val", transform: Transform | None = None,
                 sizes: str | None = None):  # fmt: skip
        root = Path(root)
        image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        if not image_dir.is_dir() or not label_dir.is_dir():
            missing = f"missing leftImg8bit/{split}/ or gtFine/{split}/"
            raise _layout_error("cityscapes", root, missing)

        def labels_of(p: Path) -> list[Path]:
            stem, d = p.name[: -len("_leftImg8bit.png")], label_dir / p.parent.name
            return [d / f"{stem}_gtFine_labelIds.png", d / f"{stem}_gtFine_labelTrainIds.png"]

        images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
        pairs = _pairs("cityscapes", root, images, labels_of,
                       f"no leftImg8bit/{split}/<city>/*_leftImg8bit.png")  # fmt: skip
        super().__init__("cityscapes", pairs, read_cityscapes_label, transform, sizes, split)


class BDD100K(_PairDataset):
    """BDD100K 10K, 7,000 train / 1,000 val, labels already trainIds (255 = ignore), in the current
    layout (images/10k/ + labels/sem_seg/masks/), the old bdd100k_seg (seg/images/ + seg/labels/
    <stem>_train_id.png) or FAMix's flattened images/ + labels/."""

    def __init__(self, root: str | Path, split: str = "val", transform: Transform | None = None,
                 sizes: str | None = None):  # fmt: skip
        root = Path(root)
        layouts = [("images/10k", "labels/sem_seg/masks"), ("seg/images", "seg/labels"),
                   ("images", "labels")]  # fmt: skip
        found = [(root / i / split, root / lab / split) for i, lab in layouts
                 if (root / i / split).is_dir() and (root / lab / split).is_dir()]  # fmt: skip
        if not found:
            raise _layout_error("bdd", root, f"no image/label folders for split {split!r}")
        image_dir, label_dir = found[0]
        decode = functools.partial(read_label, lut=TRAINID_IDENTITY)
        pairs = _pairs("bdd", root, sorted(image_dir.glob("*.jpg")),
                       lambda p: [label_dir / (p.stem + s) for s in (".png", "_train_id.png")],
                       f"no {image_dir}/*.jpg")  # fmt: skip
        super().__init__("bdd", pairs, decode, transform, sizes, split)


class Mapillary(_PairDataset):
    """Mapillary Vistas, v1.2 labels (66 classes, palette PNG index = id), mapped to 19 classes
    with `label_map` "hrda" (FAMix, CLOUDS) or "rein" (Rein; 11 ids differ, see the table above).
    Accepts the v1.2 zip layout (validation/labels/) and the v2.0 zip (validation/v1.2/labels/)."""

    def __init__(self, root: str | Path, split: str = "val", label_map: str = "hrda",
                 transform: Transform | None = None, sizes: str | None = None):  # fmt: skip
        root = Path(root)
        if label_map not in MAPILLARY_V12_TO_19:
            raise UsageError(f"unknown Mapillary label map {label_map!r}; use hrda or rein")
        folder = {"val": "validation", "train": "training"}.get(split, split)
        image_dir = root / folder / "images"
        candidates = (root / folder / "labels", root / folder / "v1.2" / "labels")
        label_dir = next((d for d in candidates if d.is_dir()), None)
        if not image_dir.is_dir() or label_dir is None:
            missing = f"missing {folder}/images/ or {folder}/labels/"
            raise _layout_error("mapillary", root, missing)
        images = sorted(image_dir.glob("*.jpg"))
        pairs = _pairs("mapillary", root, images, lambda p: [label_dir / f"{p.stem}.png"],
                       f"no {folder}/images/*.jpg")  # fmt: skip
        decode = functools.partial(read_label, lut=MAPILLARY_V12_TO_19[label_map])
        super().__init__("mapillary", pairs, decode, transform, sizes, split)


class ACDC(_PairDataset):
    """ACDC, one condition (fog / night / rain / snow): rgb_anon/<cond>/<split>/**/*_rgb_anon.png
    (recursive, so the official <seq>/ sub-folders and CLOUDS' flattened copy both work;
    <split>_ref folders are not read) <-> gt/<same path>_gt_labelTrainIds.png, falling back to
    _gt_labelIds.png + the Cityscapes map. Val: fog 100, night 106, rain 100, snow 100."""

    CONDITIONS = ("fog", "night", "rain", "snow")

    def __init__(self, root: str | Path, condition: str, split: str = "val",
                 transform: Transform | None = None, sizes: str | None = None):  # fmt: skip
        root = Path(root)
        if condition not in self.CONDITIONS:
            raise UsageError(f"unknown ACDC condition {condition!r}; use one of {self.CONDITIONS}")
        image_dir = root / "rgb_anon" / condition / split
        if not image_dir.is_dir() or not (root / "gt").is_dir():
            raise _layout_error("acdc", root, f"missing rgb_anon/{condition}/{split}/ or gt/")

        def labels_of(p: Path) -> list[Path]:
            d = root / "gt" / p.parent.relative_to(root / "rgb_anon")
            stem = p.name[: -len("_rgb_anon.png")]
            return [d / f"{stem}_gt_labelTrainIds.png", d / f"{stem}_gt_labelIds.png"]

        images = sorted(image_dir.rglob("*_rgb_anon.png"))
        pairs = _pairs("acdc", root, images, labels_of,
                       f"no rgb_anon/{condition}/{split}/**/*_rgb_anon.png")  # fmt: skip
        super().__init__("acdc", pairs, read_cityscapes_label, transform, sizes, split)


# Folder of each dataset under --data.
DATA_DIRS = {"gta": "gta5", "synthia": "synthia", "cityscapes": "cityscapes", "bdd": "bdd100k",
             "mapillary": "mapillary", "acdc": "acdc", "toy": "toy"}  # fmt: skip
TARGET_NAMES = ("cityscapes", "bdd", "mapillary", "acdc-fog", "acdc-night", "acdc-rain",
                "acdc-snow", "synthia", "gta")  # fmt: skip


def build_dataset(name: str, data_root: str | Path, split: str, *, gta_list: str = "all",
                  mapillary_map: str = "hrda", transform: Transform | None = None,
                  sizes: str | None = None) -> Dataset:  # fmt: skip
    """The dataset called `name` (a --source or --targets value) under `data_root`. Toy: "toy"
    is the source (GTA5 layout), "toy-<domain>" a target (Cityscapes layout). `sizes` overrides
    the reader's image/label size policy ("skip", "error", "off")."""
    root = Path(data_root)
    if name == "toy":
        return GTA5(root / "toy" / "source", split, "famix", transform, sizes)
    if name.startswith("toy-"):
        if name[4:] not in TOY_DOMAINS[1:]:
            raise UsageError(f"unknown toy target {name!r}; use one of {', '.join(TOY_TARGETS)}")
        return Cityscapes(root / "toy" / name[4:], "val", transform, sizes)
    folder = root / DATA_DIRS.get(name.split("-")[0], name)
    if name == "gta":
        return GTA5(folder, split, gta_list, transform, sizes)
    if name == "mapillary":
        return Mapillary(folder, split, mapillary_map, transform, sizes)
    if name.startswith("acdc-"):
        return ACDC(folder, name[5:], split, transform, sizes)
    if name in ("synthia", "cityscapes", "bdd"):
        reader = {"synthia": Synthia, "cityscapes": Cityscapes, "bdd": BDD100K}[name]
        return reader(folder, split, transform, sizes)
    raise UsageError(f"unknown dataset {name!r}; use one of {', '.join(TARGET_NAMES)}, toy, "
                     f"{', '.join(TOY_TARGETS)}")  # fmt: skip


# =============================================================================================
# 4. Toy domain-shift dataset (runs without any download)
# =============================================================================================
# Procedurally drawn street scenes (8 of the 19 classes) in four appearance domains: "source", a
# flat-shaded "game" look in the GTA5 layout; "city" (muted, textured, noisy), "fog" and "night",
# targets in the Cityscapes layout. Each class keeps its meaning while its colour and texture
# change: a small, real domain gap. Not a benchmark: it says nothing about the papers' numbers.

TOY_DOMAINS = ("source", "city", "fog", "night")
TOY_TARGETS = tuple(f"toy-{d}" for d in TOY_DOMAINS[1:])
TOY_SIZE_WH = (256, 128)
TOY_COUNTS = {"source": (240, 48), "city": (0, 48), "fog": (0, 48), "night": (0, 48)}
TOY_VERSION = 1
_TOY_CLASSES = (0, 1, 2, 5, 8, 10, 11, 13)  # road sidewalk building pole vegetation sky person car

# Base RGB per trainId and domain (the three targets share the "city" colours).
_TOY_COLOURS = {
    "source": {0: (120, 60, 140), 1: (250, 60, 230), 2: (90, 90, 90), 5: (200, 200, 60),
               8: (40, 200, 40), 10: (60, 150, 250), 11: (250, 30, 30), 13: (30, 30, 250)},
    **dict.fromkeys(TOY_DOMAINS[1:], {
        0: (95, 92, 98), 1: (150, 140, 130), 2: (140, 110, 90), 5: (110, 110, 105),
        8: (70, 100, 45), 10: (175, 195, 215), 11: (80, 60, 70), 13: (160, 40, 40)}),
}  # fmt: skip


def toy_scene(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """One street layout as trainIds (H, W)."""
    y, x = np.mgrid[0:h, 0:w]
    label = np.full((h, w), 10, np.int64)  # sky
    horizon = int(h * rng.uniform(0.42, 0.55))
    # Buildings: a skyline of blocks of random heights.
    xs = np.sort(rng.choice(np.arange(8, w - 8), size=rng.integers(3, 7), replace=False))
    edges = np.concatenate([[0], xs, [w]])
    for a, b in zip(edges[:-1], edges[1:]):
        top = int(horizon - rng.uniform(0.15, 0.4) * h)
        label[max(top, 0) : horizon, a:b] = 2
    # Vegetation: a few blobs in front of the buildings.
    for _ in range(rng.integers(1, 4)):
        cx, cy = rng.uniform(0, w), horizon - rng.uniform(0, 0.12) * h
        rx, ry = rng.uniform(0.05, 0.12) * w, rng.uniform(0.08, 0.16) * h
        label[((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1] = 8
    # Ground: road as a trapezoid to the vanishing point, sidewalks on both sides.
    vx = w * rng.uniform(0.4, 0.6)
    t = np.clip((y - horizon) / max(h - horizon, 1), 0, 1)
    half_road = t * w * rng.uniform(0.45, 0.6)
    half_walk = half_road + t * w * rng.uniform(0.15, 0.3)
    ground = y >= horizon
    label[ground] = 8
    label[ground & (np.abs(x - vx) < half_walk)] = 1
    label[ground & (np.abs(x - vx) < half_road)] = 0
    # Poles on the sidewalks.
    for side in (-1, 1):
        for _ in range(rng.integers(0, 3)):
            ty = rng.uniform(0.3, 1.0)
            py = int(horizon + ty * (h - horizon)) - 1
            px = int(vx + side * (ty * w * 0.5 + 2))
            width, top = max(1, int(1 + 3 * ty)), int(py - (0.2 + 0.5 * ty) * h)
            label[max(top, 0) : py, max(px - width, 0) : max(px, 1)] = 5
    # Cars on the road and pedestrians on the sidewalks, scaled with distance.
    for _ in range(rng.integers(1, 4)):
        ty = rng.uniform(0.2, 0.9)
        cy, cw, ch = int(horizon + ty * (h - horizon)), int(10 + 60 * ty), int(6 + 30 * ty)
        cx = int(vx + rng.uniform(-0.6, 0.6) * ty * w * 0.45)
        label[max(cy - ch, 0) : cy, max(cx - cw // 2, 0) : max(cx + cw // 2, 0)] = 13
    for _ in range(rng.integers(0, 4)):
        ty = rng.uniform(0.2, 0.9)
        py, side = int(horizon + ty * (h - horizon)), rng.choice([-1, 1])
        px = int(vx + side * ty * w * rng.uniform(0.5, 0.7))
        pw, ph = int(2 + 5 * ty), int(8 + 30 * ty)
        label[max(py - ph, 0) : py, max(px - pw // 2, 0) : max(px + pw // 2, 0)] = 11
    return label


def toy_render(label: np.ndarray, domain: str, rng: np.random.Generator) -> np.ndarray:
    """Appearance of one scene in one domain, uint8 (H, W, 3)."""
    h, w = label.shape
    y, x = np.mgrid[0:h, 0:w]
    lut = np.zeros((256, 3), np.float32)
    for c, rgb in _TOY_COLOURS[domain].items():
        lut[c] = np.asarray(rgb) + rng.normal(0, 8 if domain == "source" else 14, 3)
    image = lut[label]
    if domain == "source":
        image += rng.normal(0, 3, image.shape)  # nearly flat shading
    else:
        # Textures: stripes on the road, window grid on buildings, leafy noise, sensor noise.
        image[label == 2] *= (0.75 + 0.25 * ((x // 6 + y // 5) % 2))[label == 2, None]
        image[label == 0] *= (0.9 + 0.1 * np.sin(x * 0.9 + y * 0.3))[label == 0, None]
        image[label == 8] *= rng.uniform(0.6, 1.3, (h, w))[label == 8, None]
        image += rng.normal(0, 10, image.shape)
    # Lane marks belong to the road class.
    image[(label == 0) & ((x + y // 2) % 24 < 2)] = 230 if domain != "night" else 140
    depth = 1.0 - y / h  # far = 1 at the top
    if domain == "fog":
        haze = np.clip(0.25 + 0.75 * depth, 0, 1)[..., None] * rng.uniform(0.6, 0.85)
        image = image * (1 - haze) + 200 * haze
    elif domain == "night":
        image = image * 0.28 + np.array([0, 5, 25])
        for _ in range(rng.integers(2, 5)):  # street lamps
            cx, cy = rng.uniform(0, w), rng.uniform(0.2, 0.6) * h
            glow = np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * (0.06 * w) ** 2)))
            image += glow[..., None] * np.array([120, 100, 50])
        image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def save_palette_png(path: Path, ids: np.ndarray) -> None:
    """Cityscapes labelIds as a palette PNG in the GTA5 style (colour = its trainId's)."""
    im = Image.fromarray(ids.astype(np.uint8), mode="P")
    im.putpalette(PALETTE[CITYSCAPES_ID_TO_TRAINID].flatten().tolist())
    im.save(path)


def make_toy_dataset(data_root: str | Path, seed: int = 0, counts: dict | None = None) -> Path:
    """Write <data_root>/toy unless there from this version and seed. toy/toy.json, written first
    as "incomplete" and completed last, marks a folder of ours: only such a folder is rewritten."""
    root, counts = Path(data_root) / "toy", counts or TOY_COUNTS
    stamp = {"version": TOY_VERSION, "seed": seed, "counts": counts, "size_wh": TOY_SIZE_WH}
    stamp = json.loads(json.dumps(stamp))  # tuples -> lists, as read back from the file
    stamp_file = root / "toy.json"
    if stamp_file.is_file():
        try:
            found = json.loads(stamp_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UsageError(
                f"{stamp_file} is not a valid toy marker (truncated or edited); delete {root} to "
                "have the toy dataset written again"
            ) from None
        if found == stamp:
            return root
        shutil.rmtree(root)  # ours: another version, seed or size, or an interrupted write
    elif root.exists():
        raise UsageError(
            f"{root} exists but was not written by this project (no toy.json): move it away or "
            "pass another --data"
        )
    root.mkdir(parents=True)
    stamp_file.write_text(json.dumps({**stamp, "incomplete": True}))
    w, h = TOY_SIZE_WH
    for d, domain in enumerate(TOY_DOMAINS):
        n_train, n_val = counts[domain]
        if domain == "source":
            img_dir, gt_dir = root / "source" / "images", root / "source" / "labels"
        else:
            img_dir = root / domain / "leftImg8bit" / "val" / "toy"
            gt_dir = root / domain / "gtFine" / "val" / "toy"
        img_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n_train + n_val):
            rng = np.random.default_rng([seed, d, i])
            label = toy_scene(rng, w, h)
            image = Image.fromarray(toy_render(label, domain, rng))
            if domain == "source":
                image.save(img_dir / f"{i + 1:05d}.png", compress_level=1)
                save_palette_png(gt_dir / f"{i + 1:05d}.png", TRAINID_TO_ID[label])
            else:
                stem = f"toy_{i:06d}_000019"
                image.save(img_dir / f"{stem}_leftImg8bit.png", compress_level=1)
                Image.fromarray(TRAINID_TO_ID[label]).save(gt_dir / f"{stem}_gtFine_labelIds.png")
        if domain == "source":
            names = [f"{i + 1:05d}.png" for i in range(n_train + n_val)]
            (root / "source" / "gtav_split_train.txt").write_text("\n".join(names[:n_train]) + "\n")
            (root / "source" / "gtav_split_val.txt").write_text("\n".join(names[n_train:]) + "\n")
    stamp_file.write_text(json.dumps(stamp))
    return root


# =============================================================================================
# 5. Augmentation of (image uint8 (3,H,W), label int64 (H,W)), the deterministic loader
# =============================================================================================


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=g).item()


def resize_pair(image: Tensor, label: Tensor | None, size_hw: tuple[int, int],
                image_interp: str = "bilinear") -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Resize image (antialiased, like Pillow) and label (nearest, pixel-centre rule)."""
    size_hw = (int(size_hw[0]), int(size_hw[1]))
    if tuple(image.shape[-2:]) != size_hw:
        interp = InterpolationMode(image_interp)  # "bilinear", "bicubic" or "nearest"
        image = TF.resize(image, list(size_hw), interpolation=interp, antialias=True)
    if label is not None and tuple(label.shape[-2:]) != size_hw:
        label = F.interpolate(label[None, None].float(), size=size_hw, mode="nearest-exact")
        label = label[0, 0].long()
    return image, label


def fit_size(h: int, w: int, long_side: int, short_side: int) -> tuple[int, int]:
    """mmcv `rescale_size(keep_ratio=True)`: the largest size fitting (long, short), rounded
    half up. E.g. 1224x1632 in (1024, 512) -> 512x683 [mmcv rescale_size]."""
    factor = min(long_side / max(h, w), short_side / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def short_side_size(h: int, w: int, short: int) -> tuple[int, int]:
    """detectron2 ResizeShortestEdge without max size: 720x1280 -> 1024x1820."""
    factor = short / min(h, w)
    return int(h * factor + 0.5), int(w * factor + 0.5)


def random_scale(image: Tensor, label: Tensor, scale_range: tuple[float, float], g: torch.Generator,
                 image_interp: str = "bilinear") -> tuple[Tensor, Tensor]:  # fmt: skip
    """Rescale both by s ~ U(scale_range)."""
    s = _uniform(g, *scale_range)
    h, w = image.shape[-2:]
    return resize_pair(image, label, (round(h * s), round(w * s)), image_interp)


def random_crop(image: Tensor, label: Tensor, crop_hw: tuple[int, int] | int,
                g: torch.Generator, cat_max_ratio: float = 1.0, pad: bool = True,
                max_tries: int = 10) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Random crop, padded (image 0, label 255) at the bottom/right if smaller. cat_max_ratio < 1:
    draw again (up to 10 times, mmseg RandomCrop) while one class covers more of the crop."""
    ch, cw = (crop_hw, crop_hw) if isinstance(crop_hw, int) else crop_hw
    h, w = image.shape[-2:]
    for _ in range(1 + (max_tries if cat_max_ratio < 1.0 else 0)):
        top = int(torch.randint(max(h - ch, 0) + 1, (), generator=g))
        left = int(torch.randint(max(w - cw, 0) + 1, (), generator=g))
        if cat_max_ratio >= 1.0:
            break
        window = label[top : top + ch, left : left + cw]
        counts = torch.bincount(window[window != IGNORE_INDEX].flatten(), minlength=1)
        if (counts > 0).sum() > 1 and counts.max().item() / counts.sum().item() < cat_max_ratio:
            break
    image = image[:, top : top + ch, left : left + cw]
    label = label[top : top + ch, left : left + cw]
    return pad_pair(image, label, (ch, cw)) if pad else (image, label)


def pad_pair(image: Tensor, label: Tensor | None,
             size_hw: tuple[int, int]) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Pad bottom/right to at least size_hw: image with 0, label with 255."""
    ph, pw = max(size_hw[0] - image.shape[-2], 0), max(size_hw[1] - image.shape[-1], 0)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0)
        if label is not None:
            label = F.pad(label, (0, pw, 0, ph), value=IGNORE_INDEX)
    return image, label


def random_hflip(image: Tensor, label: Tensor, g: torch.Generator,
                 p: float = 0.5) -> tuple[Tensor, Tensor]:  # fmt: skip
    if torch.rand((), generator=g).item() < p:
        return image.flip(-1), label.flip(-1)
    return image, label


def color_jitter(image: Tensor, g: torch.Generator, brightness: float = 0.0, contrast: float = 0.0,
                 saturation: float = 0.0, hue: float = 0.0) -> Tensor:  # fmt: skip
    """torchvision ColorJitter semantics (factors ~ U(max(0, 1 - x), 1 + x), hue ~ U(-h, h), the
    four operations in random order), drawing from `g`."""
    ops = []
    for x, adjust in ((brightness, TF.adjust_brightness), (contrast, TF.adjust_contrast),
                      (saturation, TF.adjust_saturation), (hue, TF.adjust_hue)):  # fmt: skip
        if x:
            low, high = (-x, x) if adjust is TF.adjust_hue else (max(0.0, 1 - x), 1 + x)
            ops.append((adjust, _uniform(g, low, high)))
    for i in torch.randperm(len(ops), generator=g).tolist():
        image = ops[i][0](image, ops[i][1])
    return image


# OpenCV's uint8 HSV arithmetic (imgproc color_hsv: 12-bit fixed point with division tables).
HSV_SHIFT = 12
HSV_HUE_RANGE = 180  # 8-bit hue: degrees / 2
_DIVISORS = torch.arange(256, dtype=torch.float64)
# S = diff * 255 / V and H = hue numerator * 180 / (6 * diff), each as a rounded 12-bit multiplier
# (cvRound rounds half to even, as torch.round does); entry 0 is 0
HSV_SDIV = torch.where(_DIVISORS > 0, (255 << HSV_SHIFT) / _DIVISORS, 0).round().long()
HSV_HDIV = torch.where(_DIVISORS > 0, (180 << HSV_SHIFT) / (6 * _DIVISORS), 0).round().long()


def rgb_to_hsv_cv2(img: Tensor) -> Tensor:
    """uint8 RGB (3, H, W) -> HSV (3, H, W) int64 exactly as cv2.cvtColor(COLOR_BGR2HSV) computes
    it for uint8: H in [0, 180), S and V in [0, 255] [OpenCV color_hsv RGB2HSV_b]."""
    r, g, b = img.long()
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    half = 1 << (HSV_SHIFT - 1)
    s = (diff * HSV_SDIV[v] + half) >> HSV_SHIFT
    # hue numerator in units of diff/60 degrees: R max -> g - b, G max -> b - r + 2 diff, else
    # r - g + 4 diff (R is tested first, then G)
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * HSV_HDIV[diff] + half) >> HSV_SHIFT  # arithmetic shift: floor for negatives
    h = torch.where(h < 0, h + HSV_HUE_RANGE, h)
    return torch.stack([h, s, v])


def hsv_to_rgb_cv2(hsv: Tensor) -> Tensor:
    """uint8 RGB (3, H, W) as cv2 COLOR_HSV2BGR in opencv-python 4.8 (the official environment):
    float32 H*6/180, S*(1/255), V*(1/255), sector formulas, * 255 truncated [OpenCV color_hsv
    HSV2RGB_b, vectorised path]. Float ties may differ by one level (7 of 196,608 pixels)."""
    h = hsv[0].float() * (6.0 / 180.0)
    s, v = hsv[1].float() * (1.0 / 255.0), hsv[2].float() * (1.0 / 255.0)
    sector = torch.floor(h)
    f = h - sector
    sector = sector.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    # rows: sector 0..5 -> (r, g, b)
    r = torch.stack([v, q, p, p, t, v]).gather(0, sector[None])[0]
    gg = torch.stack([t, v, v, q, p, p]).gather(0, sector[None])[0]
    b = torch.stack([p, p, t, v, v, q]).gather(0, sector[None])[0]
    return (torch.stack([r, gg, b]) * 255.0).clamp(0, 255).to(torch.uint8)  # truncation


def to_uint8_truncated(x: Tensor, alpha: float = 1.0, beta: float = 0.0) -> Tensor:
    """float32 x * alpha + beta, clipped to [0, 255], truncated to uint8: the `convert` step of
    mmseg PhotoMetricDistortion and PointRend ColorAugSSDTransform."""
    return (x.float() * alpha + beta).clamp(0, 255).to(torch.uint8)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 or 0..255 float (B,3,H,W) -> float ((x / 255) - mean) / std; mean/std on [0, 1]."""
    mean_t = torch.tensor(mean, device=images.device).view(1, 3, 1, 1) * 255
    std_t = torch.tensor(std, device=images.device).view(1, 3, 1, 1) * 255
    return (images.float() - mean_t) / std_t


def _sample_seed(seed: int, position: int, salt: str = "") -> int:
    """A per-sample seed that depends only on (run seed, position in the sample stream)."""
    digest = hashlib.blake2b(f"{salt}{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def epoch_indices(n: int, seed: int, epoch: int, repeat_factors: Sequence[float] | None) -> list:
    """Shuffled indices of one epoch. With repeat factors r_i (detectron2 RepeatFactorTraining-
    Sampler), index i appears floor(r_i) times plus once more with probability frac(r_i)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if repeat_factors is None:
        return torch.randperm(n, generator=g).tolist()
    r = torch.as_tensor(repeat_factors, dtype=torch.float64)
    reps = r.floor() + (torch.rand(n, generator=g, dtype=torch.float64) < (r - r.floor())).double()
    idx = torch.repeat_interleave(torch.arange(n), reps.long())
    return idx[torch.randperm(len(idx), generator=g)].tolist()


def _batch_plan(n: int, global_batch: int, rank: int, world: int, seed: int, start_iter: int,
                repeat_factors: Sequence[float] | None) -> Iterator[list]:  # fmt: skip
    """Endless per-rank batches of (index, sample seed) from iteration `start_iter` on: the global
    batch of iteration t is stream positions [t*B, (t+1)*B); rank r takes its r-th slice."""
    per_rank, position = global_batch // world, start_iter * global_batch
    epoch, offset, order = 0, 0, epoch_indices(n, seed, 0, repeat_factors)
    while True:
        batch = []
        for p in range(position, position + global_batch):
            while p - offset >= len(order):  # the next epoch (whole epochs before the start too)
                offset, epoch = offset + len(order), epoch + 1
                order = epoch_indices(n, seed, epoch, repeat_factors)
            batch.append((order[p - offset], _sample_seed(seed, p)))
        position += global_batch
        yield batch[rank * per_rank : (rank + 1) * per_rank]


def _seed_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    np.random.seed(info.seed % 2**32)
    random.seed(info.seed)


class TrainLoader:
    """`next(loader)`: the next per-rank batch. The samples and their augmentation draws depend on
    (seed, iteration, position) only: a run resumed at iteration t sees the same batches."""

    def __init__(self, dataset: Dataset, global_batch: int, dist: Dist, seed: int, workers: int,
                 start_iter: int = 0, repeat_factors: Sequence[float] | None = None,
                 collate: Callable | None = None):  # fmt: skip
        if global_batch % dist.world_size:
            raise UsageError(
                f"--batch-size {global_batch} is not divisible by the "
                f"{dist.world_size} processes; use a multiple of {dist.world_size}"
            )
        if len(dataset) == 0:
            raise UsageError("the training dataset is empty; check --data and --source")
        plan = _batch_plan(len(dataset), global_batch, dist.rank, dist.world_size, seed,
                           start_iter, repeat_factors)  # fmt: skip
        # own generator: building the loader leaves the global RNG alone
        self.loader = DataLoader(dataset, batch_sampler=plan, num_workers=workers,
                                 collate_fn=collate, worker_init_fn=_seed_worker,
                                 pin_memory=dist.device.type == "cuda",
                                 persistent_workers=workers > 0,
                                 generator=torch.Generator().manual_seed(seed))  # fmt: skip
        self._it = iter(self.loader)

    def __next__(self):
        return next(self._it)

    def __iter__(self):
        return self


# =============================================================================================
# 6. Evaluation: confusion matrix, mIoU, inference, per-target resize, prediction pictures
# =============================================================================================


class ConfusionMatrix:
    """Dataset-level confusion matrix (rows = ground truth, columns = prediction); ground truth 255
    (or outside 0..C-1) is ignored, predictions there never count. IoU_c = TP / (TP + FP + FN)."""

    def __init__(self, num_classes: int = NUM_CLASSES, device: str | torch.device = "cpu"):
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: Tensor, label: Tensor) -> None:
        label = label.to(self.mat.device).flatten().long()
        pred = pred.to(self.mat.device).flatten().long()
        valid = (label >= 0) & (label < self.num_classes)
        idx = label[valid] * self.num_classes + pred[valid]
        self.mat += torch.bincount(idx, minlength=self.num_classes**2).view_as(self.mat)

    def all_reduce(self) -> None:
        if torch_dist.is_available() and torch_dist.is_initialized():
            torch_dist.all_reduce(self.mat)

    def ious(self) -> np.ndarray:
        m = self.mat.double().cpu().numpy()
        tp = np.diag(m)
        union = m.sum(0) + m.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def miou(self, mode: str = "nanmean", subset: Sequence[int] | None = None) -> float:
        """Mean IoU in percent.
        "nanmean"    [FAMix stream_metrics.py, mmseg iou_metric.py, cityscapesScripts]: classes with
                     neither GT nor prediction are skipped; predicted-but-absent classes count as 0.
        "present_gt" [CLOUDS semantic_evaluation.py]: mean over classes with >= 1 GT pixel.
        `subset`: restrict to these classes (e.g. SYNTHIA16, SYNTHIA13)."""
        keep = self._kept(mode, subset)
        return float(np.nanmean(self.ious()[keep]) * 100) if keep.any() else float("nan")

    def _kept(self, mode: str, subset: Sequence[int] | None) -> np.ndarray:
        if mode not in ("nanmean", "present_gt"):
            raise ValueError(f"unknown mIoU mode {mode!r}")
        keep = ~np.isnan(self.ious()) if mode == "nanmean" else self.mat.sum(1).cpu().numpy() > 0
        if subset is not None:
            keep &= np.isin(np.arange(len(keep)), list(subset))
        return keep

    def per_class(self, mode: str = "nanmean") -> dict[str, float | None]:
        """IoU (percent) per class name; None for the classes the mode leaves out."""
        ious, keep = self.ious(), self._kept(mode, None)
        return {n: (round(float(ious[i]) * 100, 4) if keep[i] else None)
                for i, n in enumerate(CLASS_NAMES[: self.num_classes])}  # fmt: skip


def slide_windows(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg slide_inference grid: n = max(L - crop + stride - 1, 0) // stride + 1 windows per
    axis, start i*stride, shifted back so the last one ends at the border; an image smaller than
    the crop gives one window covering it (no padding). Returns (y1, y2, x1, x2)."""
    out = []
    for i in range(max(h - crop + stride - 1, 0) // stride + 1):
        for j in range(max(w - crop + stride - 1, 0) // stride + 1):
            y2, x2 = min(i * stride + crop, h), min(j * stride + crop, w)
            out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return out


@dataclasses.dataclass(frozen=True)
class EvalResize:
    """How a target image (and maybe its label) is resized before inference. rule: ("none",) |
    ("short", S) [detectron2 ResizeShortestEdge] | ("height_crop", S) [FAMix Mapillary: height S,
    then a centre S x S crop; narrower images are padded, label with 255]. resize_gt: resize the
    label with the image (nearest); else score at the label's own size."""

    rule: tuple = ("none",)
    resize_gt: bool = False
    image_interp: str = "bilinear"


def eval_resize(image: Tensor, label: Tensor, spec: EvalResize) -> tuple[Tensor, Tensor]:
    (h, w), kind = image.shape[-2:], spec.rule[0]
    if kind == "none":
        return image, label
    if kind not in ("short", "height_crop"):
        raise ValueError(f"unknown eval resize rule {spec.rule!r}")
    s = spec.rule[1]
    size = short_side_size(h, w, s) if kind == "short" else (s, int(w / h * s))
    image, new_label = resize_pair(image, label, size, spec.image_interp)
    label = new_label if (spec.resize_gt or kind == "height_crop") else label
    if kind == "height_crop":  # the central s x s window (the height is s now); a narrower image
        # is centred and padded (image 0, label 255). FAMix's own CenterCropPad pads labels with
        # 0 (= road) and mis-centres portrait images: not copied.
        w = image.shape[-1]
        if w >= s:
            x1 = (w - s) // 2
            image, label = image[..., x1 : x1 + s], label[..., x1 : x1 + s]
        else:
            left = (s - w) // 2
            image = F.pad(image, (left, s - w - left), value=0)
            label = F.pad(label, (left, s - w - left), value=IGNORE_INDEX)
    return image, label


class _EvalView(Dataset):
    """The rank's share of a target dataset, resized for evaluation in the loader workers."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], spec: EvalResize):
        self.dataset, self.indices, self.spec = dataset, list(indices), spec

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, label, name = self.dataset[self.indices[i]]
        return *eval_resize(image, label, self.spec), name, self.indices[i]


@torch.inference_mode()
def evaluate_dataset(predict: Callable[[Tensor], Tensor], dataset: Dataset, *,
                     resize: EvalResize, dist: Dist, miou_mode: str = "nanmean",
                     align_corners: bool = False, workers: int = 2, batch_size: int = 1,
                     save_preds: int = 0, save_dir: str | Path | None = None,
                     subsets: dict | None = None, desc: str = "eval") -> dict:  # fmt: skip
    """Score `predict` (uint8 (B,3,h,w) -> logits (B,C,h',w'), resized bilinearly to the label,
    argmax), `batch_size` images of one size at a time, cuDNN autotuning off (it would tune every
    size). Returns miou, per_class_iou, num_images and miou_<name> per `subsets` (SYNTHIA16)."""
    view = _EvalView(dataset, range(dist.rank, len(dataset), dist.world_size), resize)
    # own generator: evaluating leaves the global RNG alone (resume is exact either way)
    loader = DataLoader(view, batch_size=batch_size, num_workers=workers, collate_fn=list,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    cm = ConfusionMatrix(NUM_CLASSES, dist.device)
    tuned, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    with tqdm(total=len(view), desc=desc, disable=not dist.is_main, **BAR) as bar:
        for items in loader:  # runs of consecutive items of one image size and one label size:
            for _, run in itertools.groupby(items, key=lambda item: (item[0].shape, item[1].shape)):
                group = list(run)
                images = torch.stack([image for image, *_ in group])  # (B, 3, h, w)
                logits = predict(images.to(dist.device, non_blocking=True))
                label_hw = group[0][1].shape[-2:]
                if logits.shape[-2:] != label_hw:
                    logits = F.interpolate(logits.float(), size=label_hw, mode="bilinear",
                                           align_corners=align_corners)  # fmt: skip
                for (image, label, name, index), pred in zip(group, logits.argmax(1)):
                    cm.update(pred, label)
                    if save_dir is not None and index < save_preds:
                        path = Path(save_dir) / f"{index:05d}_{name}.png"
                        save_prediction_strip(path, image, label, pred)
            bar.update(len(items))
    torch.backends.cudnn.benchmark = tuned
    cm.all_reduce()
    result = {"miou": round(cm.miou(miou_mode), 4), "per_class_iou": cm.per_class(miou_mode),
              "num_images": len(dataset)}  # fmt: skip
    for key, subset in (subsets or {}).items():
        result[f"miou_{key}"] = round(cm.miou(miou_mode, subset), 4)
    return result


def target_mean(results: dict[str, dict]) -> tuple[float | None, list[str]]:
    """Mean mIoU and names of the targets; "source-val" (a training monitor) is not a target."""
    names = [name for name in results if name != "source-val"]
    return (float(np.mean([results[n]["miou"] for n in names])) if names else None), names


def format_results(results: dict[str, dict], iteration: int | None = None) -> str:
    """What an evaluation prints: per target mIoU and subset means, their mean, per-class IoUs."""
    lines = [] if iteration is None else [f"iteration {iteration}"]
    lines.append(f"{'target':<14} {'mIoU':>7}")
    for name, r in results.items():
        extra = "  ".join(f"{k}={v:.2f}" for k, v in r.items() if k.startswith("miou_"))
        lines.append(f"{name:<14} {r['miou']:7.2f}  {extra}".rstrip())
    mean, names = target_mean(results)
    if len(names) > 1:
        left_out = ", source-val left out" if "source-val" in results else ""
        lines.append(f"{'mean':<14} {mean:7.2f}  over {len(names)} targets{left_out}")
    for name, r in results.items():
        ious = ", ".join(f"{k} {v:.1f}" for k, v in r["per_class_iou"].items() if v is not None)
        lines.append(f"  {name}: {ious}")
    return "\n".join(lines)


def save_prediction_strip(path: str | Path, image: Tensor, label: Tensor,
                          pred: Tensor) -> None:  # fmt: skip
    """image | ground truth | prediction in the Cityscapes palette, and the prediction as _pred."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = image.permute(1, 2, 0).cpu().numpy().astype(np.uint8)
    gt, pr = (PALETTE[t.cpu().numpy().clip(0, 255).astype(np.uint8)] for t in (label, pred))
    h = max(img.shape[0], gt.shape[0], pr.shape[0])
    tiles = [np.pad(t, ((0, h - t.shape[0]), (0, 0), (0, 0))) for t in (img, gt, pr)]
    Image.fromarray(np.concatenate(tiles, 1)).save(path)
    Image.fromarray(pr).save(path.with_name(path.stem + "_pred.png"))


# =============================================================================================
# 7. Device, AMP, DDP, seeds, random streams
# =============================================================================================


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_arg: str | None = None) -> Dist:
    """One process, or under torchrun (WORLD_SIZE set) NCCL on cuda:LOCAL_RANK / Gloo on CPU."""
    want = device_arg or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda was asked for but no CUDA device is visible; use --device cpu"
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device(want))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if want.startswith("cuda") else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(local)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local, device, True)


def autocast(device: torch.device, enabled: bool) -> tuple[Callable, torch.amp.GradScaler | None]:
    """(autocast factory, scaler): bf16 where supported, else fp16 + GradScaler; off on CPU."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext, None
    if torch.cuda.is_bf16_supported():
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16), None
    return lambda: torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


def setup(args: argparse.Namespace) -> Dist:
    """Before the first tensor: threads, device and processes, TF32, cuDNN autotuning, seeds."""
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    dist = setup_distributed(args.device)
    if dist.device.type == "cuda":
        # TF32: fp32 matmuls and convolutions on tensor cores (10-bit mantissa products)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
        # the training crops have one fixed size: let cuDNN pick its fastest kernels once
        torch.backends.cudnn.benchmark = fast_path(args, dist)
    elif args.amp:
        warn("--amp has no effect on CPU: this run computes in fp32")
    seed_everything(args.seed, dist.rank)
    return dist


def fast_path(args: argparse.Namespace, dist: Dist) -> bool:
    """--fast auto = on with CUDA only (on CPU the tests compare both paths)."""
    return args.fast == "on" or (args.fast == "auto" and dist.device.type == "cuda")


def memory_format(args: argparse.Namespace, dist: Dist) -> torch.memory_format:
    """channels_last trunks on the fast path: cuDNN's tensor-core convolutions work in NHWC."""
    return torch.channels_last if fast_path(args, dist) else torch.contiguous_format


def optimizer_options(args: argparse.Namespace, dist: Dist, kind: str) -> dict[str, bool]:
    """The optimiser's fast path: fused AdamW (one kernel for all tensors) or foreach SGD."""
    if not fast_path(args, dist):
        return {}
    return {"fused": True} if kind == "adamw" else {"foreach": True}


def maybe_compile(module: nn.Module, args: argparse.Namespace) -> nn.Module:
    """torch.compile with --compile (off by default: it compiles for minutes)."""
    return torch.compile(module) if args.compile else module


def seed_everything(seed: int, rank: int = 0) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def convert_sync_bn(model: nn.Module, dist: Dist) -> nn.Module:
    """BatchNorm -> SyncBatchNorm under multi-GPU DDP (frozen BNs in eval mode are unaffected)."""
    if dist.enabled and dist.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def step_generators(seed: int, iteration: int, global_batch: int, dist: Dist) -> list:
    """A generator per sample, seeded by (seed, iteration, position): the same on any world size."""
    per_rank = global_batch // dist.world_size
    first = iteration * global_batch + dist.rank * per_rank
    return [torch.Generator(dist.device).manual_seed(_sample_seed(seed, first + k, "step:"))
            for k in range(per_rank)]  # fmt: skip


def global_mean(values: dict[str, float], dist: Dist) -> dict[str, float]:
    """Each value averaged over the processes: a non-finite loss stops all of them together."""
    if not dist.enabled:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=dist.device)
    torch_dist.all_reduce(t)
    return dict(zip(values, (t / dist.world_size).tolist()))


def wrap_ddp(model: nn.Module, dist: Dist, find_unused: bool = False) -> nn.Module:
    if not dist.enabled:
        return model
    ids = [dist.local_rank] if dist.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=ids, find_unused_parameters=find_unused
    )


def unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def poly_lr(base_lr: float, iteration: int, max_iters: int, power: float = 0.9,
            min_lr: float = 0.0) -> float:  # fmt: skip
    """Polynomial decay base * (1 - t/T)^power, floored at min_lr."""
    return max(base_lr * (1 - iteration / max_iters) ** power, min_lr)


def get_rng_state() -> dict:
    """All random states as tensors/lists, so the checkpoint loads with weights_only=True."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, state, gauss = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    numpy = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
             "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}  # fmt: skip
    python = {"version": version, "state": list(state), "gauss": gauss}
    return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": numpy, "python": python}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n, p = state["numpy"], state["python"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


@contextlib.contextmanager
def rng_neutral() -> Iterator[None]:
    """Run a block (an evaluation) without moving any global random stream: resume stays exact."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


# =============================================================================================
# 8. Checkpoints, the output folder, weight files, the run log
# =============================================================================================


def strip_prefixes(state_dict: dict) -> dict:
    """Drop the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes."""
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state_dict.items()}


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """Temporary file, fsync, os.replace: a crash or a full disk leaves the previous file whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        reason = getattr(e, "strerror", None) or one_line(e)
        if "file write failed" in str(e) or "No space" in str(e):
            reason = "no space left on the device"
        raise CheckpointError(f"cannot write {path} ({reason}); the previous file, if any, is "
                              "intact: free space or pass a writable --out") from None  # fmt: skip
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def save_checkpoint(path: str | Path, *, method: str, iteration: int, model_state: dict,
                    optimizer: torch.optim.Optimizer | None, scaler: torch.amp.GradScaler | None,
                    args: argparse.Namespace | dict, metrics: dict | None = None,
                    extra: dict | None = None) -> None:  # fmt: skip
    """One plain dict (+ `extra`) that loads with weights_only=True, written by rank 0 only."""
    if not is_main():
        return
    ckpt = {
        "method": method,
        "iter": int(iteration),
        "model": strip_prefixes(model_state),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "args": args_to_primitives(args),
        "rng": get_rng_state(),
        "metrics": metrics or {},
    }
    atomic_torch_save({**ckpt, **(extra or {})}, path)


def load_checkpoint(path: str | Path, method: str | None = None) -> dict:
    """A save_checkpoint dict; one line for a missing, unreadable or another method's file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (check the --resume/--init path)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, unsafe pickle
        raise CheckpointError(
            f"cannot read checkpoint {path}: truncated or not a checkpoint of this "
            f"project ({type(e).__name__}); use another file"
        ) from None
    if not isinstance(ckpt, dict) or "method" not in ckpt:
        raise CheckpointError(
            f"{path} is not a checkpoint written by this project (no 'method' key)"
        )
    if method is not None and ckpt["method"] != method:
        raise CheckpointError(
            f"{path} is a {ckpt['method']} checkpoint; {method}.py needs one of its own"
        )
    return ckpt


def restore_training_state(ckpt: dict, optimizer: torch.optim.Optimizer | None,
                           scaler: torch.amp.GradScaler | None) -> int:  # fmt: skip
    """Optimizer, scaler and RNG states (not the model); returns the iteration to continue at."""
    if optimizer is not None and ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return int(ckpt["iter"])


def check_resume_args(ckpt: dict, args: argparse.Namespace, names: Sequence[str],
                      given: str = "--resume") -> None:  # fmt: skip
    """Each flag in `names` must match the checkpoint's (given as --resume/--init): same model."""
    path = getattr(args, given.removeprefix("--").replace("-", "_"), None)
    for name in names:
        if name in ckpt["args"] and ckpt["args"][name] != args_to_primitives(args).get(name):
            flag = "--" + name.replace("_", "-")
            raise CheckpointError(
                f"{given} {path} was trained with {flag} {ckpt['args'][name]}, this run has "
                f"{flag} {getattr(args, name)}; use the same value"
            )


def prepare_out_dir(args: argparse.Namespace) -> Path:
    """--out before any work: a writable folder, its last.pt kept only with --resume / --overwrite
    (or --eval-only); a new run starts a fresh log.jsonl and results.json."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder; pass a folder path")
    last = out / "last.pt"
    if last.is_file() and not (args.resume or args.overwrite or args.eval_only):
        raise UsageError(
            f"{out} already holds a run ({last}): continue it with --resume {last}, start over "
            "with --overwrite, or pass another --out"
        )
    probe = out / f".write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(
            f"cannot write to --out {out} ({e.strerror}); pass a writable folder"
        ) from None
    if not (args.resume or args.eval_only) and is_main():
        for name in ("log.jsonl", "results.json"):
            (out / name).unlink(missing_ok=True)
    return out


def read_weights_file(path: str | Path, what: str, hint: str) -> Any:
    """torch.load(weights_only=True: no code runs) on the CPU; a bad file: one line with `hint`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path} ({hint})")
    # The official releases store numpy scalars beside the tensors (FAMix's best_score is a numpy
    # float64 [FAMix main.py::save_ckpt]); weights_only=True admits them only when listed.
    scalar = (getattr(np, "_core", None) or np.core).multiarray.scalar
    dtypes = [getattr(np.dtypes, n) for n in ("Float64DType", "Float32DType", "Int64DType")]
    try:
        with torch.serialization.safe_globals([scalar, (scalar, "numpy.core.multiarray.scalar"),
                                               np.dtype, *dtypes]):  # fmt: skip
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or content weights_only refuses
        raise CheckpointError(
            f"cannot read {what} {path} ({type(e).__name__}): not a readable torch file ({hint})"
        ) from None


def load_state_strict(module: nn.Module, state: dict[str, Tensor], source: str, hint: str,
                      may_lack: Sequence[str] = ()) -> int:  # fmt: skip
    """load_state_dict failing with one line (a few missing, unexpected, misshaped keys; `hint`);
    keys under a `may_lack` prefix may be absent (a frozen backbone). Returns the count loaded."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(tuple(may_lack) or ("\0",))]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{source} does not fit this model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong)} of another "
            f"shape (e.g. {wrong[:3]}); {hint}"
        )
    module.load_state_dict(state, strict=not may_lack)
    return len(state)


def require_download(what: str, hint: str, host: str = "huggingface.co") -> None:
    """Offline, open_clip's hub client retries for a minute: fail at once instead, with `hint`."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UsageError(f"cannot download {what}: HF_HUB_OFFLINE=1; {hint}")
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        raise UsageError(f"cannot download {what}: {host} is not reachable; {hint}") from None


def require_open_clip_tag(model: str, tag: str, hint: str) -> None:
    """Before open_clip loads by tag: a tag of the model, its weights cached or downloadable."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model)
    if tag not in tags:
        raise UsageError(f"--pretrained {tag}: not a file, not none, not an open_clip tag of "
                         f"{model} ({', '.join(tags)})")  # fmt: skip
    if not open_clip_cached(model, tag):
        require_download(f"the open_clip weights {model} / {tag}", hint)


def open_clip_cached(model: str, tag: str) -> bool:
    """Whether open_clip's weights for (model, tag) are already in the local hub cache."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg or cfg.get("file"):
        return bool(cfg)
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    repo, filename = os.path.split(cfg.get("hf_hub", ""))  # "org/name/" or "org/name/file"
    names = {filename, "open_clip_model.safetensors", "open_clip_pytorch_model.bin"} - {""}
    return bool(repo) and any(isinstance(try_to_load_from_cache(repo, n), str) for n in names)


class RunLog:
    """out/log.jsonl: a header record (args, git commit, versions, device, + header_extra), then
    one record per log step and evaluation. out/results.json: the last evaluation."""

    def __init__(self, out_dir: str | Path, args: argparse.Namespace | dict, header_extra: dict,
                 enabled: bool = True):  # fmt: skip
        self.out_dir, self.enabled = Path(out_dir), enabled
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        git = ["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"]
        try:
            commit = subprocess.run(git, capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
        self.log({
            "type": "header",
            "script": Path(sys.argv[0]).stem,
            "time": datetime.datetime.now().isoformat(timespec="seconds"),
            "args": args_to_primitives(args),
            "git_commit": commit or None,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            **header_extra,
        })  # fmt: skip

    def log(self, record: dict) -> None:
        if self.enabled:
            with open(self.out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record, default=float) + "\n")

    def write_results(self, results: dict, iteration: int | None) -> None:
        """An `eval` record in log.jsonl, and results.json (atomically)."""
        self.log({"type": "eval", "iter": iteration, "results": results})
        if self.enabled:
            tmp = self.out_dir / ".results.json.tmp"
            tmp.write_text(json.dumps(results, indent=2, default=float))
            os.replace(tmp, self.out_dir / "results.json")


# =============================================================================================
# 9. Benchmarks: timing, FLOPs, MFU, memory
# =============================================================================================

# Dense peak TFLOP/s of common GPUs (no sparsity), matched in this order against
# torch.cuda.get_device_name(): (bf16/fp16 tensor cores, TF32 tensor cores, fp32)
# [NVIDIA data sheets]. V100 has no TF32: its fp32 peak stands in.
GPU_PEAK_TFLOPS = (
    ("H200", (989.4, 494.7, 66.9)),
    ("H100 PCIe", (756.0, 378.0, 51.2)),
    ("H100", (989.4, 494.7, 66.9)),
    ("A100", (312.0, 156.0, 19.5)),
    ("L40S", (362.1, 183.2, 91.6)),
    ("L4", (121.0, 60.0, 30.3)),
    ("A10", (125.0, 62.5, 31.2)),
    ("V100", (125.0, 15.7, 15.7)),
)


def bench_precision(args: argparse.Namespace, device: torch.device) -> str:
    """The arithmetic a benchmark runs in, which decides the peak it is compared with."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if args.amp else ("tf32" if args.tf32 else "fp32")


def peak_tflops(device: torch.device, precision: str,
                override: float | None = None) -> float | None:  # fmt: skip
    """The dense peak for `precision` (`override` wins); None on CPU or an unknown GPU: no MFU."""
    if override is not None or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device)
    column = {"bf16": 0, "tf32": 1, "fp32": 2}[precision]
    return next((peaks[column] for key, peaks in GPU_PEAK_TFLOPS if key in name), None)


def count_flops(step: Callable[[], Any]) -> int:
    """FLOPs of one call of `step` (forward and backward if it runs both), counted once by
    torch's FlopCounterMode: matmuls, convolutions and attention; elementwise ops and
    grid_sample are not counted, so MSDeformAttn's sampling is left out."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def time_step(step: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> float:
    """Median seconds of `steps` calls of `step` after `warmup`, each synchronised with the GPU."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def benchmark(name: str, step: Callable[[], Any], *, device: torch.device, warmup: int, steps: int,
              images_per_step: int, precision: str = "fp32", peak: float | None = None,
              flops: bool = True, extra: dict | None = None) -> dict:  # fmt: skip
    """Print (and return) one JSON record: time_step, FLOPs counted once, achieved TFLOP/s (GPU)
    or GFLOP/s (CPU), mfu = achieved / peak_tflops (GPU), peak memory (GPU allocated, CPU RSS)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_step(step, device, warmup, steps)
    if cuda:
        memory = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    record = {
        "bench": name,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "precision": precision,
        "step_s": float(f"{seconds:.6g}"),
        "images_per_s": round(images_per_step / seconds, 3),
        "steps": steps,
        ("peak_mem_mb" if cuda else "peak_rss_mb"): round(memory, 1),
    }
    if flops:
        n = count_flops(step)
        record["gflop_per_step"] = float(f"{n / 1e9:.6g}")
        if cuda:
            record["tflops"] = float(f"{n / seconds / 1e12:.4g}")
            top = peak_tflops(device, precision, peak)
            record["mfu"] = round(record["tflops"] / top, 4) if top else None
        else:
            record["gflops"] = float(f"{n / seconds / 1e9:.4g}")
    record.update(extra or {})
    print(json.dumps(record), flush=True)
    return record
