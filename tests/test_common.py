"""Tests of common.py: dataset readers and label maps, toy data, augmentation, the resumable
loader, mIoU, inference, evaluation resizing, checkpoints, RNG state, weight files, the command
line (one-line errors, the preset pre-parse, Ctrl-C), the run log, benchmarks, no module-level
state; and of the three method files' shared layout: banners, the PLUMBING blocks of `train`
(one text, run here with stand-ins for the METHOD lines), sections 1-2 free of common.py.
The commands (tools.py) are tested in test_tools.py.

Expected values come from the official repositories' tables and configs (label tables, resize
arithmetic, window counts), from OpenCV's own output, or are computed by hand in the test; the
synthetic dataset trees are in conftest.py.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import common

REPO = Path(__file__).resolve().parents[1]

ALLOWED_LABELS = set(range(19)) | {255}


def label_of(ds, name):
    """(image, label) of the sample called `name` in a common dataset."""
    names = [p[0].name for p in ds.pairs]
    for i, (image_path, _) in enumerate(ds.pairs):
        if image_path.stem == name or image_path.name.startswith(name):
            image, label, _ = ds[i]
            return image, label
    raise AssertionError(f"{name} not in {names}")


def sample_names(ds) -> list[str]:
    return [ds[i][2] for i in range(len(ds))]


def assert_sample(ds, tree, name, jpeg=False):
    image, label = label_of(ds, name)
    assert image.dtype == torch.uint8 and label.dtype == torch.int64
    expect_img = torch.from_numpy(tree.images[name]).permute(2, 0, 1)
    assert image.shape == expect_img.shape
    if jpeg:
        assert (image.int() - expect_img.int()).abs().float().mean() < 2.0
    else:
        assert torch.equal(image, expect_img)
    np.testing.assert_array_equal(label.numpy(), tree.labels[name])


# =============================================================================================
# Readers and label maps
# =============================================================================================


def test_gta5_labels_and_size_mismatch_skip(gta5_tree, capsys):
    ds = common.GTA5(gta5_tree.root, "train", "all")
    # 00003 has a 60x32 label for a 64x32 image: skipped and reported.
    assert [p[0].stem for p in ds.pairs] == ["00001", "00002", "15188"]
    assert ds.skipped == ["00003"]
    assert "skipped 1" in capsys.readouterr().out
    for name in ("00001", "00002", "15188"):
        assert_sample(ds, gta5_tree, name)
    # The two heights are kept as they are (no resizing in the reader).
    assert label_of(ds, "00002")[1].shape == (30, 64)
    # Without the size check the odd pair is listed.
    assert len(common.GTA5(gta5_tree.root, "train", "all", sizes="off")) == 4


def test_map_ids_unknown_and_out_of_range_ids():
    ids = np.array([[7, 33, 300], [-1, 0, 255]])  # 300 and -1 fall outside the 256-entry table
    out = common.map_ids(ids, common.CITYSCAPES_ID_TO_TRAINID)
    assert out.dtype == torch.int64
    assert out.tolist() == [[0, 18, 255], [255, 255, 255]]
    lut = common.CITYSCAPES_ID_TO_TRAINID
    assert [
        int(lut[i])
        for i in (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
    ] == list(range(19))
    assert (
        np.delete(lut, [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33])
        == 255
    ).all()


def test_gta5_palette_index_is_read_not_colour(gta5_tree):
    path = gta5_tree.root / "labels" / "00001.png"
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(common.read_id_png(path), gta5_tree.raw["00001"])


def test_gta5_image_lists(gta5_tree):
    def stems(image_list):
        return [p[0].stem for p in common.GTA5(gta5_tree.root, "train", image_list).pairs]

    assert stems("all") == ["00001", "00002", "15188"]
    assert 15188 in common.GTA5_CLOUDS_EXCLUDED
    assert stems("clouds") == ["00001", "00002"]
    assert stems("famix") == ["00001", "00002"]
    assert len(common.GTA5_CLOUDS_EXCLUDED) == 62
    assert {15188, 17705, 20801, 20860} <= common.GTA5_CLOUDS_EXCLUDED
    assert 20800 not in common.GTA5_CLOUDS_EXCLUDED and 20861 not in common.GTA5_CLOUDS_EXCLUDED
    with pytest.raises(common.DatasetLayoutError, match="gtav_split_val.txt"):
        common.GTA5(gta5_tree.root, "val", "famix")
    with pytest.raises(common.UsageError, match="all, clouds or famix"):
        common.GTA5(gta5_tree.root, "train", "robustnet")


def test_gta5_converted_label_fallback(make_tree):
    tree = make_tree("gta5")
    labels = tree.root / "labels"
    (labels / "00001.png").unlink()
    Image.fromarray(tree.labels["00001"].astype(np.uint8)).save(labels / "00001_labelTrainIds.png")
    ds = common.GTA5(tree.root, "train", "famix")
    assert ds.pairs[0][1].name == "00001_labelTrainIds.png"
    assert_sample(ds, tree, "00001")


def test_synthia_flat_layout_and_val_list(synthia_tree):
    root = synthia_tree.root
    assert sample_names(common.Synthia(root, "train")) == ["0000000", "0000002"]
    assert sample_names(common.Synthia(root, "val")) == ["0000001"]
    ds = common.Synthia(root, "all")
    assert sample_names(ds) == ["0000000", "0000001", "0000002"]
    for name in synthia_tree.labels:
        assert_sample(ds, synthia_tree, name)


def test_synthia_split_layout(synthia_split_tree):
    root = synthia_split_tree.root
    train, val = common.Synthia(root, "train"), common.Synthia(root, "val")
    assert sample_names(train) == ["0000000", "0000002"]
    assert sample_names(val) == ["0000001"]
    assert train.pairs[0][1] == root / "GT" / "LABELS" / "train" / "0000000.png"
    assert len(common.Synthia(root, "all")) == 3
    for name in ("0000000", "0000002"):
        assert_sample(train, synthia_split_tree, name)
    assert_sample(val, synthia_split_tree, "0000001")


def test_synthia_flat_without_val_list_has_no_val(make_tree):
    tree = make_tree("synthia")
    (tree.root / "synthia_split_val.txt").unlink()
    assert len(common.Synthia(tree.root, "train")) == 3
    with pytest.raises(common.DatasetLayoutError, match="synthia_split_val.txt"):
        common.Synthia(tree.root, "val")


def test_synthia_16bit_label_read_exactly(synthia_tree):
    path = synthia_tree.root / "GT" / "LABELS" / "0000000.png"
    ids = common.read_synthia_label(path)
    raw = synthia_tree.raw["0000000"]  # (H, W, 3) uint16: R class, G 1000 + instance, B 0
    np.testing.assert_array_equal(ids, raw[..., 0])
    assert ids.dtype == np.int64 and ids.max() == 23
    assert raw[..., 1].min() >= 1000  # a wrong-channel read would give values >= 1000


def test_synthia_pillow_trap(synthia_tree):
    """Documents why the reader does not use Pillow: Pillow opens the 16-bit RGB label as 8-bit
    RGB keeping the high byte, so every class id (< 256) reads as 0."""
    path = synthia_tree.root / "GT" / "LABELS" / "0000000.png"
    assert synthia_tree.raw["0000000"][..., 0].max() > 0
    assert np.array(Image.open(path))[..., 0].max() == 0


def test_synthia_8bit_label_rejected(make_tree):
    tree = make_tree("synthia")
    path = tree.root / "GT" / "LABELS" / "0000000.png"
    Image.fromarray(tree.raw["0000000"].astype(np.uint8)).save(path)  # re-saved as 8-bit
    with pytest.raises(common.DatasetLayoutError) as e:
        common.read_synthia_label(path)
    assert str(path) in str(e.value) and "8-bit" in str(e.value)


def test_cityscapes_labels_splits_and_fallback(cityscapes_tree):
    root = cityscapes_tree.root
    val = common.Cityscapes(root, "val")
    assert sample_names(val) == [
        "frankfurt_000000_000294_leftImg8bit",
        "lindau_000001_000019_leftImg8bit",
    ]
    # labelIds when present, labelTrainIds otherwise; never the colour or instance files.
    assert [p[1].name for p in val.pairs] == [
        "frankfurt_000000_000294_gtFine_labelIds.png",
        "lindau_000001_000019_gtFine_labelTrainIds.png",
    ]
    for stem in ("frankfurt_000000_000294", "lindau_000001_000019"):
        assert_sample(val, cityscapes_tree, stem)
    train = common.Cityscapes(root, "train")
    assert len(train) == 1
    assert_sample(train, cityscapes_tree, "aachen_000000_000019")


def test_cityscapes_labeltrainids_equal_lut_of_labelids(cityscapes_tree):
    gt = cityscapes_tree.root / "gtFine" / "val" / "frankfurt"
    from_ids = common.read_cityscapes_label(gt / "frankfurt_000000_000294_gtFine_labelIds.png")
    from_train = common.read_cityscapes_label(
        gt / "frankfurt_000000_000294_gtFine_labelTrainIds.png"
    )
    assert torch.equal(from_ids, from_train)
    assert set(np.unique(cityscapes_tree.raw["frankfurt_000000_000294"])) == {
        0,
        4,
        7,
        24,
        26,
        31,
        33,
        40,
    }


def test_colour_visualisations_are_refused(cityscapes_tree, bdd_tree):
    for path in (
        cityscapes_tree.root / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_color.png",
        bdd_tree.root / "labels/sem_seg/colormaps/val/0a0b16e2-93f8c456.png",
    ):
        with pytest.raises(common.DatasetLayoutError) as e:
            common.read_id_png(path)
        assert str(path) in str(e.value) and "mode RGB" in str(e.value)


def test_bdd_10k_layout(bdd_tree):
    ds = common.BDD100K(bdd_tree.root, "val")
    assert sample_names(ds) == ["0a0b16e2-93f8c456", "7d2f7975-e0c1c5a7"]
    assert all(p[1].parent.name == "val" and "masks" in p[1].parts for p in ds.pairs)
    for stem in bdd_tree.labels:
        assert_sample(ds, bdd_tree, stem, jpeg=True)


def test_bdd_old_seg_layout(bdd_old_tree):
    ds = common.BDD100K(bdd_old_tree.root, "val")
    assert [p[1].name for p in ds.pairs] == [
        "0a0b16e2-93f8c456_train_id.png",
        "7d2f7975-e0c1c5a7_train_id.png",
    ]
    for stem in bdd_old_tree.labels:
        assert_sample(ds, bdd_old_tree, stem, jpeg=True)


@pytest.mark.parametrize("layout", ["v1.2", "v2.0"])
def test_mapillary_hrda_and_rein_maps(layout, mapillary_tree, mapillary_v2_tree):
    tree = mapillary_tree if layout == "v1.2" else mapillary_v2_tree
    hrda = common.Mapillary(tree.root, "val", "hrda")
    rein = common.Mapillary(tree.root, "val", "rein")
    assert len(hrda) == 3
    assert all("v2.0" not in p[1].parts for p in hrda.pairs)
    for name in tree.labels:
        assert_sample(hrda, tree, name, jpeg=True)
        np.testing.assert_array_equal(label_of(rein, name)[1].numpy(), tree.extra["rein"][name])
    # The portrait frame keeps its orientation: (3, H=64, W=48).
    assert label_of(hrda, "_1Gn_xkw7sa_i9GU4mkxxQ")[0].shape == (3, 64, 48)
    # The two tables differ exactly on 11 ids.
    h, r = common.MAPILLARY_V12_TO_19["hrda"], common.MAPILLARY_V12_TO_19["rein"]
    assert sorted(np.nonzero(h[:66] != r[:66])[0].tolist()) == [
        7,
        8,
        9,
        10,
        11,
        14,
        23,
        41,
        44,
        46,
        49,
    ]
    with pytest.raises(common.UsageError, match="hrda or rein"):
        common.Mapillary(tree.root, "val", "mmseg")


def test_acdc_recursion_ref_exclusion_and_fallback(acdc_tree):
    fog = common.ACDC(acdc_tree.root, "fog", "val")
    listed = [p[0] for p in fog.pairs]
    assert [p.name for p in listed] == [
        "GOPR0476_frame_000854_rgb_anon.png",
        "GOPR0477_frame_000128_rgb_anon.png",
    ]
    assert all("val_ref" not in p.parts for p in listed)
    assert [p[1].name for p in fog.pairs] == [
        "GOPR0476_frame_000854_gt_labelTrainIds.png",
        "GOPR0477_frame_000128_gt_labelIds.png",
    ]
    for stem in ("GOPR0476_frame_000854", "GOPR0477_frame_000128"):
        assert_sample(fog, acdc_tree, stem)
    night = common.ACDC(acdc_tree.root, "night", "val")
    assert len(night) == 1
    assert_sample(night, acdc_tree, "GOPR0355_frame_000138")
    assert len(common.ACDC(acdc_tree.root, "fog", "train")) == 1
    with pytest.raises(common.UsageError, match="unknown ACDC condition"):
        common.ACDC(acdc_tree.root, "haze", "val")


def test_acdc_labelids_agree_with_labeltrainids(acdc_tree):
    gt = acdc_tree.root / "gt/fog/val/GOPR0476"
    a = common.read_cityscapes_label(gt / "GOPR0476_frame_000854_gt_labelTrainIds.png")
    b = common.read_cityscapes_label(gt / "GOPR0476_frame_000854_gt_labelIds.png")
    valid = a != 255
    assert valid.any() and torch.equal(a[valid], b[valid])
    # trainId 19 (not a class) was written as labelId 0: both sides give 255 there.
    assert torch.equal(a == 255, b == 255)


def test_acdc_flattened_layout(make_tree):
    """CLOUDS' flattened copy: rgb_anon/fog/val/<name>_rgb_anon.png without the <seq> folder."""
    tree = make_tree("acdc")
    for top in ("rgb_anon", "gt"):
        seq = tree.root / top / "fog" / "val" / "GOPR0476"
        for f in seq.iterdir():
            f.rename(seq.parent / f.name)
        seq.rmdir()
    ds = common.ACDC(tree.root, "fog", "val")
    assert len(ds) == 2
    assert_sample(ds, tree, "GOPR0476_frame_000854")


