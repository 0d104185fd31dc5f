"""Shared pytest fixtures: tiny copies of the six datasets in their real on-disk layouts, the toy
dataset, and the `gpu` marker.

Every tree uses the real folder and file names, PNG modes and label encodings of its dataset
(GTA5 and Mapillary: palette PNGs whose index is the class id; SYNTHIA: 16-bit 3-channel PNGs
with the class id in R and an instance id >= 1000 in G; Cityscapes and ACDC: mode L labelIds /
labelTrainIds; BDD100K: mode L trainIds), with decoy files next to the labels that a reader must
never pick (colour visualisations, instance maps, invalid-region masks, reference images).
Images are small (64 pixels wide or so) and keep each dataset's aspect ratio; BDD100K and
Mapillary images are JPEG (compare their pixels with a tolerance), all others PNG.

Each tree fixture returns a `Tree`: its root, and per sample name the RGB image written
(uint8 H x W x 3), the raw ids written in the label file, and the trainIds a reader must return,
computed from the hand-written tables below (written from the official repositories' label
tables), never from common.py's own maps.

Session fixtures (read-only: copy a tree before changing it, or use `make_tree`):
  data_root          a --data root (Path): gta5/ synthia/ cityscapes/ bdd100k/ mapillary/ acdc/,
                     each in its main layout; the six trees below are the ones it holds.
  gta5_tree          images/NNNNN.png + labels/NNNNN.png (palette); 00001 is 64x32 and 00002
                     64x30 (the 1052/1046 heights), 00003 has a label of another size (must be
                     skipped), 15188 is one of the frames CLOUDS leaves out; gtav_split_train.txt.
  synthia_tree       flat RGB/ + GT/LABELS/ with synthia_split_val.txt (0000001 is val).
  synthia_split_tree RGB/{train,val}/ + GT/LABELS/{train,val}/.
  cityscapes_tree    leftImg8bit/ + gtFine/ (val: frankfurt with labelIds + a matching
                     labelTrainIds, lindau with labelTrainIds only; train: aachen).
  bdd_tree           images/10k/val + labels/sem_seg/masks/val (+ colormaps decoy).
  bdd_old_tree       seg/images/val + seg/labels/val/<stem>_train_id.png (+ color_labels decoy).
  mapillary_tree     v1.2 zip layout validation/{images,labels}; 4:3, 16:9 and portrait frames.
  mapillary_v2_tree  v2.0 zip layout validation/images + validation/v1.2/labels (+ a v2.0/labels
                     decoy holding other ids).
  acdc_tree          rgb_anon/<cond>/<split>/<seq>/... + gt/...; fog val GOPR0476 (labelTrainIds
                     and labelIds), fog val GOPR0477 (labelIds only), a fog train frame, one night
                     frame,
                     val_ref images that must not be listed, invIds / labelColor decoys.
  toy_data           the --data root holding toy/ written once by common.make_toy_dataset (seed 0,
                     default counts): toy/source (GTA5 layout), toy/{city,fog,night} (Cityscapes
                     layout). Use it as `build_dataset("toy", toy_data, "train")` or
                     `--data <toy_data>` in a subprocess. Never write inside it.
Function fixtures:
  make_tree          make_tree("gta5" | "synthia" | ... ) writes a fresh tree under tmp_path, for
                     tests that delete or damage files.

Helper: `run_sections_1_2(name, code, tmp_path)` runs the top of a method file (docstring,
imports but `import common`, constants, sections 1 and 2) followed by `code` in a fresh
interpreter that cannot import common.py, and returns its stdout.

Helpers for several processes: `torchrun(script, *args, cwd=..., nproc=2)` runs a method script
under `torchrun --standalone --nproc_per_node 2` on the CPU (Gloo) and returns the completed
process; `max_tensor_diff(a, b)` is the largest absolute difference between the model tensors of
two checkpoints (their keys must match).

Marker: `@pytest.mark.gpu` for tests that need CUDA; they are skipped when it is unavailable.
torchvision's per-call deprecation warning of its image decoders is filtered out.
"""

from __future__ import annotations

import dataclasses
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import common  # noqa: E402

# =============================================================================================
# Expected id -> trainId, written out by hand from the official label tables (not common.py).
# Each table also lists ids no table names ("unknown"), which must become 255.
# =============================================================================================

