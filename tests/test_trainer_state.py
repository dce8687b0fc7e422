"""The trainer's state is created in `Trainer.__init__` and documented in its docstring: no method
adds an attribute later, nothing guards one with getattr/hasattr, and the loop holds no test hook."""

from __future__ import annotations

import ast
import inspect
import textwrap

from mmloom.training import loop


def trainer_class() -> ast.ClassDef:
    return ast.parse(textwrap.dedent(inspect.getsource(loop.Trainer))).body[0]


def assigned(function: ast.FunctionDef) -> set[str]:
    return {node.attr for node in ast.walk(function) if isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name) and node.value.id == "self"}


def test_trainer_attributes_come_from_init_and_are_documented():
    cls = trainer_class()
    methods = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
    created = assigned(methods["__init__"])
    later = {name: attrs - created for name, f in methods.items() if name != "__init__" and (attrs := assigned(f))}
    assert not any(later.values()), later  # e.g. {"train": {"metrics"}} would be an attribute born in train()
    doc = loop.Trainer.__doc__
    assert all(f"`{name}`" in doc for name in created), sorted(n for n in created if f"`{n}`" not in doc)
    guards = [node for node in ast.walk(cls) if isinstance(node, ast.Call) and getattr(node.func, "id", None)
              in ("getattr", "hasattr") and isinstance(node.args[0], ast.Name) and node.args[0].id == "self"]
    assert guards == []
    assert "environ" not in inspect.getsource(loop)  # no test hook read from the environment
