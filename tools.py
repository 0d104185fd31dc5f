"""Commands around the three method files (their building blocks are in common.py):

python tools.py make-toy --data ./data                # write the toy domain-shift dataset
python tools.py demo --data ./data                    # tiny end-to-end check of the pipeline
python tools.py check-data --data ./data [--decode]   # what is there, what is missing
python tools.py compare out/famix out/rein ... [--out DIR]   # side-by-side table + compare.png
python tools.py bench --data ./data                   # reader throughput (JSON lines)
python tools.py bench-table out/bench.jsonl           # benchmark JSON lines -> Markdown table
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import common
from common import CLASS_NAMES, UsageError, print0

# =============================================================================================
# check-data: what each dataset folder holds, against the official split sizes
# =============================================================================================

# Official sizes of the splits [GTA5, SYNTHIA, Cityscapes, BDD100K, Mapillary and ACDC download
# pages; FAMix datasets/gta5_list/*.txt; CLOUDS datasets/gta_list/train_dict.json].
OFFICIAL_COUNTS = {
    ("gta", "train", "all"): 24966, ("gta", "train", "clouds"): 24904,
    ("gta", "train", "famix"): 12382, ("gta", "val", "famix"): 1000,
    ("synthia", "all", ""): 9400, ("synthia", "train", ""): 6580, ("synthia", "val", ""): 2820,
    ("cityscapes", "train", ""): 2975, ("cityscapes", "val", ""): 500,
    ("bdd", "train", ""): 7000, ("bdd", "val", ""): 1000, ("mapillary", "val", ""): 2000,
    ("acdc-fog", "val", ""): 100, ("acdc-night", "val", ""): 106, ("acdc-rain", "val", ""): 100,
    ("acdc-snow", "val", ""): 100,
}  # fmt: skip

# Image and label files of the labelled splits, per dataset folder, for the orphan check: a
# file's key is its name without the suffix (names are unique within each dataset).
CHECK_FILES = {
    "gta5": (["images/*.png"], ["labels/*.png"]),
    "synthia": (["RGB/*.png", "RGB/*/*.png"], ["GT/LABELS/*.png", "GT/LABELS/*/*.png"]),
    "cityscapes": ([f"leftImg8bit/{s}/*/*_leftImg8bit.png" for s in ("train", "val")],
                   [f"gtFine/{s}/*/*_gtFine_label*Ids.png" for s in ("train", "val")]),
    "bdd100k": ([f"{d}/{s}/*.jpg" for d in ("images/10k", "seg/images", "images")
                 for s in ("train", "val")],
                [f"{d}/{s}/*.png" for d in ("labels/sem_seg/masks", "seg/labels", "labels")
                 for s in ("train", "val")]),
    "mapillary": ([f"{s}/images/*.jpg" for s in ("training", "validation")],
                  [f"{s}/{v}labels/*.png" for s in ("training", "validation")
                   for v in ("", "v1.2/")]),
    "acdc": ([f"rgb_anon/*/{s}/**/*_rgb_anon.png" for s in ("train", "val")],
             [f"gt/*/{s}/**/*_gt_label*Ids.png" for s in ("train", "val")]),
}  # fmt: skip
FILE_SUFFIXES = ("_leftImg8bit.png", "_rgb_anon.png", "_gtFine_labelIds.png",
                 "_gtFine_labelTrainIds.png", "_gt_labelTrainIds.png", "_gt_labelIds.png",
                 "_labelTrainIds.png", "_train_id.png", ".png", ".jpg")  # fmt: skip


def file_key(path: Path) -> str:
    return path.name[: -len(next(x for x in FILE_SUFFIXES if path.name.endswith(x)))]


def orphans(root: Path, folder: str) -> tuple[list[Path], list[Path]]:
    """(images without a label, labels without an image) of a dataset folder."""
    images, labels = ({file_key(p): p for g in globs for p in sorted(root.glob(g))}
                      for globs in CHECK_FILES[folder])  # fmt: skip
    return [p for k, p in images.items() if k not in labels], [
        p for k, p in labels.items() if k not in images
    ]


def check_plan(root: Path) -> list[tuple[str, str, str, str]]:
    """(dataset folder, name for build_dataset, split, GTA5 list) of every split to count."""
    plan = []
    if (root / "gta5").is_dir():
        plan += [("gta5", "gta", "train", "all"), ("gta5", "gta", "train", "clouds")]
        plan += [("gta5", "gta", split, "famix") for split in ("train", "val")
                 if (root / "gta5" / f"gtav_split_{split}.txt").is_file()]  # fmt: skip
    if (root / "synthia").is_dir():
        plan.append(("synthia", "synthia", "all", ""))
        split_layout = (root / "synthia" / "RGB" / "train").is_dir()
        if split_layout or (root / "synthia" / "synthia_split_val.txt").is_file():
            plan += [("synthia", "synthia", "train", ""), ("synthia", "synthia", "val", "")]
    train_dirs = {"cityscapes": ["leftImg8bit/train"],
                  "bdd100k": ["images/10k/train", "seg/images/train", "images/train"]}  # fmt: skip
    for folder, name in (("cityscapes", "cityscapes"), ("bdd100k", "bdd")):
        if (root / folder).is_dir():  # the training split is optional: counted where present
            if any((root / folder / d).is_dir() for d in train_dirs[folder]):
                plan.append((folder, name, "train", ""))
            plan.append((folder, name, "val", ""))
    if (root / "mapillary").is_dir():
        plan.append(("mapillary", "mapillary", "val", ""))
    if (root / "acdc").is_dir():
        plan += [("acdc", f"acdc-{c}", "val", "") for c in common.ACDC.CONDITIONS]
    if (root / "toy").is_dir():
        plan += [("toy", "toy", "train", ""), ("toy", "toy", "val", "")]
        plan += [("toy", t, "val", "") for t in common.TOY_TARGETS]
    return plan


def expected_count(root: Path, name: str, split: str, gta_list: str) -> int | None:
    if name.startswith("toy"):  # the counts the toy writer recorded in its marker
        with contextlib.suppress(OSError, ValueError, KeyError):
            counts = json.loads((root / "toy" / "toy.json").read_text())["counts"]
            return counts["source"][split == "val"] if name == "toy" else counts[name[4:]][1]
        return None
    return OFFICIAL_COUNTS.get((name, split, gta_list))


def decode_job(job: tuple) -> tuple[int, str | None, bool, bool]:
    """Decode one (image, label) pair in a checker worker: (index, error or None, sizes differ,
    the label holds no pixel of the 19 classes)."""
    index, image_path, label_path, decode = job
    try:
        image, label = common.read_image(image_path), decode(label_path)
    except UsageError as e:
        return index, common.one_line(e), False, False
    empty = bool((label == common.IGNORE_INDEX).all())
    return index, None, tuple(image.shape[-2:]) != tuple(label.shape[-2:]), empty


def check_data(data_root: str | Path, decode: bool = False, workers: int = 4) -> int:
    """Print one table of what each dataset folder under `data_root` holds, against the official
    split sizes: images, paired labels, images without a label and labels without an image. With
    `decode`, decode every pair in `workers` processes and list the files that fail and the pairs
    whose image and label sizes differ (for GTA5 only a note: its readers skip such pairs).
    Returns the exit code: 1 when something is wrong, 0 otherwise."""
    root = Path(data_root)
    if not root.is_dir():
        raise UsageError(f"--data {root} is not a folder; pass the folder holding gta5/, ...")
    plan = check_plan(root)
    if not plan:
        raise UsageError(
            f"no dataset folder under {root} (expected gta5/ synthia/ cityscapes/ bdd100k/ "
            "mapillary/ acdc/ or toy/; see the README's data tree)"
        )
    rows, problems, jobs, seen = [], [], [], set()
    for folder in dict.fromkeys(f for f, *_ in plan if f != "toy"):
        no_label, no_image = orphans(root / folder, folder)
        problems += [f"{folder}: image without a label: {p}" for p in no_label[:20]]
        problems += [f"{folder}: label without an image: {p}" for p in no_image[:20]]
        if len(no_label) + len(no_image) > 40:
            problems.append(f"{folder}: {len(no_label)} images without a label and "
                            f"{len(no_image)} labels without an image in all")  # fmt: skip
        rows.append([folder, "(all files)", "", "", "", "", str(len(no_label)), str(len(no_image))])
    for folder, name, split, gta_list in plan:
        what = f"{split} ({gta_list} list)" if gta_list else split
        expected = expected_count(root, name, split, gta_list)
        try:
            ds = common.build_dataset(name, root, split, gta_list=gta_list or "all", sizes="off")
        except common.DatasetLayoutError as e:
            absent = (
                "missing" in str(e) and split == "train" and folder in ("cityscapes", "bdd100k")
            )
            rows.append(
                [name, what, "absent" if absent else "error", "", "", str(expected), "", ""]
            )
            if not absent:
                problems.append(common.one_line(e))
            continue
        layout = "empty"
        if ds.pairs:  # which accepted layout was found: one label path, its name part as *
            label = ds.pairs[0][1].relative_to(root / folder)
            layout = str(label.parent / label.name.replace(file_key(ds.pairs[0][0]), "*", 1))
        rows.append([name, what, layout, str(len(ds)), str(len(ds)), str(expected), "", ""])
        if expected is not None and len(ds) != expected:
            problems.append(f"{name} {what}: {len(ds)} images, the official split has {expected}")
        for image_path, label_path in ds.pairs:
            if image_path not in seen:
                seen.add(image_path)
                jobs.append((image_path, label_path, ds.decode, folder, ds.kind))
    head = ["dataset", "split", "layout", "images", "labels", "official", "no label", "no image"]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print0("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    if decode and jobs:
        failures, mismatched, empty = [], [], []
        work = [(i, *job[:3]) for i, job in enumerate(jobs)]
        with multiprocessing.get_context("fork").Pool(max(workers, 1)) as pool:
            done = pool.imap_unordered(decode_job, work, chunksize=8)
            for index, error, differ, unlabelled in tqdm(done, total=len(jobs), desc="decode",
                                                         **common.BAR):  # fmt: skip
                if error:
                    failures.append(error)
                elif differ:
                    mismatched.append(jobs[index])
                if unlabelled:
                    empty.append(jobs[index])
        for kind in dict.fromkeys(job[4] for job in empty):  # a wrong encoding decodes to 255
            files = [job[1] for job in empty if job[4] == kind]
            problems.append(f"{kind}: {len(files)} label files hold no pixel of the 19 classes "
                            f"(e.g. {files[0]}); the reader expects "
                            f"{common.LABEL_ENCODINGS[kind]}")  # fmt: skip
        problems += failures
        for image_path, label_path, _, folder, _ in mismatched:
            note = "note (skipped in training)" if folder in ("gta5", "toy") else "error"
            line = f"{note}: image and label sizes differ: {image_path} / {label_path}"
            (print0 if folder in ("gta5", "toy") else problems.append)(line)
        print0(f"decoded {len(jobs)} image/label pairs: {len(failures)} unreadable, "
               f"{len(mismatched)} of different sizes, {len(empty)} labels with no "
               "class pixel")  # fmt: skip
    for line in problems:
        print0(f"problem: {line}")
    print0("all datasets look complete" if not problems else f"{len(problems)} problems found")
    return 1 if problems else 0


# =============================================================================================
# compare: runs side by side
# =============================================================================================

# Arguments that tell runs of one method apart, shown in the row label when they differ.
VARIANT_ARGS = ("phase", "style", "recipe", "freeze", "prompt", "mix_with", "num_styles", "sam",
                "full_rank", "inference", "scale", "ensemble")  # fmt: skip


def read_run(run: str | Path) -> dict:
    """A finished run folder: its results.json and the arguments of its log.jsonl header."""
    run = Path(run)
    try:
        results = json.loads((run / "results.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise UsageError(
            f"{run} holds no readable results.json: pass the --out folder of a run that has "
            "evaluated"
        ) from None
    header = {}
    with contextlib.suppress(OSError):
        for line in (run / "log.jsonl").read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if record.get("type") == "header":
                    header = record  # the last header: the run that wrote results.json
    method = header.get("script") or run.name
    return {"dir": run, "method": method, "args": header.get("args", {}), "results": results}


def run_labels(runs: list[dict]) -> list[str]:
    """'method backbone source', plus the variant arguments that differ between runs of the
    same method (e.g. FAMix style none vs famix, CLOUDS warm-up vs joint)."""
    labels = []
    for run in runs:
        a = run["args"]
        base = " ".join(str(x) for x in (run["method"], a.get("backbone"), a.get("source")) if x)
        peers = [r["args"] for r in runs if r["method"] == run["method"]]
        differ = [k for k in VARIANT_ARGS if len({str(p.get(k)) for p in peers}) > 1]
        labels.append(base + "".join(f" {k}={a.get(k)}" for k in differ))
    # runs still alike (e.g. other learning rates) are told apart by their folder
    return [f"{label} ({run['dir'].name})" if labels.count(label) > 1 else label
            for label, run in zip(labels, runs)]  # fmt: skip


def mean_or_none(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def compare_runs(runs: Sequence[str | Path], out: str | Path | None = None) -> str:
    """Runs side by side: a Markdown table of each target's mIoU and their mean (rows: method,
    backbone, source), a table of per-class IoU (mean over each run's targets), and compare.png
    with both as grouped bar charts. The source validation split ("source-val") is left out:
    it is for monitoring, not a target. Prints and returns the tables."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    loaded = [read_run(r) for r in runs]
    labels = run_labels(loaded)
    targets = list(dict.fromkeys(t for r in loaded for t in r["results"] if t != "source-val"))
    miou = [[r["results"].get(t, {}).get("miou") for t in targets] for r in loaded]
    means = [common.target_mean(r["results"])[0] for r in loaded]  # the runs' own tables' mean
    # mean IoU of each class over a run's targets (None where no target scores it)
    per_class = [[mean_or_none([r["results"][t]["per_class_iou"].get(c) for t in targets
                                if t in r["results"]]) for c in CLASS_NAMES]
                 for r in loaded]  # fmt: skip
    shown = [i for i in range(len(CLASS_NAMES)) if any(run[i] is not None for run in per_class)]

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = ["| run | " + " | ".join(targets) + " | mean |", "|---" * (len(targets) + 2) + "|"]
    lines += [f"| {label} | " + " | ".join(map(cell, row)) + f" | {cell(mean)} |"
              for label, row, mean in zip(labels, miou, means)]  # fmt: skip
    lines += ["", "mean: over each run's targets, source-val left out (as in the run's table)"]
    lines += ["", "| class (IoU, mean over targets) | " + " | ".join(labels) + " |",
              "|---" * (len(labels) + 1) + "|"]  # fmt: skip
    lines += [f"| {CLASS_NAMES[i]} | " + " | ".join(cell(run[i]) for run in per_class) + " |"
              for i in shown]  # fmt: skip
    table = "\n".join(lines)
    print(table)

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 0.5 * len(shown) + 6), 8))
    width = 0.8 / len(loaded)
    for k, (label, row, mean) in enumerate(zip(labels, miou, means)):
        top.bar(np.arange(len(targets) + 1) + k * width, [v or 0.0 for v in [*row, mean]], width,
                label=label)  # fmt: skip
        bottom.bar(
            np.arange(len(shown)) + k * width, [per_class[k][i] or 0.0 for i in shown], width
        )
    centre = width * (len(loaded) - 1) / 2
    top.set_xticks(np.arange(len(targets) + 1) + centre, [*targets, "mean"])
    top.set(ylabel="mIoU (%)", title="per-target mIoU")
    top.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    names = [CLASS_NAMES[i] for i in shown]
    bottom.set_xticks(np.arange(len(shown)) + centre, names, rotation=45, ha="right")
    bottom.set(ylabel="IoU (%), mean over targets", title="per-class IoU")
    fig.tight_layout()
    path = Path(out or ".") / "compare.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
    return table