# GTA5 palette index = Cityscapes labelId: {0, 7, 8, 9, 26, 33} -> {255, 0, 1, 255, 13, 18};
# 34 and 250 are not labelIds at all.
GTA5_EXPECT = {0: 255, 7: 0, 8: 1, 9: 255, 26: 13, 33: 18, 34: 255, 250: 255}
# SYNTHIA R channel: {0, 1, 3, 16, 21, 22} -> {255, 10, 0, 9, 3, 255}; 23 is not a SYNTHIA id.
SYNTHIA_EXPECT = {0: 255, 1: 10, 3: 0, 16: 9, 21: 3, 22: 255, 23: 255}
# Cityscapes labelIds {0, 7, 24, 26, 31, 33, 4} -> {255, 0, 11, 13, 16, 18, 255}; 40 unknown.
CITYSCAPES_EXPECT = {0: 255, 7: 0, 24: 11, 26: 13, 31: 16, 33: 18, 4: 255, 40: 255}
# BDD100K masks are trainIds already: identity, 255 stays ignore; 19 and 100 are not classes.
BDD_EXPECT = {0: 0, 5: 5, 18: 18, 255: 255, 19: 255, 100: 255}
# Mapillary v1.2 ids -> 19 classes under the two tables; 66 and 200 are not v1.2 ids.
MAPILLARY_IDS = (13, 24, 41, 7, 8, 9, 10, 11, 14, 23, 44, 46, 49, 50, 58, 65, 66, 200)
MAPILLARY_EXPECT_HRDA = dict(
    zip(
        MAPILLARY_IDS,
        (0, 0, 0, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 7, 16, 255, 255, 255),
    )
)
MAPILLARY_EXPECT_REIN = dict(
    zip(MAPILLARY_IDS, (0, 0, 255, 0, 0, 1, 0, 1, 0, 0, 5, 7, 7, 7, 16, 255, 255, 255))
)
# ACDC: labelTrainIds {0, 13, 255} (+ 19, not a class); labelIds consistent {7, 26, 0}.
ACDC_TRAINID_EXPECT = {0: 0, 13: 13, 255: 255, 19: 255}
ACDC_LABELID_FOR_TRAINID = {0: 7, 13: 26, 255: 0, 19: 0}
ACDC_LABELID_EXPECT = {7: 0, 26: 13, 0: 255}


def apply_table(ids: np.ndarray, table: dict[int, int]) -> np.ndarray:
    """Map every pixel through a hand-written table (every id present must be in the table)."""
    out = np.full(ids.shape, -1, np.int64)
    for src, dst in table.items():
        out[ids == src] = dst
    assert (out >= 0).all(), "fixture wrote an id its table does not cover"
    return out


# =============================================================================================
# Writers
# =============================================================================================


def write_png16_rgb(path: Path, rgb: np.ndarray) -> None:
    """A 16-bit RGB PNG (colour type 2, bit depth 16), as SYNTHIA's GT/LABELS files are. Pillow
    cannot write this and torchvision's encoder is 8-bit only, so build the PNG by hand: signature,
    IHDR, one zlib IDAT of filter-0 rows of big-endian samples, IEND."""
    h, w, _ = rgb.shape

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    rows = rgb.astype(">u2")  # (H, W, 3) big-endian
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def write_palette_png(path: Path, ids: np.ndarray) -> None:
    """Mode P PNG whose palette index is the class id (GTA5, Mapillary); any palette will do."""
    h, w = ids.shape
    im = Image.frombytes("P", (w, h), ids.astype(np.uint8).tobytes())
    rng = np.random.default_rng(7)
    im.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def write_l_png(path: Path, ids: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids.astype(np.uint8)).save(path)


