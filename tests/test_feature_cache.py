"""`mmloom data cache-features` and training from cached encoder features (frozen encoder only)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mmloom.cli.main import main
from test_train_loop import TINY, losses, make_data, overrides, weights

# Measured on the tiny configs (features rounded to float16): per-step losses of the cached run
# differ from the image run by at most 2.9e-6 (phase 1, 16 steps) and 3.6e-7 (phase 2, 8 steps)
# absolute, i.e. < 5e-7 relative; asserted with a wide margin.
LOSS_ATOL = 1e-4


def cache_args(data: Path, phase: int, *sets: str) -> list[str]:
    args = ["data", "cache-features", str(TINY / f"phase{phase}.yaml"), "--batch-size", "4", "--quiet"]
    for s in overrides(data, phase, "runconfig.checkpoint_path=null", *sets):
        args += ["--set", s]
    return args


def run_args(data: Path, phase: int, model_dir: Path, *sets: str) -> list[str]:
    args = ["train", str(TINY / f"phase{phase}.yaml"), "--model-dir", str(model_dir)]
    for s in overrides(data, phase, "runconfig.checkpoint_path=null", *sets):
        args += ["--set", s]
    return args


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = make_data(tmp_path_factory.mktemp("cache_data"))
    for phase in (1, 2):
        assert main(cache_args(root, phase)) == 0
    return root


def test_cache_files_hold_encode_module_output(data):
    from mmloom.training.builder import build_model
    from mmloom.training.config import load_train_config
    from mmloom.training.data import build_dataset

    for phase in (1, 2):
        cache = data / f"phase{phase}_h5" / "feature_cache"
        names = sorted(p.name for p in cache.iterdir())
        assert names == ["feature_cache.json", "features-00000.h5", "features-00001.h5", "features-00002.h5"]
        cfg = load_train_config(TINY / f"phase{phase}.yaml", overrides(data, phase, "runconfig.checkpoint_path=null"))
        model = build_model(cfg, seed=cfg.runconfig.seed)
        dataset = build_dataset(cfg.train_input, 32)
        images = torch.stack([dataset[i]["image_data"] for i in range(len(dataset))])
        with torch.no_grad():
            expected = model.vision_encoder.encode_module(pixel_values=images)[0]
        assert expected.shape == (24, 16, 32)  # CLIP layer -2, CLS dropped
        cached = []
        for k, n in enumerate((10, 10, 4)):
            with h5py.File(cache / f"features-0000{k}.h5", "r") as f:
                feats = f["features"]
                assert feats.shape == (n, 16, 32) and feats.dtype == np.float16
                assert json.loads(f.attrs["feature_select"]) == {"type": "feature_select", "layer": -2,
                                                                 "strategy": "patch"}
                assert f.attrs["image_size"] == 32 and f.attrs["precision"] == "float32"
                assert len(f.attrs["encoder_weights_sha256"]) == 64
                cached.append(torch.from_numpy(feats[:]))
        cached = torch.cat(cached)
        has_image = torch.tensor([bool(dataset[i]["has_image"]) for i in range(len(dataset))])
        # float16 rounding: relative error <= 2^-11
        torch.testing.assert_close(cached[has_image].float(), expected[has_image], rtol=1e-3, atol=1e-3)
        assert (phase == 2) == bool((~has_image).any())
        assert not cached[~has_image].any()  # text-only rows: zeros
    summary = json.loads((data / "phase2_h5" / "feature_cache" / "feature_cache.json").read_text())
    assert summary["images_encoded"] == 20 and summary["feature_shape"] == [16, 32]
    # a second run finds every file up to date
    assert main(cache_args(data, 2)) == 0
    summary = json.loads((data / "phase2_h5" / "feature_cache" / "feature_cache.json").read_text())
    assert summary["written"] == [] and summary["up_to_date"] == 3 and summary["images_encoded"] == 0


@pytest.mark.parametrize("phase", [1, 2])
def test_cached_run_matches_image_run(data, tmp_path, phase, monkeypatch):
    """Same per-step losses with and without the cache; the cached run reads no image and runs no encoder."""
    from mmloom.model.encoder import ModalEncoderModule
    from mmloom.processing import image
    steps = 6 if phase == 1 else 3
    sets = [f"runconfig.max_steps={steps}", "runconfig.log_steps=1", "runconfig.save_final_model=false",
            "runconfig.checkpoint_steps=100"]
    assert main(run_args(data, phase, tmp_path / "images", *sets)) == 0
    cached_sets = [*sets, "train_input.use_cached_features=true", f"train_input.img_data_dir={tmp_path / 'gone'}"]

    def forbidden(*args, **kwargs):
        raise AssertionError("the cached run must not load images or run the vision encoder")

    monkeypatch.setattr(image, "load_image", forbidden)
    monkeypatch.setattr(ModalEncoderModule, "encode_module", forbidden)
    assert main(run_args(data, phase, tmp_path / "cached", *cached_sets)) == 0
    a, b = losses(tmp_path / "images"), losses(tmp_path / "cached")
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    diffs = [abs(a[s] - b[s]) for s in a]
    assert max(diffs) < LOSS_ATOL, diffs
    wa, wb = weights(tmp_path / "images" / f"checkpoint-{steps}"), weights(tmp_path / "cached" / f"checkpoint-{steps}")
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=5e-3)


def test_stale_cache_and_trainable_encoder_are_refused(data, tmp_path, capsys):
    cached = ["train_input.use_cached_features=true", "runconfig.max_steps=1"]

    def refused(args) -> str:
        assert main(args) == 2
        return capsys.readouterr().err

    err = refused(run_args(data, 1, tmp_path / "a", *cached, "model.image_feature_select_layer_idx=-1"))
    assert "stale" in err and "feature selection" in err and "'layer': -1" not in err
    assert '"layer": -2' in err and '"layer": -1' in err and "mmloom data cache-features" in err
    err = refused(run_args(data, 1, tmp_path / "b", *cached, "runconfig.seed=1"))  # other random encoder
    assert "stale" in err and "vision encoder weights" in err
    err = refused(run_args(data, 1, tmp_path / "c", *cached, "train_input.transforms=[{name: expand_to_square}, "
                           "{name: resize}, {name: center_crop}, {name: to_tensor}, {name: normalize}]"))
    assert "stale" in err and "image transforms" in err
    err = refused(run_args(data, 1, tmp_path / "d", *cached, "model.freeze=[^text_model]"))
    assert "train_input.use_cached_features: a frozen vision encoder is needed" in err and "model.freeze" in err
    err = refused(run_args(data, 1, tmp_path / "e", *cached, f"train_input.feature_cache_dir={tmp_path / 'none'}"))
    assert "no feature cache" in err
    err = refused(cache_args(data, 1, "model.freeze=[^text_model]"))
    assert "a frozen vision encoder is needed" in err
    err = refused(run_args(data, 1, tmp_path / "f", "eval_input.use_cached_features=true", "model.freeze=[]")
                  + ["--mode", "train_and_eval"])  # an encoder that trains makes the eval cache stale
    assert "eval_input.use_cached_features: a frozen vision encoder is needed" in err
    assert not (tmp_path / "a" / "checkpoint-1").exists()


def test_eval_from_cached_features_matches_eval_from_images(data, tmp_path, monkeypatch):
    from mmloom.model.encoder import ModalEncoderModule

    assert main(run_args(data, 1, tmp_path / "images") + ["--mode", "eval"]) == 0

    def forbidden(*args, **kwargs):
        raise AssertionError("the cached eval must not run the vision encoder")

    monkeypatch.setattr(ModalEncoderModule, "encode_module", forbidden)
    assert main(run_args(data, 1, tmp_path / "cached", "eval_input.use_cached_features=true") + ["--mode", "eval"]) == 0
    a = json.loads((tmp_path / "images" / "eval_results.json").read_text())
    b = json.loads((tmp_path / "cached" / "eval_results.json").read_text())
    assert a["num_samples"] == b["num_samples"] > 0
    assert abs(a["eval_loss"] - b["eval_loss"]) < LOSS_ATOL
    assert abs(a["accuracy"] - b["accuracy"]) < 1e-6


def test_cached_features_run_resumes_exactly(data, tmp_path):
    from test_train_resume import resume_matches

    resume_matches(data, tmp_path, "train_input.use_cached_features=true", f"train_input.img_data_dir={tmp_path / 'gone'}",
                   args=run_args)