# ---- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,expect",
    [
        ("gta", "images/"),
        ("synthia", "GT/LABELS/"),
        ("cityscapes", "leftImg8bit/val/"),
        ("bdd", "image/label folders"),
        ("mapillary", "validation/images/"),
        ("acdc-fog", "rgb_anon/fog/val/"),
    ],
)
def test_layout_error_is_readable(tmp_path, name, expect):
    split = "train" if name in ("gta", "synthia") else "val"
    with pytest.raises(common.DatasetLayoutError) as e:
        common.build_dataset(name, tmp_path, split)
    message = str(e.value)
    assert isinstance(e.value, common.UsageError)
    assert expect in message
    assert str(tmp_path / common.DATA_DIRS[name.split("-")[0]]) in message
    assert "Expected layout" in message and "\n" not in message


@pytest.mark.parametrize(
    "kind,label",
    [
        ("gta5", "labels/00002.png"),
        ("synthia", "GT/LABELS/0000002.png"),
        ("cityscapes", "gtFine/val/lindau/lindau_000001_000019_gtFine_labelTrainIds.png"),
        ("bdd", "labels/sem_seg/masks/val/7d2f7975-e0c1c5a7.png"),
        ("mapillary", "validation/labels/M2FTZ9mCNkA9YB1CZaH8TA.png"),
        ("acdc", "gt/fog/val/GOPR0477/GOPR0477_frame_000128_gt_labelIds.png"),
    ],
)
def test_missing_label_error_names_the_paths(make_tree, kind, label):
    tree = make_tree(kind)
    (tree.root / label).unlink()
    build = {
        "gta5": lambda r: common.GTA5(r, "train", "all"),
        "synthia": lambda r: common.Synthia(r, "all"),
        "cityscapes": lambda r: common.Cityscapes(r, "val"),
        "bdd": lambda r: common.BDD100K(r, "val"),
        "mapillary": lambda r: common.Mapillary(r, "val"),
        "acdc": lambda r: common.ACDC(r, "fog", "val"),
    }[kind]
    with pytest.raises(common.DatasetLayoutError) as e:
        build(tree.root)
    message = str(e.value)
    assert isinstance(e.value, common.UsageError)
    assert "has no label" in message and "\n" not in message
    assert str(tree.root / label) in message  # the expected label file is named in full
    assert Path(label).name.split("_gt")[0].split(".")[0] in message  # and so is the image


def test_run_cli_turns_usage_error_into_one_line(capsys):
    def bad(argv):
        raise common.CheckpointError("checkpoint not found: x.pt (check the --resume path)")

    with pytest.raises(SystemExit) as e:
        common.run_cli(bad)
    assert e.value.code == 2
    assert (
        capsys.readouterr().err == "error: checkpoint not found: x.pt (check the --resume path)\n"
    )

    def crash(argv):
        raise ValueError("a bug, not a usage error")

    with pytest.raises(ValueError):
        common.run_cli(crash)


# ---- build_dataset ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,split,kwargs,count,cls",
    [
        ("gta", "train", {}, 3, common.GTA5),
        ("gta", "train", {"gta_list": "clouds"}, 2, common.GTA5),
        ("gta", "train", {"gta_list": "famix"}, 2, common.GTA5),
        ("synthia", "train", {}, 2, common.Synthia),
        ("synthia", "val", {}, 1, common.Synthia),
        ("cityscapes", "val", {}, 2, common.Cityscapes),
        ("bdd", "val", {}, 2, common.BDD100K),
        ("mapillary", "val", {}, 3, common.Mapillary),
        ("acdc-fog", "val", {}, 2, common.ACDC),
        ("acdc-night", "val", {}, 1, common.ACDC),
    ],
)
def test_build_dataset_every_name(data_root, name, split, kwargs, count, cls):
    ds = common.build_dataset(name, data_root, split, **kwargs)
    assert isinstance(ds, cls) and len(ds) == count
    image, label, sample = ds[0]
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    assert label.dtype == torch.int64 and label.shape == image.shape[1:]
    assert set(label.unique().tolist()) <= ALLOWED_LABELS and isinstance(sample, str)


def test_build_dataset_options_reach_the_reader(data_root, mapillary_tree):
    rein = common.build_dataset("mapillary", data_root, "val", mapillary_map="rein")
    name = "0035fkbjWljhaftpVM37-g"
    np.testing.assert_array_equal(
        label_of(rein, name)[1].numpy(), mapillary_tree.extra["rein"][name]
    )

    def flip(im, lab, g):
        return im.flip(-1), lab.flip(-1)

    plain = common.build_dataset("cityscapes", data_root, "val")
    flipped = common.build_dataset("cityscapes", data_root, "val", transform=flip)
    assert torch.equal(flipped[0][1], plain[0][1].flip(-1))


def test_build_dataset_toy_names(toy_data):
    assert len(common.build_dataset("toy", toy_data, "train")) == common.TOY_COUNTS["source"][0]
    assert len(common.build_dataset("toy", toy_data, "val")) == common.TOY_COUNTS["source"][1]
    assert common.TOY_TARGETS == ("toy-city", "toy-fog", "toy-night")
    for name in common.TOY_TARGETS:
        ds = common.build_dataset(name, toy_data, "val")
        assert isinstance(ds, common.Cityscapes) and len(ds) == 48
    with pytest.raises(common.UsageError, match="unknown toy target 'toy-rain'"):
        common.build_dataset("toy-rain", toy_data, "val")


def test_build_dataset_unknown_names(data_root):
    with pytest.raises(common.UsageError) as e:
        common.build_dataset("kitti", data_root, "val")
    assert "unknown dataset 'kitti'" in str(e.value) and "cityscapes" in str(e.value)
    with pytest.raises(common.UsageError, match="unknown ACDC condition"):
        common.build_dataset("acdc-haze", data_root, "val")


# =============================================================================================
# Toy dataset
# =============================================================================================

SMALL_TOY = {"source": (2, 1), "city": (0, 1), "fog": (0, 1), "night": (0, 1)}


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_toy_generator_deterministic(tmp_path):
    a = _tree_bytes(common.make_toy_dataset(tmp_path / "a", seed=3, counts=SMALL_TOY))
    b = _tree_bytes(common.make_toy_dataset(tmp_path / "b", seed=3, counts=SMALL_TOY))
    c = _tree_bytes(common.make_toy_dataset(tmp_path / "c", seed=4, counts=SMALL_TOY))
    assert len(a) == 2 * 3 + 2 + 2 * 3 + 1  # source pairs, 2 lists, target pairs, stamp
    assert a == b
    images = [k for k in a if k.endswith(".png")]
    assert all(a[k] != c[k] for k in images if "images" in k or "leftImg8bit" in k)
    # A second call with the same stamp keeps the files (no rewrite).
    first = tmp_path / "a" / "toy" / "source" / "images" / "00001.png"
    mtime = first.stat().st_mtime_ns
    common.make_toy_dataset(tmp_path / "a", seed=3, counts=SMALL_TOY)
    assert first.stat().st_mtime_ns == mtime


def test_toy_regeneration_leaves_no_stale_files(tmp_path):
    bigger = {**SMALL_TOY, "city": (0, 2)}
    common.make_toy_dataset(tmp_path, seed=0, counts=bigger)
    common.make_toy_dataset(tmp_path, seed=0, counts=SMALL_TOY)
    assert len(common.build_dataset("toy-city", tmp_path, "val")) == SMALL_TOY["city"][1]


def test_toy_domain_gap(toy_data):
    """Road and sky change colour between the toy source and each target by a clear margin."""

    def mean_colours(name, split):
        ds = common.build_dataset(name, toy_data, split)
        sums = {0: [], 10: []}
        for i in range(6):
            image, label, _ = ds[i]
            assert set(label.unique().tolist()) <= set(common._TOY_CLASSES) | {255}
            for c, pixels in sums.items():
                pixels.append(image[:, label == c].float().T)
        return {c: torch.cat(v).mean(0) for c, v in sums.items()}

    source = mean_colours("toy", "train")
    for target in common.TOY_TARGETS:
        colours = mean_colours(target, "val")
        for c in (0, 10):
            gap = (colours[c] - source[c]).norm().item()
            assert gap > 40, (target, c, gap)


# =============================================================================================
# Confusion matrix and mIoU
# =============================================================================================


