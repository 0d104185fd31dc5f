"""Tests of tools.py, the commands around the method files: make-toy, demo, check-data (against
the official split sizes: missing, orphan, corrupt and mismatched files), compare (tables and
compare.png), bench-table; their parser (one-line errors in every subcommand) and exit codes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import common
import tools


def _truncate(path: Path, keep: int = 60) -> None:
    path.write_bytes(path.read_bytes()[:keep])


# =============================================================================================
# `python tools.py ...` as a user runs it
# =============================================================================================


def test_every_subcommand_parser_gives_one_line_errors(run_script, capsys):
    """add_subparsers makes parsers of the main parser's class: common.Parser, one-line errors."""
    parser = tools.build_parser()
    assert isinstance(parser, common.Parser)
    for argv in (["make-toy", "--data"], ["demo", "--data"], ["bench", "--data"], ["bench-table"],
                 ["check-data", "--data"], ["compare"]):  # fmt: skip
        with pytest.raises(SystemExit) as e:  # an error of the subcommand's own parser
            parser.parse_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
        assert err.endswith(f" {argv[0]} --help)\n"), err
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--steps", "0"])
    err = capsys.readouterr().err
    assert err.startswith("error: argument --steps: must be >= 1, got 0 (see ")
    r = run_script("tools.py", "lint")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "invalid choice: 'lint'" in r.stderr


def test_demo_subprocess_prints_table(run_script, toy_data):
    """`make demo`'s fallback path: readers -> augmentation -> tiny net -> mIoU on toy targets."""
    run = run_script("tools.py", "demo", "--data", toy_data, "--iters", "5")
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1:] for line in run.stdout.splitlines() if line.strip()}
    for name in ("toy", "toy-city", "toy-fog", "toy-night", "mean"):
        assert name in rows, run.stdout
        assert 0.0 <= float(rows[name][0]) <= 100.0
    assert "parameters" in run.stdout


def test_make_toy_bad_path_one_line(tmp_path, monkeypatch, capsys):
    """`python tools.py make-toy --data <a file>` (the __main__ block is run_cli(main))."""
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    monkeypatch.setattr(sys, "argv", ["tools.py", "make-toy", "--data", str(not_a_dir)])
    with pytest.raises(SystemExit) as e:
        common.run_cli(tools.main)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert str(not_a_dir) in err


# =============================================================================================
# check-data
# =============================================================================================


def test_check_data_on_complete_toy_data_exits_0(toy_data, capsys):
    assert tools.check_data(toy_data, decode=True, workers=2) == 0
    out = capsys.readouterr().out
    rows = {tuple(line.split()[:2]): line.split() for line in out.splitlines()}
    assert rows[("toy", "train")][-3:] == ["240", "240", "240"]  # images, labels, expected
    assert rows[("toy-night", "val")][-3:] == ["48", "48", "48"]
    assert "decoded 432 image/label pairs: 0 unreadable, 0 of different sizes, 0 labels" in out
    assert out.rstrip().endswith("all datasets look complete")


def test_check_data_finds_missing_orphan_corrupt_and_mismatched_files(tmp_path, capsys):
    import conftest

    root = tmp_path / "data"
    cs = conftest.WRITERS["cityscapes"](root / "cityscapes")
    gta = conftest.WRITERS["gta5"](root / "gta5")
    # an orphan label, a corrupt image, a val label of another size
    orphan = (
        cs.root / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000999_gtFine_labelIds.png"
    )
    Image.fromarray(np.zeros((32, 64), np.uint8)).save(orphan)
    corrupt = cs.root / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png"
    _truncate(corrupt)
    small = cs.root / "gtFine" / "val" / "lindau" / "lindau_000001_000019_gtFine_labelTrainIds.png"
    Image.fromarray(np.zeros((16, 64), np.uint8)).save(small)
    (gta.root / "labels" / "15188.png").unlink()  # an image without its label (not in CLOUDS')
    assert tools.check_data(root, decode=True, workers=2) == 1
    out = capsys.readouterr().out
    table = {tuple(line.split()[:2]): line.split() for line in out.splitlines()}
    assert table[("cityscapes", "(all")][-2:] == ["0", "1"]  # no image for the orphan label
    assert table[("gta5", "(all")][-2:] == ["1", "0"]  # no label for 15188
    assert table[("cityscapes", "val")][-3:] == ["2", "2", "500"]
    assert f"problem: cityscapes: label without an image: {orphan}" in out
    assert f"problem: gta: image {gta.root / 'images' / '15188.png'} has no label" in out
    assert f"problem: cannot read image {corrupt} (" in out
    lindau = cs.root / "leftImg8bit" / "val" / "lindau" / "lindau_000001_000019_leftImg8bit.png"
    assert f"problem: error: image and label sizes differ: {lindau} / {small}" in out
    assert "note (skipped in training): image and label sizes differ" in out  # GTA5's 00003
    assert "problem: cityscapes val: 2 images, the official split has 500" in out