def write_rgb(path: Path, rgb: np.ndarray) -> None:
    """PNG or JPEG by suffix (JPEG at quality 95)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(rgb)
    if path.suffix == ".jpg":
        im.save(path, quality=95)
    else:
        im.save(path)


def make_image(w: int, h: int, salt: int) -> np.ndarray:
    """A smooth RGB ramp (JPEG keeps it within a few levels), different per `salt`."""
    y, x = np.mgrid[0:h, 0:w]
    r = x * 255 // max(w - 1, 1)
    g = y * 255 // max(h - 1, 1)
    b = np.full_like(x, (37 * salt + 60) % 256)
    return np.stack([r, g, b], -1).astype(np.uint8)


def make_ids(w: int, h: int, ids: tuple[int, ...] | list[int], salt: int) -> np.ndarray:
    """H x W ids drawn from `ids`, each id present at least once."""
    rng = np.random.default_rng(1000 + salt)
    out = rng.choice(np.asarray(ids), size=(h, w))
    out.flat[: len(ids)] = ids
    return out.astype(np.int64)


@dataclasses.dataclass
class Tree:
    root: Path
    images: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    raw: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    labels: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)


def write_gta5(root: Path) -> Tree:
    t = Tree(root)
    sizes = {
        "00001": ((64, 32), (64, 32)),
        "00002": ((64, 30), (64, 30)),
        "00003": ((64, 32), (60, 32)),
        "15188": ((64, 32), (64, 32)),
    }
    for salt, (name, ((iw, ih), (lw, lh))) in enumerate(sizes.items()):
        image = make_image(iw, ih, salt)
        ids = make_ids(lw, lh, tuple(GTA5_EXPECT), salt)
        write_rgb(root / "images" / f"{name}.png", image)
        write_palette_png(root / "labels" / f"{name}.png", ids)
        t.images[name], t.raw[name] = image, ids
        t.labels[name] = apply_table(ids, GTA5_EXPECT)
    (root / "gtav_split_train.txt").write_text("00001.png\n00002.png\n")
    return t


def write_synthia(root: Path, split_layout: bool) -> Tree:
    t = Tree(root)
    splits = {"0000000": "train", "0000001": "val", "0000002": "train"}
    for salt, (name, split) in enumerate(splits.items()):
        sub = Path(split) if split_layout else Path()
        image = make_image(64, 38, salt)  # 1280 x 760 scaled down
        ids = make_ids(64, 38, tuple(SYNTHIA_EXPECT), salt)
        instance = 1000 + np.arange(64 * 38).reshape(38, 64) % 50
        label = np.stack([ids, instance, np.zeros_like(ids)], -1).astype(np.uint16)
        write_rgb(root / "RGB" / sub / f"{name}.png", image)
        write_png16_rgb(root / "GT" / "LABELS" / sub / f"{name}.png", label)
        t.images[name], t.raw[name] = image, label
        t.labels[name] = apply_table(ids, SYNTHIA_EXPECT)
        t.extra.setdefault("split", {})[name] = split
    if not split_layout:
        (root / "synthia_split_val.txt").write_text("0000001.png\n")
    return t


def write_cityscapes(root: Path) -> Tree:
    t = Tree(root)
    frames = [
        ("val", "frankfurt", "frankfurt_000000_000294", "both"),
        ("val", "lindau", "lindau_000001_000019", "trainids_only"),
        ("train", "aachen", "aachen_000000_000019", "labelids"),
    ]
    for salt, (split, city, stem, kind) in enumerate(frames):
        image = make_image(64, 32, salt)
        ids = make_ids(64, 32, tuple(CITYSCAPES_EXPECT), salt)
        expect = apply_table(ids, CITYSCAPES_EXPECT)
        write_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image)
        gt = root / "gtFine" / split / city
        if kind in ("both", "labelids"):
            write_l_png(gt / f"{stem}_gtFine_labelIds.png", ids)
        if kind in ("both", "trainids_only"):
            write_l_png(gt / f"{stem}_gtFine_labelTrainIds.png", expect)
        # Decoys: the colour visualisation and the 16-bit instance map.
        colour = np.zeros((32, 64, 3), np.uint8)
        colour[..., 0] = ids
        write_rgb(gt / f"{stem}_gtFine_color.png", colour)
        Image.fromarray((ids * 1000 + 7).astype(np.uint16)).save(
            gt / f"{stem}_gtFine_instanceIds.png"
        )
        t.images[stem], t.raw[stem], t.labels[stem] = image, ids, expect
        t.extra.setdefault("split", {})[stem] = split
    return t


def write_bdd(root: Path, old: bool) -> Tree:
    t = Tree(root)
    stems = ["0a0b16e2-93f8c456", "7d2f7975-e0c1c5a7"]
    for salt, stem in enumerate(stems):
        image = make_image(64, 36, salt)  # 1280 x 720 scaled down
        ids = make_ids(64, 36, tuple(BDD_EXPECT), salt)
        colour = np.stack([ids, ids, ids], -1).astype(np.uint8)
        if old:
            write_rgb(root / "seg" / "images" / "val" / f"{stem}.jpg", image)
            write_l_png(root / "seg" / "labels" / "val" / f"{stem}_train_id.png", ids)
            write_rgb(root / "seg" / "color_labels" / "val" / f"{stem}_train_color.png", colour)
        else:
            write_rgb(root / "images" / "10k" / "val" / f"{stem}.jpg", image)
            write_l_png(root / "labels" / "sem_seg" / "masks" / "val" / f"{stem}.png", ids)
            write_rgb(root / "labels" / "sem_seg" / "colormaps" / "val" / f"{stem}.png", colour)
        t.images[stem], t.raw[stem] = image, ids
        t.labels[stem] = apply_table(ids, BDD_EXPECT)
    return t


MAPILLARY_FRAMES = {
    "0035fkbjWljhaftpVM37-g": (64, 48),  # 4:3 landscape (3264 x 2448)
    "M2FTZ9mCNkA9YB1CZaH8TA": (64, 36),  # 16:9 (1920 x 1080)
    "_1Gn_xkw7sa_i9GU4mkxxQ": (48, 64),
}  # portrait (3096 x 4128)


def write_mapillary(root: Path, v2_layout: bool) -> Tree:
    t = Tree(root)
    labels = root / "validation" / ("v1.2/labels" if v2_layout else "labels")
    for salt, (name, (w, h)) in enumerate(MAPILLARY_FRAMES.items()):
        image = make_image(w, h, salt)
        ids = make_ids(w, h, MAPILLARY_IDS, salt)
        write_rgb(root / "validation" / "images" / f"{name}.jpg", image)
        write_palette_png(labels / f"{name}.png", ids)
        if v2_layout:  # v2.0 labels (124 classes) next to the v1.2 ones: never read
            write_palette_png(
                root / "validation" / "v2.0" / "labels" / f"{name}.png", np.full((h, w), 100)
            )
        t.images[name], t.raw[name] = image, ids
        t.labels[name] = apply_table(ids, MAPILLARY_EXPECT_HRDA)
        t.extra.setdefault("rein", {})[name] = apply_table(ids, MAPILLARY_EXPECT_REIN)
    return t


def write_acdc(root: Path) -> Tree:
    t = Tree(root)
    frames = [
        ("fog", "val", "GOPR0476", "GOPR0476_frame_000854", "both"),
        ("fog", "val", "GOPR0477", "GOPR0477_frame_000128", "labelids_only"),
        ("fog", "train", "GP010475", "GP010475_frame_000080", "both"),
        ("night", "val", "GOPR0355", "GOPR0355_frame_000138", "both"),
    ]
    for salt, (cond, split, seq, stem, kind) in enumerate(frames):
        image = make_image(64, 36, salt)  # 1920 x 1080 scaled down
        train_ids = make_ids(64, 36, tuple(ACDC_TRAINID_EXPECT), salt)
        label_ids = apply_table(train_ids, ACDC_LABELID_FOR_TRAINID)
        write_rgb(root / "rgb_anon" / cond / split / seq / f"{stem}_rgb_anon.png", image)
        gt = root / "gt" / cond / split / seq
        if kind == "both":
            write_l_png(gt / f"{stem}_gt_labelTrainIds.png", train_ids)
        write_l_png(gt / f"{stem}_gt_labelIds.png", label_ids)
        write_l_png(gt / f"{stem}_gt_invIds.png", (train_ids == 255).astype(np.uint8))
        write_rgb(gt / f"{stem}_gt_labelColor.png", np.stack([train_ids] * 3, -1).astype(np.uint8))
        t.images[stem], t.raw[stem] = image, train_ids
        t.labels[stem] = (
            apply_table(train_ids, ACDC_TRAINID_EXPECT)
            if kind == "both"
            else apply_table(label_ids, ACDC_LABELID_EXPECT)
        )
        t.extra.setdefault("where", {})[stem] = (cond, split)
    # Reference (clear-weather) images: the real name, and a worst-case one that also ends in
    # _rgb_anon.png. Neither is a val sample.
    ref = root / "rgb_anon" / "fog" / "val_ref" / "GOPR0476"
    write_rgb(ref / "GOPR0476_frame_000854_rgb_ref_anon.png", make_image(64, 36, 9))
    write_rgb(ref / "GOPR0476_frame_000855_rgb_anon.png", make_image(64, 36, 10))
    return t


WRITERS = {
    "gta5": write_gta5,
    "synthia": lambda root: write_synthia(root, split_layout=False),
    "synthia_split": lambda root: write_synthia(root, split_layout=True),
    "cityscapes": write_cityscapes,
    "bdd": lambda root: write_bdd(root, old=False),
    "bdd_old": lambda root: write_bdd(root, old=True),
    "mapillary": lambda root: write_mapillary(root, v2_layout=False),
    "mapillary_v2": lambda root: write_mapillary(root, v2_layout=True),
    "acdc": write_acdc,
}


# =============================================================================================
# Fixtures
# =============================================================================================


@pytest.fixture(scope="session")
def _main_trees(tmp_path_factory) -> dict[str, Tree]:
    """The six trees in their main layouts under one --data root (folder names of DATA_DIRS)."""
    base = tmp_path_factory.mktemp("data")
    dirs = {
        "gta": ("gta5", "gta5"),
        "synthia": ("synthia", "synthia"),
        "cityscapes": ("cityscapes", "cityscapes"),
        "bdd": ("bdd100k", "bdd"),
        "mapillary": ("mapillary", "mapillary"),
        "acdc": ("acdc", "acdc"),
    }
    return {name: WRITERS[kind](base / folder) for name, (folder, kind) in dirs.items()}


@pytest.fixture(scope="session")
def data_root(_main_trees) -> Path:
    return _main_trees["gta"].root.parent


@pytest.fixture(scope="session")
def gta5_tree(_main_trees) -> Tree:
    return _main_trees["gta"]


@pytest.fixture(scope="session")
def synthia_tree(_main_trees) -> Tree:
    return _main_trees["synthia"]


@pytest.fixture(scope="session")
def cityscapes_tree(_main_trees) -> Tree:
    return _main_trees["cityscapes"]


@pytest.fixture(scope="session")
def bdd_tree(_main_trees) -> Tree:
    return _main_trees["bdd"]


@pytest.fixture(scope="session")
def mapillary_tree(_main_trees) -> Tree:
    return _main_trees["mapillary"]


@pytest.fixture(scope="session")
def acdc_tree(_main_trees) -> Tree:
    return _main_trees["acdc"]


@pytest.fixture(scope="session")
def synthia_split_tree(tmp_path_factory) -> Tree:
    return WRITERS["synthia_split"](tmp_path_factory.mktemp("synthia_split"))


@pytest.fixture(scope="session")
def bdd_old_tree(tmp_path_factory) -> Tree:
    return WRITERS["bdd_old"](tmp_path_factory.mktemp("bdd_old"))


@pytest.fixture(scope="session")
def mapillary_v2_tree(tmp_path_factory) -> Tree:
    return WRITERS["mapillary_v2"](tmp_path_factory.mktemp("mapillary_v2"))


@pytest.fixture
def make_tree(tmp_path):
    """make_tree(kind) -> a fresh Tree under tmp_path/kind; kind is a key of WRITERS."""

    def make(kind: str) -> Tree:
        return WRITERS[kind](tmp_path / kind)

    return make


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """The --data root of the toy dataset (root/toy), written once per session (seed 0)."""
    root = tmp_path_factory.mktemp("toy_data")
    common.make_toy_dataset(root)
    return root


# =============================================================================================
# Running a script as a command, without paying its imports each time
# =============================================================================================


@dataclasses.dataclass
class ScriptRun:
    returncode: int
    stdout: str
    stderr: str


def _run_script_child(script, argv, cwd, env, out_path, err_path):  # runs in a forked process
    import os
    import runpy
    import signal
    import traceback

    # a pytest started in the background ignores SIGINT; the script must see Ctrl-C as usual
    signal.signal(signal.SIGINT, signal.default_int_handler)

    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    os.chdir(cwd)
    os.environ.update(env)
    sys.argv = [str(script), *argv]
    code = 0
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


@pytest.fixture(scope="session")
def _script_server():
    """A forkserver that has imported torch, torchvision, scipy, timm, open_clip and common once;
    every script run is a fresh process forked from it (a real process: exit code, stdout,
    stderr, signals), without the ~4 s of imports a `python script.py` pays."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(
        ["torch", "torchvision", "numpy", "scipy.optimize", "timm", "open_clip", "common"]
    )
    return ctx


