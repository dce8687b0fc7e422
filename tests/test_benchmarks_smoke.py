"""`benchmarks/train_step.py --smoke` runs, and its variants train on the same samples with the same losses."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str = "train_step"):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
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


@pytest.mark.parametrize("args, message", [
    (["--batch", "16", "--repeats", "1", "--pool", "64"],
     "--pool 64 cannot be dealt to 8 ranks x micro-batch 16 (the 8-rank estimate): use a multiple of 128"),
    (["--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["--quick", "--batch", "16"], "--pool 32 cannot be dealt to 8 ranks x micro-batch 16"),
    (["--smoke", "--batch", "3"], "--pool 16 cannot be dealt to 2 ranks x micro-batch 3"),
])
def test_train_step_refuses_what_its_samplers_cannot_deal(args, message, capsys):
    """One line on stderr, exit status 2, before any model is built (was: a traceback from the sampler)."""
    assert load_benchmark().main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("train_step.py: error: ") and message in err and err.count("\n") == 1


def test_train_step_quick_settings_are_dealt_whole():
    bench = load_benchmark()
    cfg = {**bench.CONFIGS["llava"], "pool": bench.QUICK["pool"], "batches": bench.QUICK["batches"]}
    args = type("Args", (), {"repeats": bench.QUICK["repeats"], "vocab": None})()
    assert bench.check_args(args, cfg) is None
    assert cfg["pool"] % (cfg["ranks"] * cfg["batches"][0]) == 0


def test_gpu_train_step_smoke(tmp_path):
    """The GPU benchmark's three variants on the CPU (tiny shapes, float32, SDPA): same samples, same
    real and supervised tokens, the same loss before any update; MFU from a given peak."""
    bench = load_benchmark("gpu_train_step")
    out = tmp_path / "gpu.json"
    assert bench.main(["--smoke", "--peak-tflops", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    variants = result["results"]
    assert list(variants) == list(bench.VARIANTS)
    first = [v["first_loss"][0] for v in variants.values()]
    assert max(first) - min(first) < 1e-5
    for v in variants.values():
        step = v["step_s"]["median"]
        assert v["tokens_per_s"] == pytest.approx(result["real_tokens"] / step)
        assert v["mfu"] == pytest.approx(result["model_flops"] / step / 1e12)
    assert variants["hf-packed"]["vs_hf_packed"]["median"] == 1.0
    assert 0 < result["supervised_tokens"] < result["real_tokens"]


@pytest.mark.parametrize("args, message", [
    (["--smoke", "--pool", "10", "--batch", "4"], "--pool 10 is not a whole number of micro-batches of 4"),
    (["--smoke", "--attn", "flash_attention_2"], "--attn flash_attention_2 needs a CUDA device"),
])
def test_gpu_train_step_refuses_in_one_line(args, message, capsys):
    assert load_benchmark("gpu_train_step").main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu_train_step.py: error: ") and message in err and err.count("\n") == 1


def test_startup_memory_smoke(tmp_path):
    """`benchmarks/startup_memory.py --smoke`: `mmloom train` on 2 gloo ranks (FSDP2) from HF folders,
    each rank's memory and times recorded up to its first step, both ranks at the same loss."""
    bench = load_benchmark("startup_memory")
    out = tmp_path / "startup.json"
    assert bench.main(["--work", str(tmp_path / "work"), "--smoke", "--json", str(out)]) == 0
    ranks = json.loads(out.read_text())["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["mmloom"] == str(ROOT / "src" / "mmloom")
    for r in ranks:
        assert 0 < r["imports"]["s"] < r["model_ready"]["s"] < r["first_step"]["s"]
        assert r["imports"]["rss_mib"] <= r["model_ready"]["peak_rss_mib"] <= r["first_step"]["peak_rss_mib"]
    assert ranks[0]["first_step"]["loss"] == ranks[1]["first_step"]["loss"]


def test_media_build_smoke(tmp_path):
    """`benchmarks/media_build.py --smoke`: multi-image and video builds on 1 and 2 processes, every
    record kept, outputs byte-identical across process counts, frames counted as the build decodes them."""
    bench = load_benchmark("media_build")
    out = tmp_path / "build.json"
    assert bench.main(["--smoke", "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    shape, lengths = result["shape"], result["clip_frames"]
    assert list(result["results"]) == ["multi", *(f"video-{k}" for k in shape["num_frames"])]
    assert result["inputs"]["images"] >= 2 * shape["n_multi"]  # 2-6 images per record
    for setting, res in result["results"].items():
        assert res["byte_identical"] and not res["skipped"]
        assert res["kept"] == [shape["n_multi"] if setting == "multi" else shape["n_videos"]]
        rows = res["rows"]
        assert sorted(rows) == ["1", "2"] and rows["1"]["speed_up"] == 1.0
        for row in rows.values():
            assert row["samples_per_s"] == pytest.approx(row["kept"] / row["wall_s"])
            assert row["samples_per_s_per_process"] == pytest.approx(row["samples_per_s"] / row["processes"])
            assert 0 < row["samples_per_cpu_s"] < float("inf")
        if setting != "multi":  # uniform sampling takes the last frame: the whole clip is decoded
            k = int(setting.split("-")[1])
            assert res["units"] == {"frames_decoded": sum(lengths), "frames_sampled": sum(min(n, k) for n in lengths)}
    # the workers of the 2-process builds did the encoding
    assert all(r["worker_cpu_s"] > 0 for r in result["runs"]["multi"]["2"])


def test_media_packing_smoke(tmp_path):
    """`benchmarks/media_packing.py --smoke`: padded, grouped and packed training on a mix with video
    clips, and transformers' LLaVA beside them on the image mix: the same samples and tokens per step
    (the script asserts it), the same first-step loss, packed rows without padding."""
    bench = load_benchmark("media_packing")
    out = tmp_path / "pack.json"
    assert bench.main(["--smoke", "--workdir", str(tmp_path / "work"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    mix, images = result["results"]["mix"], result["results"]["images"]
    assert list(mix["variants"]) == list(bench.MIX_VARIANTS)
    assert list(images["variants"]) == list(bench.IMAGE_VARIANTS)
    assert mix["info"]["items"]["clips"] > 0 and mix["info"]["items"]["multi"] > 0
    assert images["info"]["items"]["clips"] == 0 and images["info"]["items"]["multi"] > 0
    for res in (mix, images):
        first = [v["first_loss"] for v in res["variants"].values()]
        assert max(first) - min(first) < 1e-5
        ref = res["variants"][res["reference"]]
        assert ref["vs_reference"]["median"] == 1.0
        # packed rows compute no padding (a micro-batch without any image adds a dummy image's positions)
        share = {name: v["real_over_computed"] for name, v in res["variants"].items()}
        assert share["mmloom-pack"] > 0.98 and share["mmloom-pack"] > max(share[n] for n in share if n != "mmloom-pack")
        for v in res["variants"].values():
            assert v["tokens_per_s"] == pytest.approx(res["real_tokens_per_step"] / v["step_s"]["median"], rel=1e-6)
    assert images["reference"] == "hf-padded" and mix["reference"] == "mmloom-padded"


@pytest.mark.parametrize("name, args, message", [
    ("media_build", ["--smoke", "--clip-frames", "9", "3"], "--clip-frames 9 3: give 1 <= LO <= HI"),
    ("media_build", ["--smoke", "--reps", "0"], "--num-frames, --processes and --reps must be at least 1"),
    ("media_packing", ["--smoke", "--batch", "6"], "--batch 6 is not a whole number of micro-batches of 4"),
    ("media_packing", ["--smoke", "--records", "30"], "--records 30: the image mix (about 80% of the records) needs 24 samples"),
])
def test_media_benchmarks_refuse_in_one_line(name, args, message, capsys):
    assert load_benchmark(name).main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{name}.py: error: ") and message in err and err.count("\n") == 1


def test_data_build_runs_and_checks_byte_identity(tmp_path, capsys):
    """`benchmarks/data_build.py` on a few records: 1 and 2 processes write the same data (data_params.json
    compared without its `setup` section, which names the output folder and the process count)."""
    args = ["--n", "24", "--samples-per-file", "8", "--image-size", "32", "--workdir", str(tmp_path)]
    assert load_benchmark("data_build").main(args) == 0
    out = capsys.readouterr().out
    assert "kept 24" in out and "byte-identical outputs: True" in out