def test_check_data_decode_finds_labels_in_another_encoding(tmp_path, capsys):
    import conftest

    gta = conftest.WRITERS["gta5"](tmp_path / "data" / "gta5")
    # trainIds written where labelIds are expected: 0 (road) and 13 (car) are void labelIds
    for name in ("00001", "00002"):
        label = gta.root / "labels" / f"{name}.png"
        conftest.write_palette_png(label, np.where(gta.labels[name] == 255, 0, 2))
    assert tools.check_data(tmp_path / "data", decode=True, workers=2) == 1
    out = capsys.readouterr().out
    assert "labels with no class pixel" in out and ", 2 labels with no class pixel" in out
    line = next(x for x in out.splitlines() if "hold no pixel" in x)
    assert line.startswith("problem: gta: 2 label files hold no pixel of the 19 classes (e.g. ")
    assert line.endswith(common.LABEL_ENCODINGS["gta"])


def test_check_data_command_exit_code_and_bad_root(run_script, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_script("tools.py", "check-data", "--data", empty)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no dataset folder" in r.stderr
    r = run_script("tools.py", "check-data", "--data", tmp_path / "nope")
    assert r.returncode == 2 and "is not a folder" in r.stderr and "Traceback" not in r.stderr


# =============================================================================================
# compare: runs side by side
# =============================================================================================


def _fake_run(path, script, args, results):
    path.mkdir(parents=True)
    header = {"type": "header", "script": script, "args": args}
    (path / "log.jsonl").write_text(json.dumps(header) + "\n" + json.dumps({"type": "eval"}))
    (path / "results.json").write_text(json.dumps(results))
    return path


def _result(miou, ious):
    per_class = dict.fromkeys(common.CLASS_NAMES)
    per_class.update(ious)
    return {"miou": miou, "per_class_iou": per_class}


def test_compare_runs_tables_and_picture(tmp_path, capsys):
    famix = {"backbone": "test", "source": "toy", "style": "famix"}
    runs = [
        _fake_run(tmp_path / "a", "famix", famix, {
            "source-val": _result(90.0, {"road": 99.0}),
            "toy-city": _result(20.0, {"road": 30.0, "sky": 10.0}),
            "toy-fog": _result(30.0, {"road": 50.0, "sky": None}),
        }),
        _fake_run(tmp_path / "b", "famix", {**famix, "style": "none"}, {
            "toy-city": _result(10.0, {"road": 20.0, "sky": 0.0}),
        }),
        _fake_run(tmp_path / "c", "rein", {"backbone": "dinov2_s", "source": "toy"}, {
            "toy-fog": _result(40.5, {"road": 40.0, "sky": 41.0}),
        }),
        _fake_run(tmp_path / "d", "rein", {"backbone": "dinov2_s", "source": "toy", "lr": 1}, {
            "toy-fog": _result(1.0, {"road": 1.0}),
        }),
    ]  # fmt: skip
    table = tools.compare_runs(runs, tmp_path / "cmp")
    assert table == capsys.readouterr().out.split("wrote")[0].rstrip("\n")
    lines = table.splitlines()
    assert lines[0] == "| run | toy-city | toy-fog | mean |"  # source-val left out
    assert lines[2] == "| famix test toy style=famix | 20.00 | 30.00 | 25.00 |"
    assert lines[3] == "| famix test toy style=none | 10.00 | - | 10.00 |"
    assert lines[4] == "| rein dinov2_s toy (c) | - | 40.50 | 40.50 |"  # alike: folder names
    assert lines[5] == "| rein dinov2_s toy (d) | - | 1.00 | 1.00 |"
    assert "| road | 40.00 | 20.00 | 40.00 | 1.00 |" in lines  # mean over the run's targets
    assert "| sky | 10.00 | 0.00 | 41.00 | - |" in lines
    assert not any(line.startswith("| car |") for line in lines)  # no run scores it
    with Image.open(tmp_path / "cmp" / "compare.png") as im:
        assert im.format == "PNG" and im.size[0] >= 800 and im.size[1] == 800


def test_compare_needs_results(run_script, tmp_path):
    (tmp_path / "empty").mkdir()
    r = run_script("tools.py", "compare", tmp_path / "empty")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "holds no readable results.json" in r.stderr


# =============================================================================================
# bench-table
# =============================================================================================


def test_bench_table_reads_the_records_of_bench_lines(tmp_path, capsys):
    record = {"bench": "t/linear", "device": "cpu", "precision": "fp32", "step_s": 0.01,
              "images_per_s": 800.0, "steps": 3, "peak_rss_mb": 512.0, "gflop_per_step": 0.008,
              "gflops": 0.8}  # fmt: skip
    table = tools.bench_table([record])
    assert table.splitlines()[0].startswith("| bench | device | precision | step s |")
    assert "| t/linear | cpu | fp32 |" in table
    assert table.splitlines()[2] == (
        "| t/linear | cpu | fp32 | 0.0100 | 800.00 | 0.008 | 0.001 | - | 512.0 |"
    )
    lines = tmp_path / "bench.jsonl"
    lines.write_text("a log line\n" + json.dumps(record) + "\n" + json.dumps({"x": 1}) + "\n")
    assert tools.read_bench_records([lines]) == [record]
    tools.main(["bench-table", str(lines)])
    assert capsys.readouterr().out.strip() == table