@pytest.fixture
def run_script(_script_server, tmp_path):
    """run_script("famix.py", "--source", "toy", ..., cwd=..., env=..., timeout=...) ->
    ScriptRun(returncode, stdout, stderr): the script run as `python script.py ARGS` would run
    it (its `if __name__ == "__main__"` block), in a process of its own. With `start=True` the
    process is returned running (with .out_path / .err_path), e.g. to send it a signal."""
    counter = iter(range(10**6))

    def run(script, *argv, cwd=REPO, env=None, timeout=300, start=False):
        k = next(counter)
        out_path, err_path = tmp_path / f"run{k}.out", tmp_path / f"run{k}.err"
        args = (REPO / script, [str(a) for a in argv], str(cwd), dict(env or {}))
        proc = _script_server.Process(target=_run_script_child, args=(*args, out_path, err_path))
        proc.start()
        if start:
            proc.out_path, proc.err_path = out_path, err_path
            return proc
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise TimeoutError(f"{script} {' '.join(map(str, argv))} ran past {timeout} s")
        return ScriptRun(proc.exitcode, out_path.read_text(), err_path.read_text())

    return run


# =============================================================================================
# The gpu marker
# =============================================================================================


# =============================================================================================
# Several processes (Gloo on the CPU)
# =============================================================================================


