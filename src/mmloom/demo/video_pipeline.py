"""`mmloom demo --modality video`: the LLaVA recipe for a video-LLM on synthetic clips, through
mmloom's own commands (printed before they run), as the vision demo does for scenes.

A tiny random CLIP tower runs every sampled frame (8 of each clip's 16), its 3 x 3 patch features
are projected and pooled per frame to 2 x 2 (LLaVA-OneVision's bilinear pooling, `FramePool`) with
one learned newline after the last frame, and a tiny random Llama learns, in two phases, to
describe the clips (which shape moves which way, which appears first) and to answer questions
about them; the held-out evaluation is repeated with every frame blanked to its mean colour. The
steps shared with the other demos are in :mod:`mmloom.demo.steps`.
"""

from __future__ import annotations

import time
from pathlib import Path

from mmloom.demo import steps
from mmloom.demo.clips import FPS, FRAMES, SIZE, write_dataset
from mmloom.demo.pipeline import PATCH_SIZE, VISION

FULL = steps.DemoSize(num_train=4000, num_eval=200, phase1_steps=600, phase2_steps=350, batch_size=32)
QUICK = steps.DemoSize(num_train=1000, num_eval=40, phase1_steps=400, phase2_steps=100, batch_size=16)

NUM_FRAMES = 8
POOL = {"mode": "bilinear", "stride": 2}  # 3 x 3 patches per frame -> 2 x 2 features


def dataset_section(out: Path) -> dict:
    """The `dataset` keys of the clips' build config: 8 frames per clip, each a 3 x 3 patch grid
    pooled to 2 x 2, one newline per clip: 8 * 4 + 1 = 33 video tokens."""
    return {"num_patches": (SIZE // PATCH_SIZE) ** 2,
            "video": {"video_dir": str(out / "data"), "num_frames": NUM_FRAMES, "pool": POOL, "newline": "one_token"}}


def video_train_config(out: Path, phase: int, size: steps.DemoSize, vocab_size: int, image_token_id: int,
                       video_token_id: int) -> dict:
    """The training config of a phase: the vision demo's tiny random CLIP tower for the frames
    (penultimate layer, patch features) + 2-layer MLP projector + `FramePool` + tiny random Llama."""
    common = {"projector": "mlp2x_gelu", "image_feature_select_layer_idx": -2, "image_token_id": image_token_id,
              "loss_scaling": "num_tokens"}
    phase1 = {"image_model": VISION, "text_model": {**steps.TEXT, "vocab_size": vocab_size},
              "video": {"pool": POOL, "newline": "one_token", "token_id": video_token_id}}
    model = steps.phase_model(out, phase, common, phase1, phase2_frozen=["^image_model"])
    # the random tower stays frozen in phase 1 too: trained from scratch on these mostly empty frames it
    # collapsed (its features varied ~1% between clips after phase 1, ~17% at initialisation)
    model["freeze"] = ["^image_model"]
    # one loader worker decodes the next batch's clips on the other core while the main process trains
    train_input = {"video_data_dir": str(out / "data"), "image_size": SIZE, "num_workers": 1}
    return steps.train_config(out, phase, size, train_input, model)


def run_video_demo(out: str | Path = "runs/demo-video", quick: bool = False,
                   size: steps.DemoSize | None = None) -> dict:
    """Run the video pipeline in `out` (cleared first when a previous demo made it; `size` overrides
    the quick / full sizes); returns the exact-match accuracy per question type with the clips and
    with every frame blanked, and the seconds it took.

    Raises MmloomError when `out` is a non-empty folder the demo did not make, or a step fails."""
    out = Path(out).resolve()
    size = size or (QUICK if quick else FULL)
    start = time.perf_counter()
    steps.prepare_output(out)
    run = steps.Runner(out)

    print("[1/7] synthetic clips: two shapes, one moving left/right/up/down, appearing one after the other; "
          "captions, Q/A and a held-out split")
    write_dataset(out / "data", size.num_train, size.num_eval, seed=0)
    print(f"      {size.num_train} training clips, {size.num_eval} held-out clips (MPEG-4, {FRAMES} frames of "
          f"{SIZE} x {SIZE} at {FPS} fps) in {out / 'data'}")

    print("[2/7] a BPE tokenizer trained offline on the demo's text (special tokens <image>, <video>)")
    vocab_size, video_token_id = steps.train_tokenizer(out, ["<image>", "<video>"], "<video>")
    image_token_id = video_token_id - 1
    print(f"      vocabulary {vocab_size}, <video> = {video_token_id}, saved in {out / 'tokenizer'}")

    print(f"[3/7] HDF5 datasets: {NUM_FRAMES} frames of each clip decoded uniformly and counted (2 x 2 pooled "
          "features per frame, one newline per clip)")
    steps.build_data(run, out, dataset_section(out))

    print("[4/7] training: phase 1 (alignment; the random tower and LLM train too, nothing is pretrained), "
          "then phase 2 (instruction tuning, vision tower frozen)")
    model = steps.train_phases(
        run, out, lambda phase: video_train_config(out, phase, size, vocab_size, image_token_id, video_token_id))

    print("[5/7] held-out evaluation: greedy answers, exact match per question type")
    media = ["--video-dir", out / "data"]
    results = {"with video": steps.evaluate(run, out, model, "video", media, max_new_tokens=6)}
    print("[6/7] the same evaluation with every frame blanked to its mean colour")
    results["blank video"] = steps.evaluate(run, out, model, "blank", media, max_new_tokens=6,
                                            extra=["--blank-videos"])

    print("[7/7] example chats and the loss curves")
    steps.show_examples(run, out, model, "video")
    return steps.finish(out, start, quick, results, "video demo")
