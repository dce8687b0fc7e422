"""Validation at the boundary (#17 item 7, 10): wrong folders and option values of every command
give one line and exit 2 before any work starts; `--help` states every option's default."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import CLIPImageProcessor

from helpers import vlm
from mmloom.cli.main import build_parser, main
from mmloom.cli.train import warn_single_process
from mmloom.devices import resolve_device
from mmloom.errors import MmloomError
from mmloom.inference.generate import generation_kwargs, load_model_and_processor
from mmloom.interop.common import Bundle, write_mmloom
from mmloom.testing import tiny_clip_vision, tiny_llama, tiny_tokenizer
from test_train_loop import TINY, make_data, overrides

CLIP_PROC = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def one_line_error(capsys, command: str) -> str:
    """The single stderr line of a refused command (no traceback), without the prefix."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    prefix = f"mmloom {command}: error: "
    assert err.startswith(prefix), err
    return err[len(prefix):]


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A saved tiny model, an image, a question file, HF component folders (CLIP, Llama) and HDF5 data."""
    root = tmp_path_factory.mktemp("boundary")
    torch.manual_seed(0)
    write_mmloom(Bundle(vlm().eval(), tiny_tokenizer(), {"vision": CLIP_PROC}), root / "model")
    tiny_clip_vision().save_pretrained(root / "clip")
    CLIP_PROC.save_pretrained(root / "clip")
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(root / "llm")
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(root / "llm")
    (root / "empty").mkdir()
    make_data(root / "data", n=8)
    (root / "q.jsonl").write_text(json.dumps({"question_id": 1, "text": "What?", "image": "img0.png"}) + "\n")
    return root


# ------------------------------------------------------------------------------ option values
def bad_option_cases(ws: Path) -> list[tuple[list[str], str]]:
    """(argv, what the one-line error must say) for bad values of each command's options."""
    model, q, image = str(ws / "model"), str(ws / "q.jsonl"), str(ws / "data" / "images" / "img0.png")
    gen = ["generate", model, q, "--output", str(ws / "answers.jsonl")]
    chat = ["chat", model, "--image", image, "--prompt", "hi"]
    h5 = str(next((ws / "data" / "phase1_h5").glob("*.h5")))
    return [
        ([*chat, "--max-new-tokens", "-1"], "argument --max-new-tokens: must be at least 1, got -1"),
        ([*chat, "--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, got 0"),
        ([*chat, "--temperature", "-1"], "argument --temperature: must be 0 or more, got -1"),
        ([*chat, "--temperature", "nan"], "argument --temperature: expected a finite number"),
        (["chat", str(ws / "nowhere"), "--prompt", "hi"], "argument MODEL_DIR: folder not found"),
        (["chat", model, "--image", str(ws / "data"), "--prompt", "hi"], "is a folder, not a file"),
        (["chat", model, "--image", str(ws / "missing.png"), "--prompt", "hi"], "argument --image: file not found"),
        ([*gen, "--max-new-tokens", "-1"], "argument --max-new-tokens: must be at least 1, got -1"),
        ([*gen, "--temperature", "-1"], "argument --temperature: must be 0 or more"),
        ([*gen, "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
        ([*gen, "--image-dir", str(ws / "nowhere")], "argument --image-dir: folder not found"),
        (["generate", model, str(ws / "nowhere.jsonl"), "--output", "x.jsonl"], "file not found"),
        (["init", "--image-model", str(ws / "clip"), "--text-model", str(ws / "llm"), "--out", str(ws / "o"),
          "--pad-to-multiple-of", "0"], "argument --pad-to-multiple-of: must be at least 1, got 0"),
        (["init", "--audio-model", str(ws / "clip"), "--text-model", str(ws / "llm"), "--out", str(ws / "o"),
          "--audio-stride", "-4"], "argument --audio-stride: must be at least 1, got -4"),
        (["data", "inspect", h5, "--index", "-1"], "argument --index: must be 0 or more, got -1"),
        (["data", "inspect", str(ws / "data"), "--index", "0"], "is a folder, not a file"),
        (["data", "cache-features", str(TINY / "phase1.yaml"), "--batch-size", "0"], "must be at least 1"),
        (["data", "cache-features", str(TINY / "phase1.yaml"), "--num-workers", "-2"], "must be 0 or more"),
        (["plot", str(ws / "nowhere")], "argument model_dir: folder not found"),
        (["merge-lora", str(ws / "nowhere"), str(ws / "out")], "argument model_dir: folder not found"),
        (["chat", model, "--max-new-tokens", "many"], "argument --max-new-tokens: expected an integer, got 'many'"),
    ]


def test_wrong_file_types_for_configs(ws, capsys):
    """An image (or any binary file) or a folder given where a YAML config is expected."""
    image = ws / "data" / "images" / "img0.png"
    for argv, command in ((["train", str(image), "--model-dir", str(ws / "r")], "train"),
                          (["data", "build", str(image)], "data"),
                          (["data", "cache-features", str(image)], "data")):
        assert main(argv) == 2
        assert one_line_error(capsys, command) == f"{image}: not a YAML text file (byte 0x89 at offset 0 is not UTF-8)"
    assert main(["data", "build", str(ws / "data")]) == 2
    assert one_line_error(capsys, "data") == f"{ws / 'data'} is a folder, not a YAML config file"


def test_bad_option_values_are_one_line_errors(ws, capsys):
    for argv, expected in bad_option_cases(ws):
        assert main(argv) == 2, argv
        command = argv[0] if argv[0] != "data" else f"data {argv[1]}"
        message = one_line_error(capsys, command)
        assert expected in message, (argv, message)
        assert message.endswith(f"(see mmloom {command} --help)")
    assert not (ws / "answers.jsonl").exists() and not (ws / "o").exists()


def test_devices_this_machine_lacks(ws, capsys):
    args = ["chat", str(ws / "model"), "--prompt", "hi", "--device"]
    assert main([*args, "cuda:999"]) == 2  # CPU build: no CUDA support; GPU machine: not that many GPUs
    message = one_line_error(capsys, "chat")
    assert message.startswith("--device cuda:999: ")
    assert ("no CUDA support" in message) if torch.version.cuda is None else ("CUDA device(s) are visible" in message
                                                                              or "no CUDA device" in message)
    assert main([*args, "gpu0"]) == 2
    assert one_line_error(capsys, "chat") == "--device 'gpu0' is not a torch device (cpu, cuda, cuda:N, mps)"
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(MmloomError, match="--device cuda"):
            resolve_device("cuda")


def test_generation_settings_are_checked_not_silently_greedy(ws):
    _, processor = load_model_and_processor(ws / "model", device="cpu")
    assert generation_kwargs(processor, 8, 0.0)["do_sample"] is False
    sampled = generation_kwargs(processor, 8, 0.7)
    assert sampled["do_sample"] is True and sampled["temperature"] == 0.7
    for kwargs, match in (({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": -1}, "max_new_tokens"),
                          ({"temperature": -1.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
                          ({"top_p": 0.0, "temperature": 1.0}, "top_p"), ({"num_beams": 0}, "num_beams")):
        with pytest.raises(MmloomError, match=match):
            generation_kwargs(processor, **{"max_new_tokens": 8, "temperature": 0.0, **kwargs})


def test_help_states_every_default():
    """Every option of every sub-command has help, and the rendered help states its default."""

    def walk(parser, name):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, child in action.choices.items():
                    yield from walk(child, f"{name} {sub}")

    seen = 0
    for name, parser in walk(build_parser(), "mmloom"):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{name} {action.dest}: no help"
            takes_value = action.option_strings and action.nargs != 0 and not action.required
            if takes_value:
                seen += 1
                assert "default" in formatter._get_help_string(action), f"{name} {action.option_strings}: no default"
    assert seen > 40
    score = next(p for n, p in walk(build_parser(), "mmloom") if n == "mmloom score").format_help()
    assert "REFS.jsonl: one JSON object per line with question_id" in score
    train = next(p for n, p in walk(build_parser(), "mmloom") if n == "mmloom train").format_help()
    assert "runconfig.num_epochs=null" in train


# ------------------------------------------------------------------------------ folders
def test_init_refuses_swapped_and_empty_folders(ws, capsys):
    out = str(ws / "composed")
    cases = [
        (["--image-model", str(ws / "llm"), "--text-model", str(ws / "clip")],
         f"--text-model {ws / 'clip'} is a 'clip_vision_model' model, not a causal language model "
         "(--image-model and --text-model swapped?)"),
        (["--image-model", str(ws / "llm"), "--text-model", str(ws / "llm")],
         f"--image-model {ws / 'llm'} is a 'llama' causal LM, not a vision encoder"),
        (["--image-model", str(ws / "empty"), "--text-model", str(ws / "llm")],
         f"--image-model {ws / 'empty'}: no config.json: not a HF model folder"),
        (["--image-model", str(ws / "clip"), "--text-model", str(ws / "empty")],
         f"--text-model {ws / 'empty'}: no config.json: not a HF model folder"),
    ]
    for options, expected in cases:
        assert main(["init", *options, "--out", out]) == 2
        assert one_line_error(capsys, "init").startswith(expected)
        assert main(["convert", "--from", "hf-components", "--to", "mmloom", *options, out]) == 2
        assert one_line_error(capsys, "convert").startswith(expected)
    assert not Path(out).exists()


def test_a_vision_model_folder_is_not_a_tokenizer(ws, tmp_path, capsys):
    """A CLIP folder as processor.tokenizer_type: refused even when it ships a text tokenizer of its
    own (the real openai/clip-vit-* folders do); a 2-token vocabulary is refused too."""
    clip = tmp_path / "clip-vit"
    shutil.copytree(ws / "clip", clip)
    tiny_tokenizer().save_pretrained(clip)
    two = tmp_path / "two-tokens"
    shutil.copytree(ws / "clip", two)
    (two / "config.json").unlink()
    (two / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer"}))
    cfg = yaml.safe_load((ws / "data" / "phase1_build.yaml").read_text())
    for folder, expected in ((clip, "is a 'clip_vision_model' model folder, not a language model's tokenizer"),
                             (two, "gives a tokenizer of 2 tokens")):
        cfg["processor"]["tokenizer_type"] = str(folder)
        cfg["setup"]["output_dir"] = str(tmp_path / "h5")
        (tmp_path / "build.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["data", "build", str(tmp_path / "build.yaml"), "--quiet"]) == 2
        message = one_line_error(capsys, "data")
        assert message.startswith(f"processor.tokenizer_type: {folder}") and expected in message
    assert not (tmp_path / "h5").exists() or not any((tmp_path / "h5").glob("*.h5"))


# ------------------------------------------------------------------------------ train start
def train_argv(ws: Path, *sets: str) -> list[str]:
    argv = ["train", str(TINY / "phase1.yaml"), "--model-dir", str(ws / "run")]
    for value in [*overrides(ws / "data", 1), "runconfig.max_steps=1", *sets]:
        argv += ["--set", value]
    return argv


def test_train_refuses_ids_the_llm_cannot_embed(ws, capsys):
    largest = max_id(ws / "data" / "phase1_h5")
    assert main(train_argv(ws, "model.text_model.vocab_size=50")) == 2
    message = one_line_error(capsys, "train")
    assert message.startswith(f"the data in {ws / 'data' / 'phase1_h5'} has token ids up to {largest} ")
    assert "the LLM's vocabulary has 50 tokens" in message
    # a smaller LLM vocabulary than the tokenizer's that still covers every id of the data trains
    assert main([*train_argv(ws, f"model.text_model.vocab_size={largest + 1}"), "--mode", "eval"]) == 0


def max_id(data_dir: Path) -> int:
    import h5py
    import numpy as np

    best = -1
    for path in data_dir.glob("*.h5"):
        with h5py.File(path) as f:
            data = np.asarray(f["data"])
            best = max(best, int(data[:, 0, :][data[:, 3, :] == 0].max()))
    return best


def test_train_refuses_an_image_token_id_the_data_lacks(ws, capsys):
    for value in (1000, -1, 7):
        assert main(train_argv(ws, f"model.image_token_id={value}")) == 2
        message = one_line_error(capsys, "train")
        assert message.startswith(f"model.image_token_id is {value} but the data in ") and \
            "was built with '<image>' = 4" in message and message.endswith("set model.image_token_id to 4")


def test_distributed_without_torchrun_says_so(ws, capsys):
    assert warn_single_process("fsdp", {}) and warn_single_process("ddp", {"WORLD_SIZE": "1"})
    assert not warn_single_process("none", {}) and not warn_single_process("fsdp", {"WORLD_SIZE": "8"})
    capsys.readouterr()
    assert main(train_argv(ws, "runconfig.distributed=fsdp", "model.text_model.vocab_size=50")) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("mmloom train: warning: runconfig.distributed is 'fsdp' but this is a single process")
    assert "torchrun --nproc_per_node=N -m mmloom train" in err[0] and err[1].startswith("mmloom train: error:")


# ------------------------------------------------------------------------------ noise
def test_worker_errors_read_as_without_workers(ws, tmp_path, capsys):
    """An error raised in a data-loader worker (num_workers > 0) is the same one line as with
    num_workers 0, not torch's 'Caught ... Original Traceback' text."""
    from mmloom.cli.main import error_text

    data = tmp_path / "data"
    shutil.copytree(ws / "data", data)
    (data / "images" / "img3.png").unlink()
    lines = []
    for workers in (0, 2):
        argv = ["train", str(TINY / "phase1.yaml"), "--model-dir", str(tmp_path / f"run{workers}")]
        for value in [*overrides(data, 1), "runconfig.max_steps=2", f"train_input.num_workers={workers}",
                      "train_input.shuffle=false"]:
            argv += ["--set", value]
        assert main(argv) == 2
        lines.append(one_line_error(capsys, "train"))
    assert lines[0] == lines[1] and lines[0].startswith("sample 3: cannot load image ")
    wrapped = MmloomError("Caught MmloomError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                          "call last):\n  File \"x.py\", line 1, in f\n    g()\nmmloom.errors.MmloomError: bad: thing\n")
    assert error_text(wrapped) == "bad: thing" and error_text(MmloomError("plain: text")) == "plain: text"


def test_reading_a_llava_export_raises_no_warnings(ws, tmp_path, capsys):
    """The transformers-4 config.json of the original-LLaVA layout (rope_scaling, model_type
    llava_llama) does not make the tokenizer load warn (it did: a FutureWarning per read)."""
    import warnings

    from helpers import sp_vlm

    model, tokenizer = sp_vlm(tmp_path / "tok")  # a tokenizer the original code loads (tokenizer.model)
    write_mmloom(Bundle(model, tokenizer, {"vision": CLIP_PROC}), tmp_path / "model")
    assert main(["convert", "--from", "mmloom", "--to", "llava", str(tmp_path / "model"), str(tmp_path / "llava")]) == 0
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        warnings.simplefilter("error", FutureWarning)
        assert main(["convert", "--from", "llava", "--to", "mmloom", str(tmp_path / "llava"), str(tmp_path / "back")]) == 0
    err = capsys.readouterr().err
    assert "Warning" not in err and "llava_llama" not in err
