"""A build that never hangs nor looks complete when it is not, bounded parsers, a pixel budget:
a dead build worker ends the build in one line naming what it held; over-long and deeply nested
lines are counted skips; data_params.json is removed first and written last, and readers refuse
files it does not describe; damaged HDF5 files, nested JSON and YAML alias bombs are one line;
a picture over the pixel budget is skipped from its header, before decoding."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from mmloom.cli.main import main
from mmloom.data.hdf5_dataset import HDF5LlavaDataset
from mmloom.errors import MmloomError
from test_train_loop import make_data, train_args


def record(i: int, image: str | None = None, answer: str | None = None) -> dict:
    rec = {"id": str(i), "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + "Describe."},
                                           {"from": "gpt", "value": answer or f"Answer {i}."}]}
    if image:
        rec["image"] = image
    return rec


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("faults_data"), n=8)


def build_config(data: Path, root: Path, lines: list[str], **setup) -> Path:
    """A phase-1 build config over `lines` (jsonl) into root/h5."""
    cfg = yaml.safe_load((data / "phase1_build.yaml").read_text())
    (root / "in").mkdir(parents=True, exist_ok=True)
    (root / "in" / "part0.jsonl").write_text("".join(line + "\n" for line in lines))
    cfg["setup"].update(input_dir=str(root / "in"), output_dir=str(root / "h5"), samples_per_file=4, **setup)
    (root / "build.yaml").write_text(yaml.safe_dump(cfg))
    return root / "build.yaml"


def good_lines(n: int = 12) -> list[str]:
    return [json.dumps(record(i, f"img{i % 8}.png")) for i in range(n)]


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------- build workers
def test_a_dead_worker_ends_the_build_naming_what_it_held(data, tmp_path, capsys, monkeypatch):
    from mmloom.data import build

    lines = good_lines()
    lines[5] = json.dumps(record(5, "img5.png", answer="KILL THIS WORKER"))
    cfg = build_config(data, tmp_path, lines, processes=2)
    original = build._process_chunk

    def process_chunk(chunk):  # the OOM killer, as the worker sees it
        if any("KILL THIS WORKER" in line for _, _, line in chunk if isinstance(line, str)):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(chunk)

    monkeypatch.setattr(build, "_process_chunk", process_chunk)  # forked workers inherit it
    monkeypatch.setattr(build, "CHUNK_LINES", 4)
    signal.alarm(120)  # a hang fails the test instead of blocking it
    try:
        capsys.readouterr()
        start = time.monotonic()
        assert main(["data", "build", str(cfg), "--quiet"]) == 2
        assert time.monotonic() - start < 60
    finally:
        signal.alarm(0)
    err = one_line(capsys)
    assert "part0.jsonl lines 5-8" in err and "SIGKILL" in err and "nothing of it was kept" in err
    assert [p.name for p in (tmp_path / "h5").iterdir()] == []  # neither .h5 files nor data_params.json


@pytest.mark.parametrize("processes", [1, 2])
def test_over_long_and_deeply_nested_lines_are_counted_skips(data, tmp_path, processes):
    lines = good_lines(6)
    lines.insert(2, json.dumps(record(99, "img0.png", answer="x" * 3 * 2**20)))  # 3 MiB: over the 1 MiB limit
    lines.insert(4, "[" * 100_000 + "]" * 100_000)  # RecursionError in json.loads
    cfg = build_config(data, tmp_path, lines, processes=processes, max_record_bytes=2**20)
    assert main(["data", "build", str(cfg), "--quiet"]) == 0
    params = json.loads((tmp_path / "h5" / "data_params.json").read_text())["post-process"]
    assert params["skipped"] == {"bad_json": 1, "line_too_long": 1} and params["successful_files"] == 6


def test_bad_input_files_never_show_a_traceback(data, tmp_path, capsys):
    """score / generate question files and a data_params.json nested deeper than the parser goes."""
    nested = "[" * 100_000 + "]" * 100_000
    answers, refs = tmp_path / "a.jsonl", tmp_path / "r.jsonl"
    answers.write_text(nested + "\n")
    refs.write_text(json.dumps({"question_id": 1, "answer": "x"}) + "\n")
    capsys.readouterr()
    assert main(["score", str(answers), "--references", str(refs), "--metric", "exact"]) == 2
    assert "nested too deeply" in one_line(capsys)
    folder = tmp_path / "data"
    shutil.copytree(data / "phase1_h5", folder)
    (folder / "data_params.json").write_text('{"a": ' + nested + "}")
    with pytest.raises(MmloomError, match="nested too deeply"):
        HDF5LlavaDataset(folder, data / "images", None)


# --------------------------------------------------------------------- builds that look complete
def test_an_overwrite_build_killed_midway_is_refused_by_its_readers(data, tmp_path, capsys):
    cfg = build_config(data, tmp_path, good_lines(12))
    assert main(["data", "build", str(cfg), "--quiet"]) == 0
    assert len(list((tmp_path / "h5").glob("*.h5"))) == 3
    code = ("import os, signal, sys; from mmloom.data import build; flush = build._Writer._flush\n"
            "def dying(self, n):\n"
            "    if self.files: os.kill(os.getpid(), signal.SIGKILL)\n"
            "    flush(self, n)\n"
            "build._Writer._flush = dying\n"
            "from mmloom.cli.main import main; main(['data', 'build', sys.argv[1], '--quiet', '--overwrite'])")
    proc = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    names = sorted(p.name for p in (tmp_path / "h5").iterdir() if not p.name.startswith("."))
    assert names == ["data-00000.h5"]  # the old data_params.json went first
    capsys.readouterr()
    args = train_args(data, 1, tmp_path / "run", "runconfig.max_steps=1", f"train_input.data_dir={tmp_path / 'h5'}",
                      f"eval_input.data_dir={tmp_path / 'h5'}")
    assert main(args) == 2
    assert "data_params.json" in one_line(capsys)
    assert main(["data", "inspect", str(tmp_path / "h5" / "data-00000.h5")]) == 2
    assert "the build did not finish" in one_line(capsys)
    with pytest.raises(MmloomError, match="the build did not finish"):
        HDF5LlavaDataset(tmp_path / "h5", data / "images", None)
    assert main(["data", "build", str(cfg), "--quiet"]) == 2  # an unfinished build: only with --overwrite
    assert "--overwrite" in one_line(capsys)
    assert main(["data", "build", str(cfg), "--quiet", "--overwrite"]) == 0


def spoil(folder: Path, how: str, other: Path) -> str:
    params = json.loads((folder / "data_params.json").read_text())
    if how == "claims a million samples":
        params["post-process"]["n_examples"] = 10**6
        (folder / "data_params.json").write_text(json.dumps(params))
        return "records 1000000 samples"
    if how == "a file missing":
        (folder / "data-00001.h5").unlink()
        return "missing data-00001.h5"
    if how == "a file added":
        shutil.copy(folder / "data-00000.h5", folder / "data-00009.h5")
        return "not listed: data-00009.h5"
    if how == "a file replaced":  # by another build's file of the same name
        shutil.copy(other / "data-00000.h5", folder / "data-00000.h5")
        return "is not the file"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["claims a million samples", "a file missing", "a file added", "a file replaced"])
def test_data_params_must_describe_the_files(data, tmp_path, capsys, how):
    folder = tmp_path / "h5"
    assert main(["data", "build", str(build_config(data, tmp_path, good_lines(12))), "--quiet"]) == 0  # 3 files
    words = spoil(folder, how, data / "phase1_h5")
    with pytest.raises(MmloomError, match=words):
        HDF5LlavaDataset(folder, data / "images", None)
    capsys.readouterr()
    assert main(["data", "inspect", str(folder / "data-00000.h5")]) == 2
    assert words in one_line(capsys)
    args = train_args(data, 1, tmp_path / "run", "runconfig.max_steps=1", f"train_input.data_dir={folder}",
                      f"eval_input.data_dir={folder}")
    assert main(args) == 2
    assert words in one_line(capsys)


# ---------------------------------------------------------------------------- damaged HDF5 files
def damage(path: Path, how: str) -> None:
    with h5py.File(path, "r+") as f:
        if how == "no img_path":
            del f["img_path"]
        elif how == "3 rows":
            rows = f["data"][:, :3]
            del f["data"]
            f.create_dataset("data", data=rows)
        elif how == "ids past the vocabulary":
            rows = f["data"][:]
            rows[1, 0, 5] = 10**6
            f["data"][...] = rows
    if how == "ids past the vocabulary":  # damaged in place: data_params.json still describes the file
        params = json.loads((path.parent / "data_params.json").read_text())
        params["post-process"]["output_file_info"][path.name]["bytes"] = path.stat().st_size
        (path.parent / "data_params.json").write_text(json.dumps(params))


@pytest.mark.parametrize(("how", "words"), [("no img_path", "dataset 'img_path' is missing"),
                                            ("3 rows", "dataset 'data' has shape (8, 3, 64)"),
                                            ("ids past the vocabulary", "token id 1000000")])
def test_damaged_hdf5_files_are_one_line(data, tmp_path, capsys, how, words):
    folder = tmp_path / "h5"
    shutil.copytree(data / "phase1_h5", folder)
    damage(folder / "data-00000.h5", how)
    args = train_args(data, 1, tmp_path / "run", "runconfig.max_steps=2", f"train_input.data_dir={folder}",
                      f"eval_input.data_dir={folder}", "train_input.shuffle=false")
    capsys.readouterr()
    assert main(args) == 2
    err = one_line(capsys)
    assert words in err and "data-00000.h5" in err


# ------------------------------------------------------------------------------------- YAML
def test_a_yaml_alias_bomb_is_refused_at_once_in_one_short_line(data, tmp_path, capsys):
    levels = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i, name in enumerate("bcdefgh"):
        prev = "abcdefgh"[i]
        levels.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    (tmp_path / "bomb.yaml").write_text("\n".join([*levels, "setup: *h", ""]))
    capsys.readouterr()
    start = time.monotonic()
    assert main(["data", "build", str(tmp_path / "bomb.yaml")]) == 2
    assert time.monotonic() - start < 10
    err = one_line(capsys)
    assert "aliases" in err and len(err) < 400
    # six levels stay under the node limit: the pydantic error quoting the value is cut short
    (tmp_path / "six.yaml").write_text("\n".join([*levels[:5], "setup: *e", "processor: *d", "dataset: *c", ""]))
    assert main(["data", "build", str(tmp_path / "six.yaml")]) == 2
    assert len(one_line(capsys)) < 2200


# ------------------------------------------------------------------------------ pixel budget
def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says `width` x `height` 16-bit RGB (its pixel data is a few bytes: decoding
    would need gigabytes, reading the header none)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_pictures_over_the_pixel_budget_are_skipped_from_their_header(data, tmp_path):
    from mmloom.processing.image import load_image
    from mmloom.processing.media_spec import MediaError

    images = tmp_path / "images"
    shutil.copytree(data / "images", images)
    png_header(images / "bomb.png", 9000, 9000)  # 81 Mpx: over the 67.1 Mpx default
    start = time.monotonic()
    with pytest.raises(MediaError, match="9000 x 9000") as info:
        load_image(images / "bomb.png")
    assert info.value.reason == "image_too_large"
    assert time.monotonic() - start < 1
    lines = [*good_lines(4), json.dumps(record(7, "bomb.png"))]
    cfg = build_config(data, tmp_path, lines)
    spec = yaml.safe_load(cfg.read_text())
    spec["dataset"]["image_dir"] = str(images)
    cfg.write_text(yaml.safe_dump(spec))
    assert main(["data", "build", str(cfg), "--quiet"]) == 0
    params = json.loads((tmp_path / "h5" / "data_params.json").read_text())
    assert params["post-process"]["skipped"] == {"image_too_large": 1}
    assert params["dataset"]["max_image_pixels"] == 8192 * 8192
    # a smaller budget in the config skips the 32 px pictures too, and training reads with it
    assert main(["data", "build", str(cfg), "--quiet", "--overwrite", "--set", "dataset.max_image_pixels=1000"]) == 2
    params = json.loads((tmp_path / "h5" / "data_params.json").read_text())
    assert params["post-process"]["skipped"] == {"image_too_large": 5}


def test_chat_refuses_a_picture_over_the_budget_in_one_line(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(data, 1, run, "runconfig.max_steps=1")) == 0
    bomb = png_header(tmp_path / "bomb.png", 9000, 9000)
    capsys.readouterr()
    assert main(["chat", str(run / "final_model"), "--image", str(bomb), "--prompt", "What is it?"]) == 2
    err = one_line(capsys)
    assert "bomb.png" in err and "Mpx" in err and "budget" in err


def test_the_checks_pass_a_sound_build(data):
    from mmloom.processing.image import ImageTransform

    dataset = HDF5LlavaDataset(data / "phase1_h5", data / "images", ImageTransform.from_config(None, 32))
    assert len(dataset) == 8 and dataset.vocab_size is not None
    rows = np.stack([dataset[i]["text_input_ids"].numpy() for i in range(len(dataset))])
    assert rows.max() < dataset.vocab_size