# =============================================================================================
# bench-table: the JSON lines of `make bench` as one Markdown table
# =============================================================================================


def bench_table(records: Sequence[dict]) -> str:
    """The benchmark records (common.benchmark) as one Markdown table (the end of `make bench`)."""
    head = ("bench", "device", "precision", "step s", "images/s", "GFLOP/step", "TFLOP/s", "MFU",
            "peak MiB")  # fmt: skip
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in records:
        achieved = r.get("tflops", r["gflops"] / 1e3 if "gflops" in r else None)
        memory = r.get("peak_mem_mb", r.get("peak_rss_mb"))
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        cells = [r["bench"], r["device"], r.get("precision", "-"), f"{r['step_s']:.4f}",
                 f"{r['images_per_s']:.2f}", str(r.get("gflop_per_step", "-")),
                 "-" if achieved is None else f"{achieved:.3f}", mfu, str(memory)]  # fmt: skip
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def read_bench_records(paths: Sequence[str | Path]) -> list[dict]:
    """The benchmark records among the lines of these files (other lines are skipped)."""
    records = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if isinstance(record, dict) and "bench" in record:
                    records.append(record)
    return records


# =============================================================================================
# demo: readers -> augmentation -> a tiny conv net -> mIoU on the toy targets
# =============================================================================================


