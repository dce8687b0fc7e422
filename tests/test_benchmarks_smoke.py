"""`benchmarks/train_step.py --smoke` runs, and its variants train on the same samples with the same losses."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "benchmarks" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_step_smoke(tmp_path):
    bench = load_benchmark()
    out = tmp_path / "smoke.json"
    assert bench.main(["--smoke", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    variants = result["results"]["4"]["variants"]
    assert set(variants) == set(bench.VARIANTS)
    # Same weights, same samples: every variant's loss agrees (image samples before any update, and the
    # whole pool on the first step), within float32 tolerance.
    image_losses = [v["image_only_loss"] for v in variants.values()]
    assert max(image_losses) - min(image_losses) < 1e-5
    first = [v["losses"][0] for v in variants.values()]
    assert max(first) - min(first) < 1e-5
    # Padding-free rows compute no padding; padded rows do. mmloom's packed rows hand SDPA only each
    # sample's own square (transformers' flattened row: the whole row's square).
    assert variants["hf-packed"]["real_over_computed"] == variants["mmloom-pack"]["real_over_computed"] == 1.0
    assert variants["hf-random"]["real_over_computed"] < 1.0
    assert variants["mmloom-pack"]["attention_real_over_dense"] > 2 * variants["hf-packed"]["attention_real_over_dense"]
    assert variants["hf-random"]["vs_reference"]["median"] == 1.0
    for v in variants.values():
        assert v["step_s"]["median"] > 0 and v["tokens_per_s"] > 0
    assert result["data"]["text_only"] >= 1 and result["data"]["image_tokens"] == 16


def test_modality_length_groups_keep_modalities_apart_and_balance_lengths():
    bench = load_benchmark()
    lengths = [100, 90, 80, 70, 60, 50, 40, 30, 500, 400]
    has_image = [True] * 8 + [False] * 2
    groups = bench.modality_length_groups(lengths, has_image, micro=4, global_batch=8, seed=0)
    assert sorted(i for g in groups for i in g) == list(range(10))
    for g in groups:
        assert len({has_image[i] for i in g}) == 1  # never mixed
    image_groups = [g for g in groups if has_image[g[0]]]
    # Sorted longest first and dealt to the lighter micro-batch: {100, 70, 60, 30} and {90, 80, 50, 40}.
    assert sorted(sorted(lengths[i] for i in g) for g in image_groups) == [[30, 60, 70, 100], [40, 50, 80, 90]]


@pytest.mark.parametrize("seed", [1, 2])
def test_synthetic_pool_is_llava_shaped(seed):
    bench = load_benchmark()
    cfg = bench.CONFIGS["llava"]
    samples = bench.make_pool(cfg, 576, cfg["vocab"], seed)
    assert len(samples) == 128 and sum(not s["has_image"] for s in samples) == 8  # 6%
    for s in samples:
        assert len(s["ids"]) <= cfg["msl"] and any(s["sup"])
        assert len(s["ids"]) == len(s["sup"])
