"""No code from a model folder ever runs: every HF load passes `trust_remote_code=False` (checked by
walking the source), and a folder whose model, tokenizer or processor exists only as its own Python
code (`auto_map`) is refused in one line, even when "y" is typed at a prompt."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmloom.cli.main import main
from mmloom.testing import tiny_clip_vision, tiny_llama, tiny_tokenizer

SRC = Path(__file__).resolve().parents[1] / "src" / "mmloom"
# mmloom's own classes (they load through the calls checked here) and classes that hold settings only
OWN = {"MultimodalModel", "MultimodalProcessor", "GenerationConfig", "ImageTransform"}


def _receiver(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ast.unparse(node)


def _loads_without_flag() -> list[str]:
    """`X.from_pretrained(...)` (and `Auto*.from_config(...)`) calls in src/ without
    `trust_remote_code=False`, as "file:line: call"."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        classes = {}  # node -> enclosing class name
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            for node in ast.walk(cls):
                classes[node] = cls.name
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            method, receiver = node.func.attr, _receiver(node.func.value)
            if method == "from_pretrained":
                if receiver in OWN or (receiver in ("cls", "self") and classes.get(node, "") in OWN | {"SentencePieceLlamaTokenizer"}):
                    continue
            elif not (method == "from_config" and receiver.startswith("Auto")):
                continue
            flags = [k for k in node.keywords if k.arg == "trust_remote_code"]
            if not (flags and isinstance(flags[0].value, ast.Constant) and flags[0].value.value is False):
                found.append(f"{path.relative_to(SRC)}:{node.lineno}: {ast.unparse(node)[:100]}")
    return found


def test_every_hf_load_passes_trust_remote_code_false():
    assert _loads_without_flag() == []


def test_the_walk_finds_a_load_without_the_flag(tmp_path, monkeypatch):
    """The check itself: a load without the flag (or with True) in a source file is reported."""
    fake = tmp_path / "mmloom"
    fake.mkdir()
    (fake / "bad.py").write_text("from transformers import AutoModel\nAutoModel.from_pretrained('x')\n"
                                 "AutoModel.from_config(c, trust_remote_code=True)\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake)
    assert [line.split(":")[1] for line in _loads_without_flag()] == ["2", "3"]


CODE = '''
import pathlib
pathlib.Path(__file__).with_name("CODE_RAN").write_text("the folder's code ran")
from transformers import PretrainedConfig, LlamaConfig

class XConfig(LlamaConfig):
    model_type = "x_custom_llm"
'''


def remote_code_llm(folder: Path, native: bool = False) -> Path:
    """A tiny Llama folder whose config.json names code of its own (`auto_map`); `native`: its
    model_type is also one transformers ships (so transformers' class is used instead)."""
    tok = tiny_tokenizer()
    tiny_llama(vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    if not native:
        config["model_type"] = "x_custom_llm"
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_x.py").write_text(CODE)
    (folder / "modeling_x.py").write_text(CODE)
    return folder


def test_init_refuses_a_folder_of_custom_code_even_after_yes(tmp_path):
    tiny_clip_vision().save_pretrained(tmp_path / "clip")
    llm = remote_code_llm(tmp_path / "llm")
    proc = subprocess.run([sys.executable, "-m", "mmloom", "init", "--image-model", str(tmp_path / "clip"),
                           "--text-model", str(llm), "--out", str(tmp_path / "out")],
                          input="y\ny\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "config.json names code of its own" in proc.stderr and "trust_remote_code=False" in proc.stderr
    assert not (llm / "CODE_RAN").exists() and not (tmp_path / "out").exists()


def test_train_refuses_it_in_one_line(tmp_path, capsys):
    llm = remote_code_llm(tmp_path / "llm")
    from test_train_loop import make_data, train_args

    data = make_data(tmp_path / "data", n=8)
    args = train_args(data, 1, tmp_path / "run", f"model.text_model={llm}", "runconfig.max_steps=1")
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "names code of its own" in err and "model.text_model" in err and len(err.strip().splitlines()) == 1
    assert not (llm / "CODE_RAN").exists()


@pytest.mark.parametrize("native", [True])
def test_a_folder_transformers_can_read_itself_loads_without_its_code(tmp_path, native):
    """Hub folders keep an `auto_map` from before their architecture joined transformers: they load
    with transformers' own class, and none of the folder's code runs."""
    from mmloom.model.hf_parts import load_language_model

    llm = remote_code_llm(tmp_path / "llm", native=native)
    model = load_language_model(llm)
    assert type(model).__name__ == "LlamaForCausalLM" and not (llm / "CODE_RAN").exists()


def test_a_tokenizer_of_custom_code_is_refused(tmp_path):
    from mmloom.errors import MmloomError
    from mmloom.processing.tokenizer import load_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="XTokenizer", auto_map={"AutoTokenizer": ["tokenization_x.XTokenizer", None]})
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tok" / "tokenization_x.py").write_text(CODE)
    with pytest.raises(MmloomError, match="tokenizer_config.json names code of its own"):
        load_tokenizer(tmp_path / "tok", what="processor.tokenizer_type")
    assert not (tmp_path / "tok" / "CODE_RAN").exists()