class TinyNet(nn.Module):
    """A small fully convolutional net for the pipeline check (not any paper's model)."""

    def __init__(self, width: int = 32):
        super().__init__()
        layers, c_in = [], 3
        for stride, dilation in ((2, 1), (1, 2), (1, 4)):
            layers += [nn.Conv2d(c_in, width, 3, stride, dilation, dilation=dilation),
                       nn.BatchNorm2d(width), nn.ReLU()]  # fmt: skip
            c_in = width
        self.body = nn.Sequential(*layers, nn.Conv2d(width, common.NUM_CLASSES, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.body(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


def toy_augment(image: torch.Tensor, label: torch.Tensor, g: torch.Generator):
    image, label = common.random_scale(image, label, (0.75, 1.25), g)
    image, label = common.random_crop(image, label, (96, 192), g)
    image, label = common.random_hflip(image, label, g)
    return common.color_jitter(image, g, 0.3, 0.3, 0.3), label


def demo(args: argparse.Namespace) -> None:
    common.make_toy_dataset(args.data)
    common.seed_everything(args.seed)
    dist = common.setup_distributed("cpu")
    train = common.build_dataset("toy", args.data, "train", transform=toy_augment)
    loader = common.TrainLoader(train, 8, dist, args.seed, workers=0)
    model = TinyNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    total, trainable = common.count_parameters(model)
    print0(
        f"tiny net: {total:,} parameters ({trainable:,} trainable); toy source {len(train)} images"
    )

    def predict(images: torch.Tensor) -> torch.Tensor:
        return model(common.normalize(images, common.IMAGENET_MEAN, common.IMAGENET_STD))

    with tqdm(total=args.iters, desc="train", **common.BAR) as bar:
        for _ in range(args.iters):
            images, labels, _ = next(loader)
            loss = F.cross_entropy(predict(images), labels, ignore_index=common.IGNORE_INDEX)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.update(1)
    model.eval()
    results = {}
    for name in ("toy", *common.TOY_TARGETS):
        ds = common.build_dataset(name, args.data, "val")
        results[name] = common.evaluate_dataset(
            predict, ds, resize=common.EvalResize(), dist=dist, workers=0, desc=name
        )
    print(common.format_results(results))


# =============================================================================================
# bench: reader and augmentation throughput, on the toy data and on full-size frames
# =============================================================================================


def write_full_size_frames(root: Path, n: int = 8) -> None:
    """Toy scenes upscaled to GTA5 (1914x1052) and Cityscapes (2048x1024) frame sizes, written in
    those layouts, so reader throughput is measured at the real decode sizes."""
    if (root / "done").is_file():
        return
    gta, cs = root / "gta5", root / "cityscapes"
    for folder in (gta / "images", gta / "labels", cs / "leftImg8bit/val/x", cs / "gtFine/val/x"):
        folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        label = common.toy_scene(rng, *common.TOY_SIZE_WH)
        image = common.toy_render(label, "city", rng)
        for kind, (w, h) in (("gta5", (1914, 1052)), ("cityscapes", (2048, 1024))):
            big = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR)).astype(np.int16)
            big = Image.fromarray(
                np.clip(big + rng.integers(-12, 13, big.shape), 0, 255).astype(np.uint8)
            )
            small = Image.fromarray(label.astype(np.uint8))
            ids = common.TRAINID_TO_ID[np.asarray(small.resize((w, h), Image.NEAREST))]
            if kind == "gta5":
                big.save(gta / f"images/{i + 1:05d}.png")
                common.save_palette_png(gta / f"labels/{i + 1:05d}.png", ids)
            else:
                big.save(cs / f"leftImg8bit/val/x/x_{i:06d}_000019_leftImg8bit.png")
                Image.fromarray(ids).save(cs / f"gtFine/val/x/x_{i:06d}_000019_gtFine_labelIds.png")
    (root / "done").write_text("")


def crop768_jitter_flip(image: torch.Tensor, label: torch.Tensor, g: torch.Generator):
    """A typical training transform at paper size (random crop 768, colour jitter 0.8, flip)."""
    image, label = common.random_crop(image, label, 768, g)
    image, label = common.random_hflip(image, label, g)
    return common.color_jitter(image, g, 0.8, 0.8, 0.8), label


def as_list(batch: list) -> list:
    return batch


def bench(args: argparse.Namespace) -> None:
    """Loader batches of 8 with `--workers` workers, on the toy data and on full-size synthetic
    frames in the GTA5 layout; single reads of Cityscapes-size frames."""
    common.make_toy_dataset(args.data)
    dist = common.setup_distributed("cpu")
    full = Path(args.data) / "bench-full-size"
    write_full_size_frames(full)
    cases = [
        ("toy-source/read", common.build_dataset("toy", args.data, "train"), None),
        ("toy-source/augment",
         common.build_dataset("toy", args.data, "train", transform=toy_augment), None),
        ("gta5-1914x1052/read", common.GTA5(full / "gta5"), as_list),
        ("gta5-1914x1052/crop768+jitter+flip",
         common.GTA5(full / "gta5", transform=crop768_jitter_flip), None),
    ]  # fmt: skip
    timing = {"device": dist.device, "warmup": 2, "steps": args.steps, "flops": False}
    for name, ds, collate in cases:
        loader = common.TrainLoader(ds, 8, dist, 0, workers=args.workers, collate=collate)
        common.benchmark(f"loader/{name}", loader.__next__, images_per_step=8,
                         extra={"workers": args.workers}, **timing)  # fmt: skip
    cs = common.Cityscapes(full / "cityscapes", "val")
    it = iter(range(10**9))
    common.benchmark("reader/cityscapes-2048x1024", lambda: cs[next(it) % len(cs)],
                     images_per_step=1, extra={"workers": 0}, **timing)  # fmt: skip


# =============================================================================================
# Command line
# =============================================================================================


def build_parser() -> common.Parser:
    parser = common.make_parser(__doc__)
    commands = parser.add_subparsers(dest="command", required=True)  # each one a common.Parser
    toy = commands.add_parser("make-toy", help="write the toy dataset under --data")
    demo = commands.add_parser("demo", help="train a tiny net on the toy data, print mIoU")
    bench = commands.add_parser("bench", help="reader and augmentation throughput")
    table = commands.add_parser("bench-table", help="JSON benchmark lines -> one Markdown table")
    check = commands.add_parser("check-data", help="what each dataset folder holds")
    compare = commands.add_parser("compare", help="runs side by side: table + compare.png")
    for sub in (toy, demo, bench, check):
        sub.add_argument("--data", default="./data", help="dataset root (default %(default)s)")
    for sub in (toy, demo):
        sub.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    demo.add_argument("--iters", type=common.positive_int, default=150, help="training steps")
    bench.add_argument("--steps", type=common.positive_int, default=20, help="timed steps")
    bench.add_argument("--workers", type=common.nonnegative_int, default=2, help="loader workers")
    table.add_argument("files", nargs="+", help="files holding benchmark JSON lines")
    check.add_argument("--decode", action="store_true", help="decode every file (slow)")
    check.add_argument(
        "--workers", type=common.nonnegative_int, default=4, help="decoding processes"
    )
    compare.add_argument("runs", nargs="+", help="run folders (each with results.json, log.jsonl)")
    compare.add_argument("--out", default=None, help="where compare.png goes (default: cwd)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "make-toy":
        try:
            print(f"toy dataset at {common.make_toy_dataset(args.data, args.seed)}")
        except OSError as e:
            raise UsageError(
                f"cannot write the toy dataset under {args.data}: {e.strerror}; "
                "pass a writable folder to --data"
            ) from None
    elif args.command == "demo":
        demo(args)
    elif args.command == "bench":
        bench(args)
    elif args.command == "bench-table":
        print(bench_table(read_bench_records(args.files)))
    elif args.command == "check-data":
        sys.exit(check_data(args.data, decode=args.decode, workers=args.workers))
    else:
        compare_runs(args.runs, args.out)


if __name__ == "__main__":
    common.run_cli(main)