def torchrun(script: str, *args, cwd: Path, nproc: int = 2, timeout: float = 240):
    """`torchrun --standalone --nproc_per_node N script args` (a free port per run), each process
    on one CPU thread; returns the CompletedProcess (text stdout and stderr)."""
    import os
    import subprocess

    launcher = Path(sys.executable).with_name("torchrun")
    cmd = [str(launcher), "--standalone", f"--nproc_per_node={nproc}", str(REPO / script)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([*cmd, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def max_tensor_diff(a: str | Path, b: str | Path) -> float:
    """Largest |a - b| over the model tensors of two checkpoints (floating-point tensors)."""
    sa = torch.load(a, map_location="cpu", weights_only=True)["model"]
    sb = torch.load(b, map_location="cpu", weights_only=True)["model"]
    assert sa.keys() == sb.keys()
    return max((sa[k].double() - sb[k].double()).abs().max().item()
               for k in sa if sa[k].is_floating_point())  # fmt: skip


# =============================================================================================
# Sections 1-2 of a method file, pasted into a file of their own
# =============================================================================================

BANNER = "# " + "=" * 93


def sections_1_2(name: str) -> str:
    """The top of a method file up to the banner of section 3, without `import common`: what a
    reader pastes to reuse the method and its model."""
    lines = (REPO / name).read_text().splitlines()
    end = next(i for i in range(len(lines) - 1)
               if lines[i] == BANNER and lines[i + 1].startswith("# 3. "))  # fmt: skip
    return "\n".join(line for line in lines[:end] if line != "import common") + "\n"


def run_sections_1_2(name: str, code: str, tmp_path: Path) -> str:
    """Run sections_1_2(name) + `code` as a script in `tmp_path` under `python -I` (no current
    folder, no PYTHONPATH: common.py cannot be imported); fail with its stderr, else return its
    stdout."""
    import subprocess

    script = tmp_path / f"pasted_{Path(name).stem}.py"
    script.write_text(sections_1_2(name) + "\n" + code)
    r = subprocess.run([sys.executable, "-I", str(script)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped when none is available")
    # torchvision 0.29 warns on every decode_png/decode_image call (its decoders are to move to
    # another package); the readers depend on them for 16-bit PNGs, so keep one summary line
    # out of hundreds.
    config.addinivalue_line(
        "filterwarnings",
        "ignore:The image decoding and encoding capabilities of TorchVision are deprecated"
        ":DeprecationWarning",
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no CUDA device available)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
