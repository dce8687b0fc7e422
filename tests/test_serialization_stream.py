"""The streamed safetensors writer (`model.serialization`): files that the safetensors library
reads back exactly, weights split over files with transformers' index, and the structural check
that catches truncated files without reading their tensors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mmloom.errors import MmloomError
from mmloom.model import serialization as ser


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g),
        "b.bias": torch.randn(3, generator=g).to(torch.bfloat16),
        "c.half": torch.randn(2, 3, 4, generator=g).to(torch.float16),
        "d.ids": torch.arange(11, dtype=torch.int64),
        "e.mask": torch.tensor([True, False, True]),
        "f.scalar": torch.tensor(2.5),
        "g.empty": torch.zeros(0, 4),
    }


def stream(path, state: dict[str, torch.Tensor]) -> None:
    entries = [ser.TensorEntry(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    (_, ordered), = ser.plan_weight_files(entries)
    writer = ser.SafetensorsStreamWriter(path, ordered)
    for entry in ordered:
        writer.write(state[entry.name])
    writer.close()


def test_streamed_file_reads_back_with_safetensors(tmp_path):
    state = tensors()
    stream(tmp_path / "model.safetensors", state)
    loaded = load_file(tmp_path / "model.safetensors")
    assert set(loaded) == set(state)
    for k, v in state.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert ser.check_safetensors_file(tmp_path / "model.safetensors") is None


def test_weights_split_over_files_with_transformers_index(tmp_path):
    state = tensors()
    entries = [ser.TensorEntry(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    files = ser.plan_weight_files(entries, min_files=3)
    assert [name for name, _ in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for name, group in files:
        writer = ser.SafetensorsStreamWriter(tmp_path / name, group)
        for entry in group:
            writer.write(state[entry.name])
        writer.close()
    ser.write_weights_index(tmp_path, files)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in state.values())
    loaded = ser.load_state_dict(tmp_path)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], v) for k, v in state.items())
    # a tiny file-size limit splits further, each tensor whole
    many = ser.plan_weight_files(entries, max_file_bytes=64)
    assert sorted(e.name for _, g in many for e in g) == sorted(state) and len(many) > 3
    assert all(sum(e.nbytes for e in g) <= 64 or len(g) == 1 for _, g in many)


def test_structural_check_catches_damage(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.ones(64, 64)}, path)  # written by the safetensors library
    assert ser.check_safetensors_file(path) is None
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    assert "truncated" in ser.check_safetensors_file(path)
    path.write_bytes(data[:5])
    assert "too short" in ser.check_safetensors_file(path)
    path.write_bytes(data[:8] + b"\xff" * 40 + data[48:])
    assert "damaged header" in ser.check_safetensors_file(path)
    (tmp_path / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(MmloomError, match="model.safetensors: not a readable safetensors file"):
        ser.load_state_dict(tmp_path)


def test_writer_refuses_what_does_not_match_its_header(tmp_path):
    entries = [ser.TensorEntry("w", (2, 2), torch.float32), ser.TensorEntry("v", (3,), torch.float32)]
    writer = ser.SafetensorsStreamWriter(tmp_path / "a.safetensors", entries)
    with pytest.raises(MmloomError, match=r"w: expected torch.float32 \(2, 2\)"):
        writer.write(torch.zeros(3))
    writer.write(torch.zeros(2, 2))
    with pytest.raises(MmloomError, match="1 tensor\\(s\\) were not written"):
        writer.close()