def _hand_matrix() -> common.ConfusionMatrix:
    # (gt, pred): class 0 has 3 GT pixels (one predicted as 1), class 1 has 2 (one predicted as
    # 3), class 2 one, class 9 one; class 3 is predicted once but absent from GT; ignored pixels
    # (gt 255, also a gt of 19 outside the classes) carry predictions 3, 0 and 5 that must not
    # count.
    pairs = [
        (0, 0),
        (0, 0),
        (0, 1),
        (1, 1),
        (1, 3),
        (2, 2),
        (9, 9),
        (255, 3),
        (255, 0),
        (255, 5),
        (19, 5),
    ]
    gt = torch.tensor([p[0] for p in pairs]).view(1, -1)
    pred = torch.tensor([p[1] for p in pairs]).view(1, -1)
    cm = common.ConfusionMatrix(19)
    cm.update(pred[:, :5], gt[:, :5])  # two updates accumulate like one
    cm.update(pred[:, 5:], gt[:, 5:])
    return cm


def test_confusion_matrix_counts_and_ious():
    cm = _hand_matrix()
    m = cm.mat.numpy()
    assert m.sum() == 7  # the four ignored pixels are not counted
    assert m[0, 0] == 2 and m[0, 1] == 1 and m[1, 1] == 1 and m[1, 3] == 1 and m[2, 2] == 1
    assert m[9, 9] == 1 and m[:, 5].sum() == 0
    ious = cm.ious()
    # IoU = TP / (TP + FP + FN): 0: 2/3; 1: 1/(1+1+1); 2: 1; 3: 0/(0+1+0); 9: 1; others NaN.
    np.testing.assert_allclose(ious[[0, 1, 2, 3, 9]], [2 / 3, 1 / 3, 1, 0, 1])
    assert np.isnan(np.delete(ious, [0, 1, 2, 3, 9])).all()


