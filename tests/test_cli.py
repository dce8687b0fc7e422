"""The `mmloom` entry point: help, version, and one-line errors instead of tracebacks."""

import pytest

from mmloom import __version__
from mmloom.cli.main import main


def test_help_and_version(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("data", "train", "convert", "init", "chat", "generate", "score", "demo", "plot"):
        assert command in out
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and __version__ in capsys.readouterr().out


def test_user_and_os_errors_are_one_line(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml"), "--model-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmloom train: error: config file not found:") and "Traceback" not in err
    folder = tmp_path / "answers"
    folder.mkdir()  # a folder where a jsonl file is expected: named as the user's mistake, exit 2
    assert main(["score", str(folder), "--references", str(folder), "--metric", "exact"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"mmloom score: error: {folder}: is a folder, not a jsonl file"
