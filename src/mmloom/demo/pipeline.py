"""`mmloom demo`: the whole LLaVA pipeline on synthetic scenes, through mmloom's own commands.

Every step is a real `mmloom ...` command run in a subprocess and printed before it runs, so
the output doubles as a walkthrough to copy. Nothing is written outside the output folder. The
steps shared with the audio demo are in :mod:`mmloom.demo.steps`.
"""

from __future__ import annotations

import time
from pathlib import Path

from mmloom.demo import steps
from mmloom.demo.scenes import write_dataset

# pairs of scenes ("Which picture has more shapes?"): a quarter as many as the training scenes (one
# question each, against about four per scene), half as many as the held-out scenes
FULL = steps.DemoSize(num_train=8000, num_eval=300, phase1_steps=800, phase2_steps=500, batch_size=32,
                      num_pairs=(2000, 150))
QUICK = steps.DemoSize(num_train=1500, num_eval=60, phase1_steps=300, phase2_steps=150, batch_size=16,
                       num_pairs=(375, 30))

IMAGE_SIZE, PATCH_SIZE = 48, 16  # 3x3 patches: one per scene cell
VISION = {
    "model_type": "clip_vision_model", "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
    "projection_dim": 64,
}


def dataset_section(out: Path) -> dict:
    """The `dataset` keys of the scenes' build config: one feature token per image patch."""
    return {"num_patches": (IMAGE_SIZE // PATCH_SIZE) ** 2, "image_dir": str(out / "data")}


def vision_train_config(out: Path, phase: int, size: steps.DemoSize, vocab_size: int,
                        image_token_id: int) -> dict:
    """The training config of a phase: a tiny random CLIP tower (penultimate layer, patch features)
    + 2-layer MLP projector + tiny random Llama, loss averaged over supervised tokens."""
    common = {
        "projector": "mlp2x_gelu", "image_feature_select_layer_idx": -2,  # CLIP: patch features by default
        "image_token_id": image_token_id, "loss_scaling": "num_tokens",
    }
    # Nothing here is pretrained, so phase 1 trains the encoder and the LLM too (LLaVA's phase 1
    # would freeze both with freeze: ["^image_model", "^text_model"]); LLaVA's phase 2: the vision
    # encoder stays frozen, projector + LLM train.
    phase1 = {"image_model": VISION, "text_model": {**steps.TEXT, "vocab_size": vocab_size}}
    model = steps.phase_model(out, phase, common, phase1, phase2_frozen=["^image_model"])
    # one loader worker decodes the next batch's images on the other core while the main process trains
    train_input = {"img_data_dir": str(out / "data"), "image_size": IMAGE_SIZE, "num_workers": 1}
    return steps.train_config(out, phase, size, train_input, model)


def run_demo(out: str | Path = "runs/demo", quick: bool = False) -> dict:
    """Run the pipeline in `out` (cleared first when a previous demo made it); returns the exact-match
    accuracy per question type with the images and with blank images, and the seconds it took.

    Raises MmloomError when `out` is a non-empty folder the demo did not make, or a step fails."""
    out = Path(out).resolve()
    size = QUICK if quick else FULL
    start = time.perf_counter()
    steps.prepare_output(out)
    run = steps.Runner(out)

    print("[1/7] synthetic scenes: 1-3 coloured shapes on a 3x3 grid; captions, Q/A, pairs of scenes "
          "(which has more shapes) and a held-out split")
    write_dataset(out / "data", size.num_train, size.num_eval, seed=0, num_pairs=size.num_pairs)
    print(f"      {size.num_train} training scenes + {size.num_pairs[0]} pairs, {size.num_eval} held-out scenes + "
          f"{size.num_pairs[1]} pairs in {out / 'data'}")

    print("[2/7] a BPE tokenizer trained offline on the demo's text (special token <image>)")
    vocab_size, image_token_id = steps.train_tokenizer(out, ["<image>"], "<image>")
    print(f"      vocabulary {vocab_size}, <image> = {image_token_id}, saved in {out / 'tokenizer'}")

    print("[3/7] HDF5 datasets: phase 1 (plain captions) and phase 2 (vicuna_v1 conversations)")
    steps.build_data(run, out, dataset_section(out))

    print("[4/7] training: phase 1 (alignment; here the random encoder and LLM train too, since "
          "nothing is pretrained), then phase 2 (instruction tuning, vision encoder frozen)")
    model = steps.train_phases(
        run, out, lambda phase: vision_train_config(out, phase, size, vocab_size, image_token_id))

    print("[5/7] held-out evaluation: greedy answers, exact match per question type")
    media = ["--image-dir", out / "data"]
    results = {"with images": steps.evaluate(run, out, model, "images", media, max_new_tokens=6)}
    print("[6/7] the same evaluation with every image blanked: answers must fall to about chance")
    results["blank images"] = steps.evaluate(run, out, model, "blank", media, max_new_tokens=6,
                                             extra=["--blank-images"])

    print("[7/7] example chats and the loss curves")
    steps.show_examples(run, out, model, "image")
    return steps.finish(out, start, quick, results, "demo")