def test_miou_modes_and_subsets():
    cm = _hand_matrix()
    # nanmean: classes 0,1,2,3,9 -> (2/3 + 1/3 + 1 + 0 + 1) / 5 = 0.6
    assert cm.miou("nanmean") == pytest.approx(60.0)
    # present_gt drops class 3 (predicted, no GT): (2/3 + 1/3 + 1 + 1) / 4 = 0.75
    assert cm.miou("present_gt") == pytest.approx(75.0)
    # SYNTHIA16 drops terrain (9): (2/3 + 1/3 + 1 + 0) / 4; SYNTHIA13 also drops wall (3).
    assert cm.miou("nanmean", common.SYNTHIA16) == pytest.approx(50.0)
    assert cm.miou("nanmean", common.SYNTHIA13) == pytest.approx(200 / 3)
    assert cm.miou("present_gt", common.SYNTHIA16) == pytest.approx(200 / 3)
    assert common.SYNTHIA16 == (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
    assert common.SYNTHIA13 == (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
    per_class = cm.per_class("nanmean")
    assert per_class["road"] == pytest.approx(66.6667) and per_class["wall"] == 0.0
    assert per_class["terrain"] == 100.0 and per_class["pole"] is None
    assert cm.per_class("present_gt")["wall"] is None
    with pytest.raises(ValueError):
        cm.miou("mean")


def test_miou_empty_and_perfect():
    cm = common.ConfusionMatrix(19)
    assert np.isnan(cm.miou())
    label = torch.tensor([[0, 1, 255], [18, 18, 5]])
    cm.update(label.clamp(max=18), label)
    assert cm.miou() == 100.0 and cm.miou("present_gt") == 100.0


def test_evaluate_dataset_constant_prediction(data_root, cityscapes_tree):
    """Predicting road everywhere: IoU_road = #road / #valid, every other GT class 0."""
    ds = common.build_dataset("cityscapes", data_root, "val")

    def predict(x):
        logits = torch.zeros(x.shape[0], 19, x.shape[2] // 2, x.shape[3] // 2)
        logits[:, 0] = 1.0
        return logits

    result = common.evaluate_dataset(
        predict,
        ds,
        resize=common.EvalResize(),
        dist=common.Dist(),
        workers=0,
        subsets={"16": common.SYNTHIA16},
    )
    labels = np.concatenate(
        [
            cityscapes_tree.labels[s].ravel()
            for s in ("frankfurt_000000_000294", "lindau_000001_000019")
        ]
    )
    valid = labels[labels != 255]
    present = np.unique(valid)
    expect = 100 * (valid == 0).mean() / len(present)
    assert result["miou"] == pytest.approx(expect, abs=1e-3)
    assert result["num_images"] == 2
    assert result["per_class_iou"]["car"] == 0.0 and result["per_class_iou"]["wall"] is None
    assert "miou_16" in result
    table = common.format_results({"cityscapes": result, "bdd": {**result, "miou": 10.0}})
    assert "cityscapes" in table and f"{result['miou']:.2f}" in table
    mean = f"{(result['miou'] + 10) / 2:.2f}"
    assert table.splitlines()[3].split() == ["mean", mean, "over", "2", "targets"]
    # the source validation split is scored, but not a target: the mean leaves it out
    with_val = {"source-val": {**result, "miou": 90.0}, "cityscapes": result,
                "bdd": {**result, "miou": 10.0}}  # fmt: skip
    assert common.target_mean(with_val) == (pytest.approx(float(mean), abs=5e-3),
                                            ["cityscapes", "bdd"])  # fmt: skip
    assert f"mean {mean} over 2 targets, source-val left out" in " ".join(
        common.format_results(with_val).split()
    )


def test_evaluate_dataset_batches_images_of_one_size():
    class Frames(torch.utils.data.Dataset):
        heights = (32, 32, 30, 32, 32)

        def __len__(self):
            return len(self.heights)

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            image = torch.randint(0, 256, (3, self.heights[i], 64), dtype=torch.uint8, generator=g)
            return image, (image[0].long() * 19 // 256), f"f{i}"  # label: the red channel's bin

    seen = []

    def predict(images):  # class scores from the red channel, half the time off by one bin
        seen.append(images.shape[0])
        red = images[:, 0].long() * 19 // 256  # (B, h, w)
        noisy = torch.where(images[:, 1] % 2 == 0, red, (red + 1) % 19)
        return F.one_hot(noisy, 19).permute(0, 3, 1, 2).float()

    def run(batch_size):
        resize, dist = common.EvalResize(), common.Dist()
        return common.evaluate_dataset(
            predict, Frames(), resize=resize, dist=dist, workers=0, batch_size=batch_size
        )

    one = run(1)
    assert seen == [1] * 5
    seen.clear()
    assert run(3) == one and seen == [2, 1, 2]  # [0, 1] | [2] (30 rows) | [3, 4]
    assert 28 < one["miou"] < 38  # TP 1/2, FP 1/2, FN 1/2 of each bin: IoU about 1/3


# =============================================================================================
# Sliding windows
# =============================================================================================


def test_slide_windows_cityscapes_512():
    # 1024x512 (W x H), crop 512, stride 341: x = 0, 341, 512 [mmseg grid formula].
    assert common.slide_windows(512, 1024, 512, 341) == [
        (0, 512, 0, 512),
        (0, 512, 341, 853),
        (0, 512, 512, 1024),
    ]


@pytest.mark.parametrize(
    "h,w,crop,stride,count",
    [
        (720, 1280, 512, 341, 8),  # BDD native, Rein 512 config
        (1080, 1920, 1024, 683, 6),  # ACDC native, Rein 1024 config
        (1024, 2048, 1024, 683, 3),  # Cityscapes, Rein 1024 config
        (540, 960, 512, 341, 6),  # ACDC fit in (960, 540)
        (512, 683, 512, 341, 2),  # Mapillary 4:3 after pre-halving and fit
    ],
)
def test_slide_window_counts(h, w, crop, stride, count):
    windows = common.slide_windows(h, w, crop, stride)
    assert len(windows) == count
    covered = np.zeros((h, w), bool)
    for y1, y2, x1, x2 in windows:
        assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
        assert y2 - y1 == min(crop, h) and x2 - x1 == min(crop, w)
        covered[y1:y2, x1:x2] = True
    assert covered.all()


def test_slide_windows_odd_and_small():
    # h 7: rows (7-5+2)//3+1 = 2 -> y (0,5), (2,7); w 13: (13-5+2)//3+1 = 4 -> x2 5, 8, 11, 13.
    ys = [(0, 5), (2, 7)]
    xs = [(0, 5), (3, 8), (6, 11), (8, 13)]
    assert common.slide_windows(7, 13, 5, 3) == [(a, b, c, d) for a, b in ys for c, d in xs]
    # Smaller than the crop: one window, the image itself (no padding).
    assert common.slide_windows(300, 400, 512, 341) == [(0, 300, 0, 400)]
    assert common.slide_windows(300, 700, 512, 341) == [(0, 300, 0, 512), (0, 300, 188, 700)]


# =============================================================================================
# Evaluation resizing (the official per-method, per-target resize rules)
# =============================================================================================


def test_resize_arithmetic():
    assert common.fit_size(1224, 1632, 1024, 512) == (512, 683)  # Rein Mapillary 4:3 (halved)
    assert common.fit_size(540, 960, 1024, 512) == (512, 910)  # 16:9 halved
    assert common.fit_size(2064, 1548, 1024, 512) == (683, 512)  # portrait halved
    assert common.fit_size(1024, 2048, 1024, 512) == (512, 1024)  # Cityscapes, Rein 512
    assert common.fit_size(720, 1280, 1280, 720) == (720, 1280)  # BDD native
    assert common.fit_size(1080, 1920, 960, 540) == (540, 960)  # ACDC, Rein 512
    assert common.short_side_size(720, 1280, 1024) == (1024, 1820)
    assert common.short_side_size(2448, 3264, 1024) == (1024, 1365)
    assert common.short_side_size(4128, 3096, 1024) == (1365, 1024)
    assert common.short_side_size(600, 800, 1024) == (1024, 1365)  # upsampled
    assert common.short_side_size(1024, 2048, 1024) == (1024, 2048)


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Pixel-centre nearest neighbour: output i reads input floor((i + 0.5) * n_in / n_out)."""
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def test_eval_resize_short_side_label_nearest():
    rng = np.random.default_rng(0)
    label = torch.from_numpy(rng.choice(sorted(ALLOWED_LABELS), size=(72, 128)))
    image = torch.zeros(3, 72, 128, dtype=torch.uint8)
    im, lab = common.eval_resize(image, label, common.EvalResize(("short", 102), resize_gt=True))
    assert im.shape == (3, 102, 181) and lab.shape == (102, 181)  # 128 * 102 / 72 = 181.3
    expect = label.numpy()[_nearest_index(72, 102)][:, _nearest_index(128, 181)]
    np.testing.assert_array_equal(lab.numpy(), expect)


def test_eval_resize_height_crop_mapillary_4_3():
    # 3264 x 2448 -> height 1536 (2048 x 1536) -> centre crop x in [256, 1792).
    w, h = 3264, 2448
    ramp = torch.arange(w, dtype=torch.float64) * 255 / (w - 1)
    image = ramp.round().to(torch.uint8).expand(3, h, w).contiguous()
    label = (torch.arange(w) * 19 // w).expand(h, w).contiguous()
    im, lab = common.eval_resize(
        image, label, common.EvalResize(("height_crop", 1536), image_interp="bicubic")
    )
    assert im.shape == (3, 1536, 1536) and lab.shape == (1536, 1536)
    # The ramp tells where the crop starts: column 0 is resized column 256, source x ~ 407.5.
    scale = w / 2048
    for out_x, resized_x in ((0, 256), (1535, 1791)):
        src = (resized_x + 0.5) * scale - 0.5
        assert abs(im[0, 700, out_x].item() - src * 255 / (w - 1)) <= 1.5
    expect = label[0].numpy()[_nearest_index(w, 2048)][256:1792]
    np.testing.assert_array_equal(lab[0].numpy(), expect)


def test_eval_resize_height_crop_portrait_pads_255():
    image = torch.full((3, 64, 48), 200, dtype=torch.uint8)
    label = torch.zeros(64, 48, dtype=torch.int64)  # all road
    im, lab = common.eval_resize(image, label, common.EvalResize(("height_crop", 32)))
    # 48 x 64 -> height 32, width int(48 / 64 * 32) = 24 -> padded 4 + 24 + 4.
    assert im.shape == (3, 32, 32) and lab.shape == (32, 32)
    assert (lab[:, :4] == 255).all() and (lab[:, 28:] == 255).all() and (lab[:, 4:28] == 0).all()
    assert (
        (im[:, :, :4] == 0).all() and (im[:, :, 28:] == 0).all() and (im[:, :, 4:28] == 200).all()
    )


def test_eval_resize_mapillary_fixture_each_method(mapillary_tree):
    ds = common.Mapillary(mapillary_tree.root, "val")
    portrait = label_of(ds, "_1Gn_xkw7sa_i9GU4mkxxQ")
    im, lab = common.eval_resize(
        *portrait, common.EvalResize(("height_crop", 32), image_interp="bicubic")
    )
    assert lab.shape == (32, 32) and (lab[:, :4] == 255).all() and (lab[:, -4:] == 255).all()
    # CLOUDS: short side 1024 with the label: 4:3 64 x 48 -> 1365 x 1024.
    im, lab = common.eval_resize(
        *label_of(ds, "0035fkbjWljhaftpVM37-g"), common.EvalResize(("short", 1024), resize_gt=True)
    )
    assert im.shape == (3, 1024, 1365) and lab.shape == (1024, 1365)
    with pytest.raises(ValueError):
        common.eval_resize(*portrait, common.EvalResize(("area", 3)))


# =============================================================================================
# Augmentation primitives
# =============================================================================================


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_random_crop_pads_image_0_label_255():
    image = torch.randint(1, 256, (3, 10, 12), dtype=torch.uint8)
    label = torch.randint(0, 19, (10, 12))
    im, lab = common.random_crop(image, label, 16, _gen(0))
    assert im.shape == (3, 16, 16) and lab.shape == (16, 16)
    assert torch.equal(im[:, :10, :12], image) and torch.equal(lab[:10, :12], label)
    assert (im[:, 10:] == 0).all() and (im[:, :, 12:] == 0).all()
    assert (lab[10:] == 255).all() and (lab[:, 12:] == 255).all()
    # Taller than the crop in one axis only: cropped there, padded in the other.
    im, lab = common.random_crop(image, label, (6, 20), _gen(1))
    assert im.shape == (3, 6, 20) and (lab[:, 12:] == 255).all() and (lab[:, :12] != 255).all()


def _accepted(window: np.ndarray, ratio: float) -> bool:
    """mmseg RandomCrop rule: more than one class besides ignore, none above `ratio`."""
    _, counts = np.unique(window[window != 255], return_counts=True)
    return len(counts) > 1 and counts.max() / counts.sum() < ratio


def test_random_crop_cat_max_ratio_retries():
    # 8 x 64 label: class 0 in columns 0..29, ignore in 30..33, class 1 in 34..63. Of the 57
    # positions of an 8 x 8 crop only left = 28 holds two classes (2 + 2 pixels per row) with
    # none above 0.75 (left 27 and 29 give 3:1; counting ignore as a class would accept them).
    label = torch.zeros(8, 64, dtype=torch.int64)
    label[:, 30:34] = 255
    label[:, 34:] = 1
    image = torch.arange(64, dtype=torch.uint8).expand(3, 8, 64).contiguous()
    hits = 0
    for seed in range(200):
        g, replay = _gen(seed), _gen(seed)
        im, lab = common.random_crop(image, label, 8, g, cat_max_ratio=0.75)
        # Replay the draws: a first position then up to 10 redraws; the first accepted position
        # wins, else the last one drawn.
        for attempt in range(11):  # noqa: B007 (reported on failure)
            top = int(torch.randint(1, (), generator=replay))
            left = int(torch.randint(57, (), generator=replay))
            if _accepted(label[top : top + 8, left : left + 8].numpy(), 0.75):
                hits += 1
                break
        assert int(im[0, 0, 0]) == left, (seed, attempt)
        assert torch.equal(lab, label[:, left : left + 8])
        # Both generators consumed the same number of draws.
        assert torch.rand((), generator=g) == torch.rand((), generator=replay)
    assert 10 < hits < 200  # both branches (accepted / gave up after 10 retries) were taken


def test_random_crop_without_ratio_draws_once():
    label = torch.zeros(8, 64, dtype=torch.int64)  # a single class: never accepted
    image = torch.zeros(3, 8, 64, dtype=torch.uint8)
    g, replay = _gen(5), _gen(5)
    common.random_crop(image, label, 8, g)
    torch.randint(1, (), generator=replay), torch.randint(57, (), generator=replay)
    assert torch.rand((), generator=g) == torch.rand((), generator=replay)


def _augment(image, label, g):
    image, label = common.random_scale(image, label, (0.5, 1.5), g)
    image, label = common.random_crop(image, label, 24, g, cat_max_ratio=0.75)
    image, label = common.random_hflip(image, label, g)
    return common.color_jitter(image, g, 0.4, 0.4, 0.4, 0.1), label


def test_augmentation_deterministic_for_seeded_generator():
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    label = torch.randint(0, 19, (40, 50))
    a = _augment(image, label, _gen(11))
    b = _augment(image, label, _gen(11))
    c = _augment(image, label, _gen(12))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].dtype == torch.uint8 and a[0].shape == (3, 24, 24)


def test_labels_stay_valid_after_resizing():
    rng = np.random.default_rng(2)
    values = sorted(ALLOWED_LABELS)
    label = torch.from_numpy(rng.choice(values, size=(37, 53)))
    image = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8)
    original = set(label.unique().tolist())
    for seed in range(8):
        _, lab = common.random_scale(image, label, (0.3, 2.2), _gen(seed))
        assert lab.dtype == torch.int64 and set(lab.unique().tolist()) <= original
    im, lab = common.resize_pair(image, label, (19, 101), "bicubic")
    assert im.shape == (3, 19, 101) and set(lab.unique().tolist()) <= original
    expect = label.numpy()[_nearest_index(37, 19)][:, _nearest_index(53, 101)]
    np.testing.assert_array_equal(lab.numpy(), expect)


def test_hflip_and_jitter_and_normalize():
    image = torch.randint(0, 256, (3, 4, 6), dtype=torch.uint8)
    label = torch.randint(0, 19, (4, 6))
    im, lab = common.random_hflip(image, label, _gen(0), p=1.0)
    assert torch.equal(im, image.flip(-1)) and torch.equal(lab, label.flip(-1))
    im, lab = common.random_hflip(image, label, _gen(0), p=0.0)
    assert torch.equal(im, image) and torch.equal(lab, label)
    assert torch.equal(common.color_jitter(image, _gen(0)), image)  # all strengths 0: identity
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = common.normalize(x, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    torch.testing.assert_close(out, torch.full((1, 3, 2, 2), 2.0))  # (1 - 0.5) / 0.25


def test_cv2_hsv_conversion_hand_values():
    pixels = torch.tensor(
        [[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128], [255, 255, 0], [0, 0, 0]],
        dtype=torch.uint8,
    ).T[:, None, :]  # (3, 1, 6)
    hsv = common.rgb_to_hsv_cv2(pixels)[:, 0].T.tolist()
    assert hsv == [[0, 255, 255], [60, 255, 255], [120, 255, 255], [0, 0, 128], [30, 255, 255],
                   [0, 0, 0]]  # fmt: skip
    assert torch.equal(common.hsv_to_rgb_cv2(common.rgb_to_hsv_cv2(pixels)), pixels)
    # (200, 100, 50): v 200, s = round(255·150/200) = 191, h = round(30·(100-50)/150) = 10
    one = torch.tensor([[[200]], [[100]], [[50]]], dtype=torch.uint8)
    assert common.rgb_to_hsv_cv2(one)[:, 0, 0].tolist() == [10, 191, 200]
    shifted = common.rgb_to_hsv_cv2(pixels)
    shifted[0] = (shifted[0] + 60) % 180
    assert common.hsv_to_rgb_cv2(shifted)[:, 0, 0].tolist() == [0, 255, 0]  # red + 120° = green


def test_hsv_conversion_matches_opencv_48():
    """Reference values from cv2.cvtColor of opencv-python 4.8.0 (the official environments of
    Rein and CLOUDS): BGR2HSV per pixel; HSV2BGR on a whole row (its vectorised path, taken by
    whole images)."""
    rgb = torch.tensor(
        [[200, 120, 40], [10, 200, 90], [33, 34, 250], [255, 128, 129], [1, 0, 0], [90, 90, 91]],
        dtype=torch.uint8,
    ).T[:, None]  # (3, 1, 6)
    assert common.rgb_to_hsv_cv2(rgb)[:, 0].T.tolist() == [
        [15, 204, 200], [73, 242, 200], [120, 221, 250], [0, 127, 255], [0, 255, 1], [120, 3, 91]
    ]  # fmt: skip
    hsv = torch.tensor([
        [0, 255, 255], [17, 100, 201], [95, 37, 180], [179, 255, 10], [60, 250, 250], [33, 180, 77]
    ]).T[:, None]  # fmt: skip
    assert common.hsv_to_rgb_cv2(hsv)[:, 0].T.tolist() == [
        [255, 0, 0], [201, 166, 122], [153, 175, 180], [10, 0, 0], [4, 250, 4], [71, 77, 22]
    ]  # fmt: skip
    g = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g)
    back = common.hsv_to_rgb_cv2(common.rgb_to_hsv_cv2(rgb))
    # uint8 H/S quantisation and the truncation: OpenCV itself loses a few grey levels
    assert (back.int() - rgb.int()).abs().max() <= 6 and (back <= rgb).float().mean() > 0.5


def test_convert_step_clips_then_truncates_like_numpy():
    x = torch.tensor([10, 100, 250], dtype=torch.uint8)
    assert common.to_uint8_truncated(x, alpha=1.0, beta=0.7).tolist() == [10, 100, 250]
    assert common.to_uint8_truncated(x, alpha=1.5).tolist() == [15, 150, 255]
    assert common.to_uint8_truncated(x, beta=-20.5).tolist() == [0, 79, 229]
    x = torch.tensor([250, 3, 100], dtype=torch.uint8)
    assert common.to_uint8_truncated(x, beta=10).tolist() == [255, 13, 110]
    assert common.to_uint8_truncated(x, alpha=0.5).tolist() == [125, 1, 50]  # 1.5 -> 1: truncation
    assert common.to_uint8_truncated(x, beta=-20.7).tolist() == [229, 0, 79]


# =============================================================================================
# Training loader: determinism, exact resume, ranks, repeat factors
# =============================================================================================


def _crop16(image, label, g):
    image, label = common.random_crop(image, label, 16, g)
    image, label = common.random_hflip(image, label, g)
    return common.color_jitter(image, g, 0.5, 0.5, 0.5), label


def _batches(ds, n, global_batch=4, seed=0, start_iter=0, rank=0, world=1, workers=0):
    dist = common.Dist(rank=rank, world_size=world)
    loader = common.TrainLoader(ds, global_batch, dist, seed, workers, start_iter=start_iter)
    return [next(loader) for _ in range(n)]


def _equal(a, b) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and list(a[2]) == list(b[2])


def test_train_loader_deterministic_and_exact_resume(gta5_tree):
    ds = common.GTA5(gta5_tree.root, "train", "all", transform=_crop16)  # 3 samples
    fresh = _batches(ds, 6)
    assert fresh[0][0].shape == (4, 3, 16, 16) and fresh[0][1].shape == (4, 16, 16)
    assert all(_equal(a, b) for a, b in zip(fresh, _batches(ds, 6)))
    # Resumed at iteration 4: the same batches as iterations 4 and 5 of the fresh run
    # (sample order across epoch boundaries and every augmentation draw).
    resumed = _batches(ds, 2, start_iter=4)
    assert _equal(resumed[0], fresh[4]) and _equal(resumed[1], fresh[5])
    # Another seed gives other batches.
    other = _batches(ds, 6, seed=1)
    assert not all(_equal(a, b) for a, b in zip(fresh, other))
    # Each epoch of 3 samples visits every sample once: positions 0..2, 3..5, ...
    names = [n for batch in fresh for n in batch[2]]
    for e in range(len(names) // 3):
        assert sorted(names[3 * e : 3 * e + 3]) == ["00001", "00002", "15188"]


def test_train_loader_ranks_partition_global_batch(gta5_tree):
    ds = common.GTA5(gta5_tree.root, "train", "all", transform=_crop16)
    single = _batches(ds, 3)
    rank0 = _batches(ds, 3, rank=0, world=2)
    rank1 = _batches(ds, 3, rank=1, world=2)
    for s, a, b in zip(single, rank0, rank1):
        assert a[0].shape[0] == 2 and b[0].shape[0] == 2
        assert torch.equal(torch.cat([a[0], b[0]]), s[0])
        assert torch.equal(torch.cat([a[1], b[1]]), s[1])
        assert list(a[2]) + list(b[2]) == list(s[2])
    # Resuming each rank at iteration 1 continues its own slice.
    for rank, fresh in ((0, rank0), (1, rank1)):
        resumed = _batches(ds, 2, rank=rank, world=2, start_iter=1)
        assert _equal(resumed[0], fresh[1]) and _equal(resumed[1], fresh[2])
    with pytest.raises(common.UsageError, match="not divisible"):
        common.TrainLoader(ds, 3, common.Dist(rank=0, world_size=2), 0, 0)


def test_train_loader_workers_match_main_process(gta5_tree):
    ds = common.GTA5(gta5_tree.root, "train", "all", transform=_crop16)
    assert all(_equal(a, b) for a, b in zip(_batches(ds, 3), _batches(ds, 3, workers=2)))


class _IndexDataset(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, item):
        index, _seed = item
        return index


def test_repeat_factors_long_run_fraction():
    factors = [1.0, 1.0, 0.5, 2.5]
    # Per epoch: index i appears floor(r_i) or floor(r_i) + 1 times.
    for epoch in range(20):
        counts = np.bincount(common.epoch_indices(4, 0, epoch, factors), minlength=4)
        assert counts[0] == 1 and counts[1] == 1 and counts[2] in (0, 1) and counts[3] in (2, 3)
    # Long run (index i of 40 has factor factors[i % 4]; 4,000 samples = 80 epochs of ~50):
    # the share of each group tends to r / sum(r) = 0.2, 0.2, 0.1, 0.5.
    loader = common.TrainLoader(
        _IndexDataset(40), 50, common.Dist(), 0, 0, repeat_factors=factors * 10, collate=list
    )
    seen = np.bincount(np.concatenate([next(loader) for _ in range(80)]) % 4, minlength=4)
    np.testing.assert_allclose(seen / seen.sum(), np.array(factors) / sum(factors), atol=0.02)


def test_train_loader_rejects_empty_dataset():
    with pytest.raises(common.UsageError, match="empty"):
        common.TrainLoader(_IndexDataset(0), 2, common.Dist(), 0, 0)


# =============================================================================================
# Checkpoints and RNG state
# =============================================================================================


def _model_and_optimizer():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


def test_checkpoint_round_trip(tmp_path):
    model, opt = _model_and_optimizer()
    args = argparse.Namespace(iters=10, data=Path("/data"), amp=False, targets="cityscapes")
    state = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "out" / "last.pt"
    common.save_checkpoint(
        path,
        method="famix",
        iteration=7,
        model_state=state,
        optimizer=opt,
        scaler=None,
        args=args,
        metrics={"cityscapes": 12.5},
    )
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"method", "iter", "model", "optimizer", "scaler", "args", "rng", "metrics"}
    assert raw["method"] == "famix" and raw["iter"] == 7 and raw["scaler"] is None
    assert set(raw["model"]) == {"weight", "bias"}
    assert torch.equal(raw["model"]["weight"], model.weight)
    assert raw["args"] == {"iters": 10, "data": "/data", "amp": False, "targets": "cityscapes"}
    assert raw["metrics"] == {"cityscapes": 12.5}
    ckpt = common.load_checkpoint(path, "famix")
    _, fresh_opt = _model_and_optimizer()
    fresh_opt.state.clear()
    assert common.restore_training_state(ckpt, fresh_opt, None) == 7
    buf = opt.state[opt.param_groups[0]["params"][0]]["momentum_buffer"]
    assert torch.equal(
        fresh_opt.state[fresh_opt.param_groups[0]["params"][0]]["momentum_buffer"], buf
    )
    assert not list(path.parent.glob(".*tmp*"))


def _save(path, method, iteration, model, opt):
    state = model.state_dict()
    common.save_checkpoint(
        path,
        method=method,
        iteration=iteration,
        model_state=state,
        optimizer=opt,
        scaler=None,
        args={},
    )


def test_checkpoint_atomic_write_keeps_old_file(tmp_path, monkeypatch):
    model, opt = _model_and_optimizer()
    path = tmp_path / "last.pt"
    _save(path, "rein", 1, model, opt)
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(common.torch, "save", broken_save)
    with pytest.raises(common.CheckpointError, match="disk full.*previous file, if any, is intact"):
        _save(path, "rein", 2, model, opt)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left
    monkeypatch.undo()
    assert common.load_checkpoint(path, "rein")["iter"] == 1


def test_checkpoint_errors_are_clear(tmp_path):
    model, opt = _model_and_optimizer()
    path = tmp_path / "last.pt"
    _save(path, "clouds", 3, model, opt)
    with pytest.raises(common.CheckpointError) as e:
        common.load_checkpoint(path, "famix")
    assert (
        "clouds checkpoint" in str(e.value)
        and "famix" in str(e.value)
        and str(path) in str(e.value)
    )

    missing = tmp_path / "nope.pt"
    with pytest.raises(common.CheckpointError) as e:
        common.load_checkpoint(missing)
    assert "not found" in str(e.value) and str(missing) in str(e.value)

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(common.CheckpointError) as e:
        common.load_checkpoint(truncated)
    assert "truncated" in str(e.value) and str(truncated) in str(e.value)
    assert isinstance(e.value, common.UsageError) and "\n" not in str(e.value)

    foreign = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(common.CheckpointError, match="no 'method' key"):
        common.load_checkpoint(foreign)


def _draws():
    return (
        torch.rand(4),
        torch.randint(0, 1000, (3,)),
        np.random.rand(3),
        np.random.standard_normal(),
        random.random(),
        random.gauss(0, 1),
        random.randint(0, 10**9),
    )


def test_rng_state_round_trip_reproduces_draws(tmp_path):
    common.seed_everything(5)
    # Leave a cached Gaussian in numpy and in Python's random, so the cached values are saved too.
    np.random.standard_normal()
    random.gauss(0, 1)
    state = common.get_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    first = _draws()
    common.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    second = _draws()
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    np.testing.assert_array_equal(first[2], second[2])
    assert first[3:] == second[3:]
    common.seed_everything(6)
    assert _draws()[4] != first[4]


def test_strip_prefixes_and_unwrap():
    assert common.strip_prefixes({"module._orig_mod.a.b": 1, "c": 2}) == {"a.b": 1, "c": 2}
    inner = nn.Linear(2, 2)
    outer = nn.Module()
    outer.module = inner
    assert common.unwrap(outer) is inner
    assert common.count_parameters(inner) == (6, 6)
    assert common.poly_lr(0.01, 500, 1000) == pytest.approx(0.01 * 0.5**0.9)


# =============================================================================================
# Shared command-line block
# =============================================================================================

SHARED_DESTS = {
    "source", "data", "targets", "iters", "batch_size", "crop", "amp", "tf32", "fast", "compile",
    "out", "overwrite", "resume", "device", "seed", "pretrained", "eval_only", "eval_every",
    "log_every", "workers", "eval_batch_size", "cpu_threads", "save_preds", "bench", "peak_tflops",
}  # fmt: skip


def _parser():
    p = common.make_parser("test")
    common.add_shared_flags(
        p,
        source="gta",
        targets="cityscapes,bdd,mapillary",
        iters=40000,
        batch_size=8,
        crop=768,
        amp=True,
        pretrained="ViT-B-16",
        eval_every=5000,
        log_every=50,
        cite={"iters": "paper: 40000 [C main.py]"},
    )
    return p


def test_add_shared_flags_defaults():
    p = _parser()
    args = p.parse_args([])
    assert set(vars(args)) == SHARED_DESTS
    assert (args.source, args.targets, args.iters, args.batch_size, args.crop) == (
        "gta",
        "cityscapes,bdd,mapillary",
        40000,
        8,
        768,
    )
    assert args.amp is True and args.pretrained == "ViT-B-16" and args.eval_every == 5000
    assert args.seed == 0 and args.resume is None and args.device is None and not args.eval_only
    assert (args.tf32, args.fast, args.compile, args.overwrite) == (True, "auto", False, False)
    assert (args.log_every, args.cpu_threads, args.peak_tflops) == (50, 0, None)
    assert p.parse_args(["--no-amp"]).amp is False
    help_text = " ".join(p.format_help().split())
    assert "optimizer steps (default 40000; paper: 40000 [C main.py])" in help_text
    assert "global batch (default 8)" in help_text
    assert common.parse_targets(p.parse_args(["--targets", "cityscapes, bdd,,"])) == [
        "cityscapes",
        "bdd",
    ]


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["--source", "kitti"], "argument --source: invalid choice: 'kitti'"),
        (["--iters", "0"], "argument --iters: must be >= 1, got 0"),
        (["--iters", "-5"], "argument --iters: must be >= 1, got -5"),
        (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["--crop", "x"], "argument --crop: not a number: 'x'"),
        (["--workers", "-1"], "argument --workers: must be >= 0, got -1"),
        (["--eval-every", "-1"], "argument --eval-every: must be >= 0, got -1"),
        (["--peak-tflops", "0"], "argument --peak-tflops: must be > 0.0, got 0"),
        (["--peak-tflops", "nan"], "argument --peak-tflops: must be > 0.0, got nan"),
        (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_shared_flags_reject_impossible_values_in_one_line(argv, expect, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expect in err, err


def test_float_types_bound_their_values():
    assert common.nonnegative_float("0") == 0.0 and common.unit_float("1") == 1.0
    for parse, text, message in [
        (common.nonnegative_float, "-1e-9", "must be >= 0.0, got -1e-9"),
        (common.unit_float, "1.5", "must be in [0, 1], got 1.5"),
        (common.unit_float, "inf", "must be >= 0.0, got inf"),
        (common.positive_float, "0", "must be > 0.0, got 0"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
            parse(text)


def _parse_with_preset(argv: list[str]) -> argparse.Namespace:
    """The one pre-parse each method's parse_args does: it reads what chooses a preset (here
    --source toy), installs that preset's defaults with set_defaults, then the one real parse."""
    parser = common.make_parser("test")
    parser.add_argument("--source", default="gta", choices=["gta", "toy"])
    parser.add_argument("--iters", type=common.positive_int, default=40000, help="steps "
                        "(default %(default)s)")  # fmt: skip
    parser.add_argument("--batch-size", type=common.positive_int, default=8)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    toy = {"iters": 3, "batch_size": 2, "amp": False}
    first, _ = parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    parser.set_defaults(**(toy if first.source == "toy" else {}))
    return parser.parse_args(argv)


def test_preset_pre_parse_explicit_flags_and_abbreviations_win(capsys):
    args = _parse_with_preset(["--source", "toy", "--iters=7", "--amp", "--batch", "4"])
    assert (args.iters, args.batch_size, args.amp) == (7, 4, True)
    args = _parse_with_preset(["--source", "toy"])
    assert (args.iters, args.batch_size, args.amp) == (3, 2, False)  # the preset's defaults
    args = _parse_with_preset(["--source", "gta"])
    assert (args.iters, args.batch_size, args.amp) == (40000, 8, True)  # paper defaults
    with pytest.raises(SystemExit) as e:
        _parse_with_preset(["--source", "toy", "--help"])
    assert e.value.code == 0 and "steps (default 3)" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as e:  # a Parser error: one line, exit code 2
        _parse_with_preset(["--source", "toy", "--iters", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: argument --iters: must be >= 1, got 0 (see ")
    assert err.endswith(" --help)\n")


# =============================================================================================
# Run log, visualisation
# =============================================================================================


def test_run_log_header_records_and_results(tmp_path):
    out = tmp_path / "out"
    log = common.RunLog(out, argparse.Namespace(iters=5, data=Path("d")), {"params_total": 123})
    log.log({"type": "train", "iter": 1, "loss": 0.5})
    results = {"cityscapes": {"miou": 41.5, "per_class_iou": {"road": 90.0}}}
    log.write_results(results, None)
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    header = lines[0]
    assert header["type"] == "header" and header["args"] == {"iters": 5, "data": "d"}
    assert header["params_total"] == 123 and header["torch"] == torch.__version__
    assert {"git_commit", "cuda", "device", "time"} <= set(header)
    assert lines[1:] == [{"type": "train", "iter": 1, "loss": 0.5},
                         {"type": "eval", "iter": None, "results": results}]  # fmt: skip
    assert json.loads((out / "results.json").read_text())["cityscapes"]["miou"] == 41.5
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl", "results.json"]
    common.RunLog(tmp_path / "rank1", {}, {}, enabled=False).log({"x": 1})
    assert not (tmp_path / "rank1").exists()


def test_save_prediction_strip_three_tiles(tmp_path):
    image = torch.randint(0, 256, (3, 8, 10), dtype=torch.uint8)
    label = torch.tensor([[0, 13, 255, 10, 18] * 2] * 8)
    pred = torch.tensor([[13, 0, 2, 10, 18] * 2] * 8)
    path = tmp_path / "preds" / "00000_x.png"
    common.save_prediction_strip(path, image, label, pred)
    strip = np.asarray(Image.open(path))
    assert strip.shape == (8, 30, 3)
    np.testing.assert_array_equal(strip[:, :10], image.permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(
        strip[0, 10:15], [(128, 64, 128), (0, 0, 142), (0, 0, 0), (70, 130, 180), (119, 11, 32)]
    )
    np.testing.assert_array_equal(strip[:, 20:], common.PALETTE[pred.numpy()])
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "preds" / "00000_x_pred.png")), strip[:, 20:]
    )


# =============================================================================================
# Bad files, bad folders, failures, interruptions: one line each, nothing lost
# =============================================================================================


def _truncate(path: Path, keep: int = 60) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_undecodable_files_are_one_line_naming_file_and_archive(make_tree):
    gta = make_tree("gta5")
    image = gta.root / "images" / "00001.png"
    _truncate(image)
    with pytest.raises(common.DataFileError) as e:
        common.read_image(image)
    message = str(e.value)
    assert str(image) in message and "corrupt or truncated" in message
    assert "re-extract it from 01_images.zip ... 10_images.zip" in message
    label = gta.root / "labels" / "00002.png"
    label.write_bytes(b"not a png at all")
    with pytest.raises(common.DataFileError, match="01_labels.zip ... 10_labels.zip"):
        common.read_cityscapes_label(label)
    synthia = make_tree("synthia")
    synthia_label = synthia.root / "GT" / "LABELS" / "0000000.png"
    _truncate(synthia_label, 100)
    with pytest.raises(common.DataFileError, match=str(synthia_label)):
        common.read_synthia_label(synthia_label)
    for err in (e.value,):
        assert "\n" not in str(err)


def test_undecodable_file_inside_a_loader_worker_ends_in_one_line(make_tree, capsys):
    cs = make_tree("cityscapes")
    bad = cs.root / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png"
    _truncate(bad)
    ds = common.build_dataset("cityscapes", cs.root.parent, "train")
    loader = common.TrainLoader(ds, 1, common.Dist(), seed=0, workers=1)
    with pytest.raises(common.DataFileError) as e:
        next(loader)
    assert "Original Traceback" in str(e.value)  # what the worker hands back

    def main(argv):
        raise e.value

    with pytest.raises(SystemExit) as exit_info:
        common.run_cli(main)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: cannot read image {bad} (") and "leftImg8bit_trainvaltest" in err


def test_size_mismatch_skips_in_training_splits_and_fails_in_evaluation_splits(make_tree, capsys):
    cs = make_tree("cityscapes")
    val_label = (
        cs.root / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000294_gtFine_labelIds.png"
    )
    train_label = (
        cs.root / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_labelIds.png"
    )
    for label in (val_label, train_label):
        Image.fromarray(np.zeros((30, 64), np.uint8)).save(label)  # image is 64x32
    with pytest.raises(common.DataFileError) as e:
        common.build_dataset("cityscapes", cs.root.parent, "val")
    assert f"label {val_label} is 64x30 but its image" in str(e.value)
    assert "scored whole" in str(e.value) and "gtFine_trainvaltest.zip" in str(e.value)
    capsys.readouterr()
    with pytest.raises(common.UsageError, match="training dataset is empty"):  # all skipped
        common.TrainLoader(common.build_dataset("cityscapes", cs.root.parent, "train"), 1,
                           common.Dist(), 0, 0)  # fmt: skip
    train = common.build_dataset("cityscapes", cs.root.parent, "train")
    assert len(train) == 0 and train.skipped == ["aachen_000000_000019_leftImg8bit"]
    assert "cityscapes: skipped 1 image/label pairs of different sizes" in capsys.readouterr().out
    assert common.size_policy("train") == common.size_policy("all") == "skip"
    assert common.size_policy("val") == "error"


SMALL_TOY = {"source": (2, 1), "city": (0, 1), "fog": (0, 1), "night": (0, 1)}


def test_toy_writer_never_deletes_a_folder_it_did_not_write(tmp_path):
    mine = tmp_path / "toy"
    mine.mkdir()
    (mine / "my_notes.txt").write_text("keep me")
    with pytest.raises(common.UsageError, match="was not written by this project"):
        common.make_toy_dataset(tmp_path, counts=SMALL_TOY)
    assert (mine / "my_notes.txt").read_text() == "keep me"


def test_toy_writer_broken_marker_is_one_line_and_interrupted_write_is_redone(tmp_path):
    root = common.make_toy_dataset(tmp_path, counts=SMALL_TOY)
    marker = root / "toy.json"
    good = marker.read_text()
    marker.write_text(good[: len(good) // 2])  # truncated
    with pytest.raises(common.UsageError) as e:
        common.make_toy_dataset(tmp_path, counts=SMALL_TOY)
    assert "not a valid toy marker" in str(e.value) and "\n" not in str(e.value)
    # An interrupted write leaves the "incomplete" marker: the folder is ours and is rewritten.
    marker.write_text(json.dumps({**json.loads(good), "incomplete": True}))
    (root / "source" / "images" / "00001.png").unlink()
    common.make_toy_dataset(tmp_path, counts=SMALL_TOY)
    assert (root / "source" / "images" / "00001.png").is_file() and marker.read_text() == good


def _out_args(out, **kw):
    return argparse.Namespace(out=str(out), resume=None, overwrite=False, eval_only=False, **kw)


def test_prepare_out_dir_refuses_to_replace_a_run(tmp_path):
    out = tmp_path / "run"
    common.prepare_out_dir(_out_args(out))  # a new folder is fine
    (out / "last.pt").write_bytes(b"x")
    (out / "log.jsonl").write_text('{"type": "header"}\n')
    with pytest.raises(common.UsageError) as e:
        common.prepare_out_dir(_out_args(out))
    assert f"--resume {out / 'last.pt'}" in str(e.value) and "--overwrite" in str(e.value)
    args = _out_args(out)
    args.resume = str(out / "last.pt")
    common.prepare_out_dir(args)
    assert (out / "log.jsonl").is_file()  # a resumed run appends to its log
    args = _out_args(out)
    args.eval_only = True
    common.prepare_out_dir(args)
    assert (out / "log.jsonl").is_file()
    args = _out_args(out)
    args.overwrite = True
    common.prepare_out_dir(args)
    assert not (out / "log.jsonl").exists() and (out / "last.pt").is_file()  # replaced later


def test_prepare_out_dir_file_and_unwritable_paths_are_one_line(tmp_path):
    a_file = tmp_path / "results.txt"
    a_file.write_text("")
    with pytest.raises(common.UsageError, match="is a file, not a folder"):
        common.prepare_out_dir(_out_args(a_file))
    with pytest.raises(common.UsageError, match=r"cannot write to --out .* \(Not a directory\)"):
        common.prepare_out_dir(_out_args(a_file / "sub"))


def test_full_disk_while_saving_is_one_line_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    common.atomic_torch_save({"iter": 1}, path)

    def full_disk(obj, f, *a, **k):
        f.write(b"PK half")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter "
                           "failed writing file data/3: file write failed")  # fmt: skip

    monkeypatch.setattr(common.torch, "save", full_disk)
    with pytest.raises(common.CheckpointError) as e:
        common.atomic_torch_save({"iter": 2}, path)
    assert str(e.value) == (
        f"cannot write {path} (no space left on the device); the previous file, if any, is "
        "intact: free space or pass a writable --out"
    )
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"iter": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_resume_command_keeps_the_flags_and_swaps_resume(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["famix.py"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["--source", "gta", "--init", "w.pt", "--resume=old.pt", "--overwrite", "--lr", "0.1",
            "--resume", "older.pt", "--data", "my data"]  # fmt: skip
    assert common.resume_command(argv, "out/last.pt") == (
        "python famix.py --source gta --lr 0.1 --data 'my data' --resume out/last.pt"
    )
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert common.resume_command([], "o/last.pt").startswith("torchrun --nproc_per_node 4 famix.py")


def test_ctrl_c_says_where_it_stopped_and_how_to_continue(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["rein.py", "--source", "toy"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def main(argv):  # a training loop's Ctrl-C: common.Interrupted(done, iters, saved)
        raise common.Interrupted(37, 250, ("out/last.pt", 30))

    with pytest.raises(SystemExit) as e:
        common.run_cli(main)
    assert e.value.code == 130
    err = capsys.readouterr().err.strip()
    assert err == (
        "interrupted at iteration 37 of 250; out/last.pt holds iteration 30; continue with: "
        "python rein.py --source toy --resume out/last.pt"
    )

    def before_training(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as e:
        common.run_cli(before_training)
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert err == "interrupted; no checkpoint was written by this run: run the command again\n"


def test_check_resume_args_names_the_changed_flag():
    ckpt = {"args": {"backbone": "dinov2_s", "full_rank": False, "seed": 0}}
    args = argparse.Namespace(backbone="dinov2_s", full_rank=False, seed=3, resume="o/last.pt",
                              init="w.pt")  # fmt: skip
    common.check_resume_args(ckpt, args, ["backbone", "full_rank", "not_in_ckpt"])
    args.full_rank = True
    with pytest.raises(common.CheckpointError) as e:
        common.check_resume_args(ckpt, args, ["backbone", "full_rank"])
    assert str(e.value) == (
        "--resume o/last.pt was trained with --full-rank False, this run has --full-rank True; "
        "use the same value"
    )
    with pytest.raises(common.CheckpointError, match="^--init w.pt was trained with --full-rank"):
        common.check_resume_args(ckpt, args, ["full_rank"], given="--init")


def test_read_weights_file_errors_and_numpy_scalars(tmp_path):
    with pytest.raises(common.CheckpointError) as e:
        common.read_weights_file(tmp_path / "RN50.pt", "CLIP weight file", "pass --pretrained PATH")
    assert (
        str(e.value)
        == f"CLIP weight file not found: {tmp_path / 'RN50.pt'} (pass --pretrained PATH)"
    )
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"garbage, not a torch file")
    with pytest.raises(common.CheckpointError, match=r"cannot read weights .*junk.pth \("):
        common.read_weights_file(junk, "weights", "a .pth state dict")
    official = tmp_path / "official.pth"
    torch.save({"model_state": {"w": torch.ones(2)}, "best_score": np.float64(0.5)}, official)
    obj = common.read_weights_file(official, "weights", "")
    assert float(obj["best_score"]) == 0.5 and torch.equal(obj["model_state"]["w"], torch.ones(2))


def test_load_state_strict_names_what_does_not_fit():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert common.load_state_strict(model, state, "ckpt.pt", "check --backbone") == 4
    bad = dict(state)
    bad.pop("1.bias")
    bad["0.weight"] = torch.zeros(5, 3)
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(common.CheckpointError) as e:
        common.load_state_strict(model, bad, "ckpt.pt", "check --backbone")
    assert str(e.value) == (
        "ckpt.pt does not fit this model: 1 missing (e.g. ['1.bias']), 1 unexpected (e.g. "
        "['extra.weight']), 1 of another shape (e.g. ['0.weight']); check --backbone"
    )
    head_only = {k: v + 1 for k, v in state.items() if k.startswith("1.")}
    assert common.load_state_strict(model, head_only, "c", "h", may_lack=("0.",)) == 2
    assert torch.equal(model[1].bias, head_only["1.bias"])
    assert torch.equal(model[0].weight, state["0.weight"])


def test_rng_neutral_restores_every_stream():
    common.seed_everything(3)
    expect = (torch.rand(2), np.random.rand(2), random.random())
    common.seed_everything(3)
    with common.rng_neutral():
        torch.rand(5), np.random.rand(5), random.random()
    got = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(got[0], expect[0]) and np.array_equal(got[1], expect[1])
    assert got[2] == expect[2]


def test_divergence_is_one_line_with_iteration_terms_and_checkpoint():
    e = common.DivergenceError(812, ("out/last.pt", 750), {"loss": math.nan, "loss_ce": math.inf})
    assert str(e) == (
        "iteration 812: the loss is not finite (loss nan, loss_ce inf); training stopped, "
        "out/last.pt holds iteration 750; try a lower --lr or --no-amp"
    )
    e = common.DivergenceError(5, None, predictions=["pred_logits", "pred_masks"])
    assert str(e) == (
        "iteration 5: the predictions pred_logits, pred_masks are not finite; training stopped "
        "before the loss, no checkpoint was written by this run; try a lower --lr or --no-amp"
    )
    assert isinstance(e, common.UsageError)


def test_format_results_and_write_results_print_log_and_write_results(tmp_path, capsys):
    log = common.RunLog(tmp_path, {}, {})
    cm = common.ConfusionMatrix(19)
    cm.update(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]))
    results = {"toy-city": {"miou": round(cm.miou(), 4), "per_class_iou": cm.per_class()}}
    common.print0(common.format_results(results, 40))
    log.write_results(results, 40)
    out = capsys.readouterr().out
    assert out.startswith("iteration 40\ntarget") and "toy-city         50.00" in out
    assert "  toy-city: road 50.0, sidewalk 50.0" in out
    assert json.loads((tmp_path / "results.json").read_text()) == results
    record = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert record == {"type": "eval", "iter": 40, "results": results}


def test_benchmark_counts_flops_and_reports_throughput(capsys):
    layer = nn.Linear(256, 128)
    x = torch.randn(32, 256)

    def step():
        layer(x).sum().backward()

    record = common.benchmark("t/linear", step, device=torch.device("cpu"), warmup=1, steps=3,
                              images_per_step=8, extra={"batch": 8})  # fmt: skip
    # forward 2·32·256·128 multiply-adds; backward the same again for the weight gradient (the
    # input needs none)
    flops = 4 * 32 * 256 * 128
    assert common.count_flops(step) == flops
    assert record["gflop_per_step"] == pytest.approx(flops / 1e9, rel=1e-5)
    assert record["gflops"] == pytest.approx(flops / record["step_s"] / 1e9, rel=0.01)
    assert "mfu" not in record and record["peak_rss_mb"] > 0 and record["batch"] == 8
    assert json.loads(capsys.readouterr().out) == record


@pytest.mark.parametrize(
    "name, precision, peak",
    [
        ("NVIDIA H200", "bf16", 989.4),
        ("NVIDIA H100 PCIe", "tf32", 378.0),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A10", "fp32", 31.2),
        ("Tesla V100-SXM2-16GB", "tf32", 15.7),
        ("Some Future GPU", "bf16", None),
    ],
)
def test_peak_tflops_table(monkeypatch, name, precision, peak):
    monkeypatch.setattr(common.torch.cuda, "get_device_name", lambda device=None: name)
    assert common.peak_tflops(torch.device("cuda"), precision) == peak
    assert common.peak_tflops(torch.device("cuda"), precision, override=100.0) == 100.0
    assert common.peak_tflops(torch.device("cpu"), precision) is None


def test_offline_download_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(common.UsageError, match="cannot download RN50 weights: HF_HUB_OFFLINE=1;"):
        common.require_download("RN50 weights", "pass --pretrained /path/RN50.pt")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(common.UsageError, match="127.0.0.1 is not reachable; pass"):
        common.require_download("RN50 weights", "pass a file", host="127.0.0.1")
    assert common.open_clip_cached("RN50-quickgelu", "no-such-tag") is False
    with pytest.raises(common.UsageError) as e:
        common.require_open_clip_tag("RN50-quickgelu", "laion", "pass a file")
    assert str(e.value).startswith("--pretrained laion: not a file, not none, not an open_clip tag")
    assert "openai" in str(e.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hub-cache")
    with pytest.raises(
        common.UsageError, match=r"open_clip weights RN50-quickgelu / openai: HF_HUB"
    ):
        common.require_open_clip_tag("RN50-quickgelu", "openai", "pass a file")


def test_setup_warns_that_amp_does_nothing_on_cpu(capsys):
    args = argparse.Namespace(cpu_threads=0, device="cpu", amp=True, tf32=True, fast="auto",
                              seed=0)  # fmt: skip
    dist = common.setup(args)
    assert dist.device.type == "cpu" and not common.fast_path(args, dist)
    assert (
        capsys.readouterr().err
        == "warning: --amp has no effect on CPU: this run computes in fp32\n"
    )
    args.fast = "on"
    assert common.memory_format(args, dist) == torch.channels_last
    assert common.optimizer_options(args, dist, "adamw") == {"fused": True}
    assert common.optimizer_options(args, dist, "sgd") == {"foreach": True}
    args.fast = "off"
    assert common.optimizer_options(args, dist, "sgd") == {}


# =============================================================================================
# The three method files share one layout
# =============================================================================================

METHOD_FILES = ("famix.py", "rein.py", "clouds.py")
SECTIONS = ["1. The method", "2. Model", "3. Data and augmentation", "4. Training",
            "5. Evaluation", "6. Command line and main"]  # fmt: skip
APPENDIX_A = {"famix.py": "Appendix A: CLIP ResNet + DeepLabv3+"}  # rein, clouds: Mask2Former
APPENDICES = ["Appendix B: Official weights", "Appendix C: Benchmark"]
BANNER = "# " + "=" * 93


def _banners(lines: list[str]) -> list[tuple[int, str]]:
    """(line number of the banner's first rule, title) of every section banner."""
    return [(i, lines[i + 1][2:]) for i in range(len(lines) - 2)
            if lines[i] == BANNER and lines[i + 2] == BANNER]  # fmt: skip


def _train_lines(name: str) -> list[str]:
    """The lines of the file's `train`: from `def train(` to its `return results` (excluded), or
    to the next top-level statement."""
    lines = (REPO / name).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("def train("))
    ends = ("", " ", ")")  # a top-level statement starts with none of these
    end = next(i for i in range(start + 1, len(lines))
               if lines[i] == "    return results" or lines[i][:1] not in ends)  # fmt: skip
    return lines[start:end]


def _tagged_blocks(lines: list[str]) -> list[tuple[str, list[str]]]:
    """("PLUMBING" or "METHOD", [tag line, the lines up to the next tag]) of a `train`."""
    blocks = []
    for line in lines:
        tag = next((t for t in ("PLUMBING", "METHOD") if f"# {t}:" in line), None)
        if tag:
            blocks.append((tag, [line]))
        elif blocks:
            blocks[-1][1].append(line)
    return blocks


def _plumbing_blocks(lines: list[str]) -> list[list[str]]:
    """The `# PLUMBING:` blocks of `train`, stripped of indentation."""
    return [[x.strip() for x in block] for tag, block in _tagged_blocks(lines) if tag == "PLUMBING"]


@pytest.mark.parametrize("name", METHOD_FILES)
def test_method_file_skeleton(name):
    lines = (REPO / name).read_text().splitlines()
    titles = [title for _, title in _banners(lines)]
    appendix_a = APPENDIX_A.get(name, "Appendix A: Mask2Former")
    assert titles == [*SECTIONS, appendix_a, *APPENDICES]
    starts = dict((title, i + 1) for i, title in _banners(lines))
    first = next(i for i in range(starts[SECTIONS[0]], len(lines))
                 if lines[i].startswith(("def ", "class ")))  # fmt: skip
    assert first + 1 < 300, f"the method's first component starts at line {first + 1}"
    assert starts[appendix_a] - 1 <= 1000, "main body over 1,000 lines"
    assert lines[-1] == "    common.run_cli(main)" and lines[-2] == 'if __name__ == "__main__":'
    text = "\n".join(lines)
    for working_note in ("spec \u00a7", "STYLE \u00a7", "trap "):  # documents not in the repo
        assert working_note not in text
    docstring, code = text.split('"""')[1], '"""'.join(text.split('"""')[2:])
    numbered = re.findall(r"DEVIATION (\d+):", code)  # one marker syntax, numbered as listed
    listed = re.findall(r"^ {1,2}(\d+)\. ", docstring, flags=re.M)
    assert numbered and set(numbered) <= set(listed) and code.count("DEVIATION") == len(numbered)


def test_plumbing_blocks_of_the_training_loops_are_one_text():
    """Seven `# PLUMBING:` blocks and the `except KeyboardInterrupt:  # PLUMBING:` one, each the
    same text in the three files (the METHOD blocks between them are the methods' own)."""
    blocks = {n: _plumbing_blocks(_train_lines(n)) for n in METHOD_FILES}
    for name, bs in blocks.items():
        tags = [b[0] for b in bs]
        assert len(tags) == 8 and all(t.startswith("# PLUMBING: ") for t in tags[:7]), name
        assert tags[7].startswith("except KeyboardInterrupt:  # PLUMBING: "), name
    for name in METHOD_FILES[1:]:
        for k, block in enumerate(blocks[name]):
            assert block == blocks["famix.py"][k], (name, block)


def _plumbing_loop(name: str):
    """The file's `train` with each run of METHOD blocks replaced by a stand-in: `lr, loss,
    terms = step(it, batch)` after the next batch, `results = evaluate(done)` before the table
    (the only METHOD names the PLUMBING blocks read), nothing elsewhere."""
    stand_ins = {2: "lr, loss, terms = step(it, batch)", 6: "results = evaluate(done)"}
    code = ["def train(args, dist, log, model, optimizer, scaler, loader, start, save_checkpoint,"
            " step, evaluate):"]  # fmt: skip
    plumbing = 0
    for tag, block in _tagged_blocks(_train_lines(name)):
        if tag == "PLUMBING":
            plumbing += 1
            code += block
        elif plumbing in stand_ins:
            indent = block[0][: len(block[0]) - len(block[0].lstrip())]
            code.append(indent + stand_ins.pop(plumbing))
    namespace = {"common": common, "math": math, "time": __import__("time"), "Path": Path,
                 "tqdm": __import__("tqdm").tqdm}  # fmt: skip
    exec("\n".join([*code, "    return results"]), namespace)
    return namespace["train"]


@pytest.mark.parametrize("name", METHOD_FILES)
def test_plumbing_blocks_schedule_log_stop_and_interrupt(name, tmp_path, capsys):
    """The PLUMBING text of each `train`, run with stand-ins: evaluations (and checkpoints) every
    --eval-every and at the end, `train` records every --log-every and at the end, the table,
    `eval` records and results.json; a non-finite loss stops before the step; Ctrl-C says where."""
    train = _plumbing_loop(name)

    def run(iters=10, eval_every=4, log_every=3, values=None, stop_at=None):
        torch.manual_seed(0)
        model = nn.Linear(1, 1, bias=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        args = argparse.Namespace(iters=iters, eval_every=eval_every, log_every=log_every,
                                  out=str(tmp_path))  # fmt: skip
        log = common.RunLog(tmp_path, args, {})
        saved, evaluated = [], []

        def save_checkpoint(args, done, model, optimizer, scaler):
            saved.append((done, model.weight.item()))

        def step(it, batch):
            if it == stop_at:
                raise KeyboardInterrupt
            loss = (model.weight * batch).sum()
            value = float(it + 1) if values is None else values[it]
            return 0.1, loss, {"loss": value, "loss_ce": 0.5}

        def evaluate(done):
            evaluated.append(done)
            return {"toy-city": {"miou": float(done), "per_class_iou": {"road": float(done)}}}

        loader = iter([torch.ones(1)] * iters)
        train(args, common.Dist(), log, model, optimizer, None, loader, 0, save_checkpoint, step,
              evaluate)  # fmt: skip
        records = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
        return saved, evaluated, records, model

    saved, evaluated, records, _ = run()
    assert evaluated == [4, 8, 10] and [done for done, _ in saved] == [4, 8, 10]
    train_records = [r for r in records if r["type"] == "train"]
    assert [r["iter"] for r in train_records] == [3, 6, 9, 10]
    assert [r["loss"] for r in train_records] == [3.0, 6.0, 9.0, 10.0]
    assert all(r["loss_ce"] == 0.5 and r["lr"] == 0.1 and r["time_s"] >= 0 for r in train_records)
    assert [r["iter"] for r in records if r["type"] == "eval"] == [4, 8, 10]
    assert json.loads((tmp_path / "results.json").read_text())["toy-city"]["miou"] == 10.0
    out = capsys.readouterr().out
    assert out.startswith("iteration 4\ntarget") and "  toy-city: road 8.0" in out
    assert run(eval_every=0)[1] == [10]

    nan = [1.0] * 6 + [math.nan] * 4
    with pytest.raises(common.DivergenceError) as e:
        run(values=nan)
    assert str(e.value) == (
        f"iteration 7: the loss is not finite (loss nan, loss_ce 0.5); training stopped, "
        f"{tmp_path / 'last.pt'} holds iteration 4; try a lower --lr or --no-amp"
    )
    with pytest.raises(common.Interrupted) as e:
        run(stop_at=5)
    assert (e.value.done, e.value.iters, e.value.saved) == (5, 10, (tmp_path / "last.pt", 4))
    with pytest.raises(common.Interrupted) as e:
        run(stop_at=2)
    assert (e.value.done, e.value.saved) == (2, None)


def _top_of(name: str) -> str:
    """The file's text above the banner of section 3 (docstring, imports, sections 1 and 2)."""
    lines = (REPO / name).read_text().splitlines()
    return "\n".join(lines[: next(i for i, title in _banners(lines) if title.startswith("3. "))])


@pytest.mark.parametrize("name", METHOD_FILES)
def test_sections_1_and_2_use_no_name_of_common(name):
    tree = ast.parse(_top_of(name))
    used = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "common"]  # fmt: skip
    assert not used, f"{name} uses {sorted(set(used))} above section 3"
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "common"]


@pytest.mark.parametrize("name", [*METHOD_FILES, "common.py"])
def test_no_method_file_imports_tools(name):
    tree = ast.parse((REPO / name).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "tools" not in imported


def test_common_has_no_module_level_mutable_state():
    """No `global`, and no function writes into a name common.py defines at module level
    (NAME[...] = ..., NAME.x = ..., NAME.append(...)): every state lives in an object a caller
    holds, or in torch / torch.distributed."""
    tree = ast.parse((REPO / "common.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Global, ast.Nonlocal))]
    module_names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                module_names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    mutators = {"append", "extend", "insert", "update", "setdefault", "pop", "popitem", "clear",
                "add", "discard", "remove", "__setitem__"}  # fmt: skip

    def base(node: ast.AST) -> str | None:  # the name an attribute / subscript chain starts at
        while isinstance(node, (ast.Attribute, ast.Subscript)):
            node = node.value
        return node.id if isinstance(node, ast.Name) else None

    writes = []
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.Lambda)):
            continue
        local = {a.arg for a in ast.walk(func.args) if isinstance(a, ast.arg)}
        local |= {n.id for n in ast.walk(func) if isinstance(n, ast.Name)
                  and isinstance(n.ctx, ast.Store)}  # fmt: skip
        for node in ast.walk(func):
            targets = []
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
                targets = getattr(node, "targets", None) or [node.target]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in mutators:
                targets = [node.func.value]
            for target in targets:
                for sub in ast.walk(target):
                    if isinstance(sub, (ast.Attribute, ast.Subscript)) or sub is target:
                        name = base(sub)
                        if name in module_names and name not in local:
                            writes.append(f"line {node.lineno}: {ast.unparse(node)[:60]}")
    assert not writes, sorted(set(writes))


# =============================================================================================
# GPU (skipped without CUDA)
# =============================================================================================


@pytest.mark.gpu
def test_gpu_confusion_matrix_and_autocast_match_cpu():
    device = torch.device("cuda")
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 19, 1)
    image = torch.randn(1, 3, 37, 53)
    with torch.no_grad():
        cpu, gpu = conv(image), conv.to(device)(image.to(device))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
    label = torch.randint(0, 19, (37, 53))
    label[:5] = 255
    a, b = common.ConfusionMatrix(19), common.ConfusionMatrix(19, device)
    a.update(cpu.argmax(1), label)
    b.update(gpu.argmax(1), label.to(device))
    assert torch.equal(a.mat, b.mat.cpu())
    ctx, _ = common.autocast(device, True)
    with ctx():
        assert torch.mm(torch.ones(2, 2, device=device), torch.ones(2, 2, device=device)).dtype in (
            torch.bfloat16,
            torch.float16,
        )


# =============================================================================================
# Several processes: per-sample draws, the global loss, labels that decode to nothing
# =============================================================================================


def test_step_generators_depend_on_the_sample_not_the_process():
    one = common.Dist(world_size=1)
    draws = [torch.rand(3, generator=g) for g in common.step_generators(5, 7, 4, one)]
    halves = [common.Dist(rank=rank, world_size=2) for rank in (0, 1)]
    split = [torch.rand(3, generator=g) for d in halves for g in common.step_generators(5, 7, 4, d)]
    assert len(draws) == 4 and all(torch.equal(a, b) for a, b in zip(draws, split))
    assert len({tuple(d.tolist()) for d in draws}) == 4  # every sample its own stream
    other = [torch.rand(3, generator=g) for g in common.step_generators(5, 8, 4, one)]
    assert not any(torch.equal(a, b) for a, b in zip(draws, other))  # and every iteration


def test_global_mean_in_one_process_is_the_identity():
    terms = {"loss": 1.5, "loss_ce": 0.25}
    assert common.global_mean(terms, common.Dist()) == terms


def test_check_labels_names_dataset_file_and_the_expected_encoding(make_tree):
    import conftest

    tree = make_tree("gta5")
    dataset = common.GTA5(tree.root, "train", sizes="off")
    common.check_labels(dataset)  # the real encoding: fine
    for _, label in dataset.pairs:  # trainIds (1 = sidewalk) where labelIds are expected
        conftest.write_palette_png(label, np.full((32, 64), 1, np.uint8))
    with pytest.raises(common.DataFileError) as e:
        common.check_labels(common.GTA5(tree.root, "train", sizes="off"))
    first = common.GTA5(tree.root, "train", sizes="off").pairs[0][1]
    assert str(e.value) == (
        f"gta: the first {len(dataset.pairs)} label files (e.g. {first}) hold no pixel of the "
        "19 classes once decoded; the reader expects palette PNGs whose index is the Cityscapes "
        "labelId (7 = road, 26 = car): check that the labels are the original files"
    )
