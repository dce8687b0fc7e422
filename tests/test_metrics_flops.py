"""MFU's FLOPs count what a step really runs: pinned by hand on a tiny CLIP + Llama composite.

Every expected value below is written out from the model's shapes (no call into the estimator's
own arithmetic), so a change in what is counted fails here.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from mmloom import FeatureSelect, ModalEncoderModule, MultimodalModel
from mmloom.data.collate import FeatureCollator, PackedCollator, TrainCollator
from mmloom.training.metrics import FlopsEstimator, StepWork, batch_work

PAD, BOS, IMAGE_ID, MSL, N_IMG = 0, 1, 63, 32, 16

# Shapes (see `model()`), and the weight-matrix entries they give:
# CLIP 32 px / patch 8: 16 patches + CLS = 17 positions, hidden 32, MLP 64, 2 layers, 4 heads.
#   per layer q, k, v, out 4 x 32 x 32 = 4096, fc1 32 x 64 = 2048, fc2 64 x 32 = 2048 -> 8192;
#   2 layers -> 16384 linear; patch conv 32 x 3 x 8 x 8 = 6144 (at the 16 patches).
#   attention forward 4 x 2 layers x 17^2 x 32 = 73984 per image.
# Frozen, forward only: 17 x 2 x 16384 + 16 x 2 x 6144 + 73984 = 557056 + 196608 + 73984.
VISION_PER_IMAGE = 17 * 2 * 16384 + 16 * 2 * 6144 + 4 * 2 * 17**2 * 32
assert VISION_PER_IMAGE == 827648
# Projector mlp2x_gelu 32 -> 16 -> 16: 512 + 256 = 768 entries, trains; 16 features per image.
# The vision encoder is frozen, so no input gradient: forward 2 x 768 + weight gradient 2 x 768.
PROJECTOR_PER_IMAGE = 16 * (2 * 768 + 2 * 768)
# Llama hidden 16, MLP 40, 2 layers, 4 heads x head_dim 4 (width 16), 2 KV heads (k, v 16 x 8).
#   per layer q 256 + k 128 + v 128 + o 256 + gate, up, down 3 x 640 = 2688; 2 layers -> 5376.
#   LM head 16 x 64 = 1024 (untied). Input embeddings are lookups: not counted.
DECODER = 5376
HEAD = 1024
# Attention per causal (query, key) pair, forward: 4 x 2 layers x width 16 = 128.
PAIR_FWD = 4 * 2 * 16


def model(freeze_llm: bool = False) -> MultimodalModel:
    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4))
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    m = MultimodalModel({"vision": ModalEncoderModule(clip, postprocess_module_callback=FeatureSelect(-2, "patch"))},
                        llm, init_projector_type="mlp2x_gelu", placeholder_token_ids={"vision": IMAGE_ID})
    m.freeze(["^image_model", "^text_model"] if freeze_llm else ["^image_model"])
    return m


def item(has_image: bool, after: int, supervised: int) -> dict:
    """HDF5 layout: BOS, 2 prompt tokens, 16 image slots (masked when text-only), `after` tokens,
    the last `supervised` of them supervised."""
    ids = [BOS, 10, 11, *([PAD] * N_IMG), *range(12, 12 + after)]
    n = len(ids)
    text_ids = torch.full((MSL,), PAD, dtype=torch.int32)
    text_ids[:n] = torch.tensor(ids)
    kpm = torch.ones(MSL, dtype=torch.int32)
    kpm[:n] = 0
    if not has_image:
        kpm[3 : 3 + N_IMG] = 1
    loss_mask = torch.zeros(MSL, dtype=torch.int32)
    loss_mask[n - 1 - supervised : n - 1] = 1  # token t predicts t + 1
    return {"text_input_ids": text_ids, "key_padding_mask": kpm, "loss_mask": loss_mask, "has_image": has_image,
            "image_data": torch.zeros(3, 32, 32) if not has_image else torch.randn(3, 32, 32),
            "image_start_idx": 3}


# An image sample of 24 real tokens and a text-only one of 10 (2 + 1 + 7), 3 supervised each.
ITEMS = [item(True, 5, 3), item(False, 7, 3)]
REAL = 24 + 10
PAIRS = 24 * 25 // 2 + 10 * 11 // 2  # 300 + 55: one causal triangle per sample


def test_padded_batch_phase2_by_hand():
    batch = TrainCollator(IMAGE_ID, PAD, N_IMG)(ITEMS)
    work = batch_work(batch)
    # The text-only sample gets a dummy image that the encoder really runs on: 2 images.
    assert work == StepWork(tokens=REAL, attention_pairs=PAIRS, head_positions=6, encoder_images=2,
                            projected_images=2)
    est = FlopsEstimator(model(), image_positions=17, feature_tokens=16)
    # LLM trains: every weight 2 (forward) + 2 (input gradient) + 2 (weight gradient) = 6 per entry;
    # attention has no weights: forward + 2x for the backward.
    expected = (
        2 * VISION_PER_IMAGE  # 1655296
        + 2 * PROJECTOR_PER_IMAGE  # 98304
        + REAL * 6 * DECODER  # 34 x 32256 = 1096704
        + PAIRS * 3 * PAIR_FWD  # 355 x 384 = 136320
        + 6 * 6 * HEAD  # LM head at the 6 supervised positions only: 36864
    )
    assert expected == 3023488
    assert est.flops(work) == expected
    assert est.batch_flops(batch) == expected
    parts = est.parts(work)
    assert parts["lm_head"] == 36864 and parts["attention"] == 136320 and parts["vision"] == 1655296


def test_full_logits_count_the_head_at_every_real_position():
    batch = TrainCollator(IMAGE_ID, PAD, N_IMG)(ITEMS)
    est = FlopsEstimator(model(), image_positions=17, feature_tokens=16)
    gap = est.batch_flops(batch, supervised_only=False) - est.batch_flops(batch)
    assert gap == (REAL - 6) * 6 * HEAD  # 28 more positions x 6144


def test_packed_batch_runs_no_dummy_image():
    packed = PackedCollator(TrainCollator(IMAGE_ID, PAD, N_IMG))(ITEMS)
    work = batch_work(packed)
    # Same samples: same tokens and per-sample triangles (not one 34-token triangle), same
    # supervised positions; the micro-batch has a real image, so no dummy one runs.
    assert work == StepWork(tokens=REAL, attention_pairs=PAIRS, head_positions=6, encoder_images=1,
                            projected_images=1)
    est = FlopsEstimator(model(), image_positions=17, feature_tokens=16)
    assert est.flops(work) == 3023488 - VISION_PER_IMAGE - PROJECTOR_PER_IMAGE


def test_cached_features_run_no_encoder():
    items = [{**it, "module_features": torch.zeros(N_IMG, 32)} for it in ITEMS]
    for it in items:
        del it["image_data"]
    batch = FeatureCollator(TrainCollator(IMAGE_ID, PAD, N_IMG))(items)
    work = batch_work(batch)
    assert work.encoder_images == 0 and work.projected_images == 2
    est = FlopsEstimator(model(), image_positions=17, feature_tokens=16)
    assert est.flops(work) == 3023488 - 2 * VISION_PER_IMAGE


def test_phase1_frozen_llm_still_backpropagates_to_the_projector():
    batch = TrainCollator(IMAGE_ID, PAD, N_IMG)(ITEMS)
    est = FlopsEstimator(model(freeze_llm=True), image_positions=17, feature_tokens=16)
    # Frozen LLM: forward + input gradient (4 per entry), no weight gradient; attention still 3x.
    expected = (2 * VISION_PER_IMAGE + 2 * PROJECTOR_PER_IMAGE + REAL * 4 * DECODER + PAIRS * 3 * PAIR_FWD
                + 6 * 4 * HEAD)
    assert expected == 2645632  # 1655296 + 98304 + 731136 + 136320 + 24576
    assert est.batch_flops(batch) == expected


def test_work_adds_up_over_micro_batches_and_ranks():
    a = StepWork(10, 55, 3, 1, 1)
    b = StepWork(4, 10, 1, 0, 1)
    assert a + b == StepWork(14, 65, 4, 1, 2)
    assert StepWork.from_list((a + b).to_list()) == a + b
