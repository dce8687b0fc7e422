"""Nothing a user owns is replaced: every command that writes a folder or a file at a path the user
gives refuses one that exists and is not its own earlier output (or holds / lies inside the source),
in one line, leaving it byte for byte; --overwrite replaces only the command's own output, atomically.
Everything mmloom writes follows the process umask. (The shared case export-overwrites-destination.)"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from mmloom.cli.main import main
from test_train_loop import make_data, train_args


def snapshot(path: Path) -> dict:
    """{relative path: "dir" | sha256} of everything at `path` ({"": sha} for a file, {} if absent)."""
    def digest(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()

    if path.is_file():
        return {"": digest(path)}
    if not path.is_dir():
        return {}
    return {str(p.relative_to(path)): "dir" if p.is_dir() else digest(p) for p in sorted(path.rglob("*"))}


def refused(capsys, code: int, *words: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err
    return err


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("dest_data"), n=8)


@pytest.fixture(scope="module")
def lora_run(data, tmp_path_factory) -> Path:
    """A LoRA run of 2 steps (a checkpoint at each) with its final_model."""
    run = tmp_path_factory.mktemp("dest_runs") / "lora"
    assert main(train_args(data, 2, run, "runconfig.checkpoint_path=null", "runconfig.max_steps=2",
                           "runconfig.checkpoint_steps=1", "model.lora={r: 4, alpha: 8, dropout: 0.0}")) == 0
    return run


def convert(src: Path, dst: Path, *extra: str, to: str = "hf-llava") -> int:
    return main(["convert", "--from", "mmloom", "--to", to, str(src), str(dst), *extra])


# ------------------------------------------------------------------ the shared case, as a test
def test_exports_onto_what_the_user_owns_are_refused(lora_run, tmp_path, capsys):
    model = lora_run / "final_model"
    assert convert(model, tmp_path / "fresh") == 0  # control: a new folder
    assert (tmp_path / "fresh" / "config.json").is_file()

    important = tmp_path / "important"
    (important / "sub").mkdir(parents=True)
    (important / "notes.txt").write_text("my notes: do not lose\n")
    (important / "sub" / "data.bin").write_bytes(bytes(range(256)) * 8)
    before = snapshot(important)
    capsys.readouterr()
    refused(capsys, convert(model, important), "exists and holds files", "notes.txt")
    assert snapshot(important) == before

    precious = tmp_path / "precious.txt"
    precious.write_text("a file the user keeps\n")
    refused(capsys, main(["merge-lora", str(lora_run), str(precious)]), "is an existing file")
    assert precious.read_text() == "a file the user keeps\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".precious")] == []

    before = snapshot(lora_run)
    refused(capsys, convert(model, lora_run), "contains the source")
    assert snapshot(lora_run) == before


@pytest.mark.parametrize("where", ["inside the source", "the source"])
def test_a_destination_inside_the_source_is_refused(lora_run, capsys, where):
    model = lora_run / "final_model"
    dst = model / "export" if where == "inside the source" else model
    before = snapshot(model)
    capsys.readouterr()
    refused(capsys, convert(model, dst), "the source")
    refused(capsys, main(["merge-lora", str(lora_run), str(lora_run / "merged")]), "lies inside the source")
    assert snapshot(model) == before and not (lora_run / "merged").exists()


def test_overwrite_replaces_only_the_commands_own_output(lora_run, tmp_path, capsys):
    model, dst = lora_run / "final_model", tmp_path / "export"
    assert convert(model, dst) == 0
    first = snapshot(dst)
    assert ".mmloom-output.json" in first  # the marker a later --overwrite recognises
    capsys.readouterr()
    refused(capsys, convert(model, dst), "earlier output of `mmloom convert`", "--overwrite")
    assert snapshot(dst) == first
    assert convert(model, dst, "--overwrite") == 0
    assert snapshot(dst) == first  # the same export again, swapped in whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]  # nothing left beside it

    # merge-lora's own output is replaced with --overwrite; convert's is not merge-lora's
    merged = tmp_path / "merged"
    assert main(["merge-lora", str(lora_run), str(merged)]) == 0
    assert main(["merge-lora", str(lora_run), str(merged), "--overwrite"]) == 0
    capsys.readouterr()
    refused(capsys, main(["merge-lora", str(lora_run), str(dst), "--overwrite"]), "did not write")
    assert snapshot(dst) == first
    # --overwrite never replaces a folder of the user's
    users = tmp_path / "users"
    users.mkdir()
    (users / "a.txt").write_text("x")
    refused(capsys, convert(model, users, "--overwrite"), "did not write")
    refused(capsys, main(["init", "--image-model", str(lora_run), "--text-model", str(lora_run),
                          "--out", str(users), "--overwrite"]), "did not write")
    assert (users / "a.txt").read_text() == "x" and len(list(users.iterdir())) == 1


def test_an_empty_folder_is_written(lora_run, tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["merge-lora", str(lora_run), str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "config.json").is_file()


def test_plot_and_score_outputs(lora_run, tmp_path, capsys):
    out = tmp_path / "plots"
    out.mkdir()
    (out / "loss.png").write_bytes(b"my own figure")
    capsys.readouterr()
    refused(capsys, main(["plot", str(lora_run), "--out", str(out), "--overwrite"]), "loss.png")
    assert (out / "loss.png").read_bytes() == b"my own figure" and not (out / "lr.png").exists()
    (out / "loss.png").unlink()
    assert main(["plot", str(lora_run), "--out", str(out)]) == 0
    refused(capsys, main(["plot", str(lora_run), "--out", str(out)]), "earlier output of `mmloom plot`")
    assert main(["plot", str(lora_run), "--out", str(out), "--overwrite"]) == 0

    answers, refs, scores = tmp_path / "a.jsonl", tmp_path / "r.jsonl", tmp_path / "s.json"
    answers.write_text(json.dumps({"question_id": 1, "text": "yes"}) + "\n")
    refs.write_text(json.dumps({"question_id": 1, "answer": "yes"}) + "\n")
    scores.write_text("{\"mine\": 1}\n")
    args = ["score", str(answers), "--references", str(refs), "--metric", "exact", "--output-json", str(scores)]
    capsys.readouterr()
    refused(capsys, main([*args, "--overwrite"]), "s.json")
    assert scores.read_text() == "{\"mine\": 1}\n"
    scores.unlink()
    assert main(args) == 0 and main([*args, "--overwrite"]) == 0
    assert json.loads(scores.read_text())["overall"]["accuracy"] == 1.0


def test_data_build_into_a_folder_of_the_users_is_refused(data, tmp_path, capsys):
    import yaml

    cfg = yaml.safe_load((data / "phase1_build.yaml").read_text())
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    cfg["setup"]["output_dir"] = str(out)
    (tmp_path / "build.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    refused(capsys, main(["data", "build", str(tmp_path / "build.yaml"), "--quiet", "--overwrite"]), "notes.txt")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # an earlier build's folder: refused without --overwrite, rebuilt with it
    cfg["setup"]["output_dir"] = str(tmp_path / "h5")
    (tmp_path / "build.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["data", "build", str(tmp_path / "build.yaml"), "--quiet"]) == 0
    refused(capsys, main(["data", "build", str(tmp_path / "build.yaml"), "--quiet"]), "--overwrite")
    assert main(["data", "build", str(tmp_path / "build.yaml"), "--quiet", "--overwrite"]) == 0


# ----------------------------------------------------------------------------------- umask
def modes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): oct(stat.S_IMODE(p.stat().st_mode)) for p in sorted(root.rglob("*"))
            if not p.name.startswith(".mmloom")}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_everything_written_follows_the_umask(data, lora_run, tmp_path, umask):
    import yaml

    file_mode, folder_mode = oct(0o666 & ~umask), oct(0o777 & ~umask)
    previous = os.umask(umask)
    try:
        cfg = yaml.safe_load((data / "phase1_build.yaml").read_text())
        cfg["setup"]["output_dir"] = str(tmp_path / "h5")
        (tmp_path / "b.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["data", "build", str(tmp_path / "b.yaml"), "--quiet"]) == 0
        assert convert(lora_run / "final_model", tmp_path / "export") == 0
        assert main(["merge-lora", str(lora_run), str(tmp_path / "merged")]) == 0
        run = tmp_path / "run"  # a run, then a resume (metrics.jsonl rewritten)
        assert main(train_args(data, 1, run, "runconfig.max_steps=2", "runconfig.checkpoint_steps=1")) == 0
        assert main(train_args(data, 1, run, "runconfig.max_steps=3", "runconfig.checkpoint_steps=1")) == 0
    finally:
        os.umask(previous)
    for root in (tmp_path / "h5", tmp_path / "export", tmp_path / "merged", run):
        found = modes(root)
        wrong = {k: v for k, v in found.items() if v != (folder_mode if (root / k).is_dir() else file_mode)}
        assert found and not wrong, (root.name, wrong)
    for folder in ("h5", "export", "merged", "run"):
        assert oct(stat.S_IMODE((tmp_path / folder).stat().st_mode)) == folder_mode
