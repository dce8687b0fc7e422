"""docs/architecture.md stays true: imports follow its direction (at every depth, module paths given as
strings included), modules import each other without new cycles, and every name it cites exists."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "mmloom"
DOC = ROOT / "docs" / "architecture.md"
MODULE_STRING = re.compile(r"^mmloom(\.[A-Za-z_]\w*)+(:[A-Za-z_]\w*)?$")
# The one cycle older than this test (the model builds itself on the meta device); no other may appear.
KNOWN_CYCLES = [
    {"mmloom.model.meta_init", "mmloom.model.multimodal"},
]
# Names the document cites from outside mmloom (transformers, LLaVA, llama.cpp, Ollama, Cerebras)
# and format fields that mmloom writes under a computed name ("{noun}_path").
EXTERNAL = {"LlavaForConditionalGeneration", "tokenizer_image_token", "preprocess_multimodal", "tools/mtmd/clip.cpp",
            "mmproj", "Modelfile", "gguf", "image_model/", "text_model_llava/", "audio_path", "audio_span",
            "audio_offset", "DPOTrainer", "train_dpo.py"}


def diagram() -> tuple[list[str], list[str]]:
    """(shared leaves, packages left to right) of the dependency diagram in docs/architecture.md."""
    block = DOC.read_text().split("Dependencies run one way:", 1)[1].split("```")[1]
    leaves_line, packages_line = [line for line in block.splitlines() if line.strip()]
    leaves = [name.strip() for name in leaves_line.split(",")]
    packages = [name.strip() for name in packages_line.replace("└─", "").split("──")]
    return leaves, packages


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of `path` at any depth, and of module paths given as strings."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and MODULE_STRING.match(node.value):
            out.append((node.lineno, node.value.split(":")[0]))
    return [(line, name) for line, name in out if name == "mmloom" or name.startswith("mmloom.")]


MODULES = {module_name(path): path for path in sorted(SRC.rglob("*.py"))}


def resolve(name: str) -> str | None:
    """The mmloom module `name` refers to (`mmloom.x.y.attr` -> `mmloom.x.y`), None when none."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def test_the_diagram_names_every_package_and_leaf():
    leaves, packages = diagram()
    top = {path.stem for path in SRC.glob("*.py")} - {"__init__", "__main__"}
    folders = {path.name for path in SRC.iterdir() if path.is_dir() and (path / "__init__.py").exists()}
    assert set(leaves) == top and set(packages) == folders


def test_imports_follow_the_documented_direction():
    leaves, packages = diagram()
    rank = {name: k for k, name in enumerate(packages)}

    def layer(module: str) -> tuple[str, int]:
        head = module.split(".")[1] if "." in module else ""
        return ("package", rank[head]) if head in rank else ("leaf", -1) if head in leaves else ("root", -1)

    wrong = []
    for module, path in MODULES.items():
        if module in ("mmloom", "mmloom.__main__"):  # the entry points
            continue
        kind, level = layer(module)
        for line, target in sorted({(line, resolve(name)) for line, name in imports(path)}, key=str):
            if target is None or target == "mmloom":  # the root package: __version__
                continue
            target_kind, target_level = layer(target)
            allowed = target_kind == "leaf" if kind == "leaf" else target_kind == "leaf" or target_level <= level
            if not allowed:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target} against the documented direction")
    assert not wrong, "\n".join(wrong)


def test_no_new_import_cycles():
    graph = {module: {target for _, name in imports(path) if (target := resolve(name)) not in (None, module, "mmloom")}
             for module, path in MODULES.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(component)

    for module in graph:
        if module not in index:
            visit(module)
    assert sorted(map(sorted, cycles)) == sorted(map(sorted, KNOWN_CYCLES)), cycles  # a cycle undone leaves the list


def defined_names() -> set[str]:
    """Every def, class, assigned or annotated name and every string constant of src/mmloom."""
    names: set[str] = set()
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)
    return names


def module_defines(module: str, name: str) -> bool:
    tree = ast.parse(MODULES[module].read_text())
    return any(getattr(node, "name", None) == name or (isinstance(node, ast.Name) and node.id == name)
               for node in tree.body for node in ast.walk(node))


def cli_words() -> set[str]:
    """Sub-command names and option strings of the `mmloom` parser, at every level."""
    from mmloom.cli.main import build_parser

    words: set[str] = set()

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            words.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    words.add(name)
                    walk(sub)

    walk(build_parser())
    return words


def config_keys() -> set[str]:
    """The sections and dotted keys of the training and build configs (`train_input.data_dir`, ...)."""
    from mmloom.data.build_config import BuildConfig
    from mmloom.training.config import TrainConfig

    keys: set[str] = set()

    def walk(model, prefix: str) -> None:
        for name, field in model.model_fields.items():
            keys.add(prefix + name)
            for kind in getattr(field.annotation, "__args__", (field.annotation,)):
                if hasattr(kind, "model_fields"):
                    walk(kind, prefix + name + ".")

    walk(TrainConfig, "")
    walk(BuildConfig, "")
    return keys


def cited(text: str) -> list[str]:
    return sorted({name for name in re.findall(r"`([^`\n]+)`", text) if name.strip()})


def missing_names(text: str) -> list[str]:
    """The backticked names of `text` that exist neither in src/mmloom (files, folders, definitions,
    names in the code), nor as `mmloom` commands and options, nor as config keys, nor in EXTERNAL."""
    names, words, keys = defined_names(), cli_words(), config_keys()
    files = [path.relative_to(SRC).as_posix() for path in SRC.rglob("*")]
    missing = []
    for name in cited(text):
        if name in EXTERNAL:
            continue
        if name.endswith((".py", "/")) or name.startswith(("src/", "docs/")):
            found = (ROOT / name).exists() or (SRC.parent / name).exists() or any(
                f == name.rstrip("/") or f.endswith("/" + name.rstrip("/")) for f in files)
            if not found and not name.endswith(".py"):  # a folder of a format (checkpoint-N/): named in the code
                stem = name.rstrip("/").replace("-N", "-")
                found = any(stem in constant for constant in names)
        elif re.fullmatch(r"\.?[\w.-]+\.(json|lock|md)", name):  # a file of a format: named in the code
            found = any(name in constant for constant in names)
        elif name.startswith("mmloom ") or name.startswith("--"):  # a command line
            found = all(word in words for word in name.split()[1:] if not word.isupper())
        elif re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_<>]\w*>?)+", name):  # a module attribute or a config key
            head, _, attr = name.rpartition(".")
            modules = [m for m in MODULES if m.endswith("." + head)]
            found = name in keys or any(module_defines(m, attr) for m in modules) or (
                head.split(".")[0] in ("modalities", "dataset") and attr.strip("<>") in names | {"audio", "modality"})
        else:
            found = name in names or name in words or name in keys or name.split()[0] in words or (SRC / name).is_dir()
        if not found:
            missing.append(name)
    return missing


def test_every_name_the_architecture_cites_exists():
    assert not missing_names(DOC.read_text()), "docs/architecture.md cites names that do not exist"


def test_the_names_check_finds_names_that_are_gone():
    text = ("`record_images`, `read_lines` (`data/encode.py`), `data/audio_items.py`, `modal_collate.py`, "
            "`mmloom data frobnicate`, `train_input.no_such_key`, `builder.no_such_function`, `encode_record`")
    assert missing_names(text) == ["builder.no_such_function", "data/audio_items.py", "mmloom data frobnicate",
                                   "modal_collate.py", "read_lines", "record_images", "train_input.no_such_key"]
