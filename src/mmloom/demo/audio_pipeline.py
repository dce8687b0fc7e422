"""`mmloom demo --modality audio`: the LLaVA recipe for an audio-LLM on synthetic sounds, through
mmloom's own commands (printed before they run), as the vision demo does for scenes.

A tiny random Whisper-style encoder (log-mel input, 2 conv layers, 2 transformer layers) and a
tiny random Llama learn, in two phases, to describe synthetic clips (beeps, sweeps, noise) and to
answer questions about them; the held-out evaluation is repeated with every clip silenced. The
steps shared with the vision demo are in :mod:`mmloom.demo.steps`.
"""

from __future__ import annotations

import time
from pathlib import Path

from mmloom.demo import steps
from mmloom.demo.sounds import SAMPLE_RATE, write_dataset

FULL = steps.DemoSize(num_train=6000, num_eval=300, phase1_steps=600, phase2_steps=600, batch_size=32)
QUICK = steps.DemoSize(num_train=800, num_eval=40, phase1_steps=150, phase2_steps=150, batch_size=16)

# Whisper's own feature extractor settings (16 kHz, 25 ms window, 10 ms hop) with a 2 s window and
# 32 mel bins: 200 frames -> 100 encoder positions -> 25 tokens at most (stride 4). The clips are
# written at 8 kHz: every stage resamples them (soxr) to the extractor's 16 kHz.
FEATURE_EXTRACTOR = {"feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 32,
                     "sampling_rate": 16000, "hop_length": 160, "chunk_length": 2, "n_fft": 400}
STRIDE = 4
AUDIO = {
    "model_type": "whisper", "num_mel_bins": 32, "max_source_positions": 100, "d_model": 64,
    "encoder_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 128,
    # the decoder half of the config is unused (only the encoder is built)
    "decoder_layers": 1, "decoder_attention_heads": 4, "decoder_ffn_dim": 128, "max_target_positions": 16,
    "vocab_size": 64, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0, "decoder_start_token_id": 0,
}


def dataset_section(out: Path) -> dict:
    """The `dataset` keys of the sounds' build config: Whisper log-mel features, one token per
    `STRIDE` encoder positions."""
    return {"audio": {"feature_extractor": FEATURE_EXTRACTOR, "audio_dir": str(out / "data"), "stride": STRIDE}}


def audio_train_config(out: Path, phase: int, size: steps.DemoSize, vocab_size: int,
                       audio_token_id: int) -> dict:
    """The training config of a phase: the tiny random Whisper encoder, mean-pooled by `STRIDE`,
    + 2-layer MLP projector + tiny random Llama, loss averaged over supervised tokens."""
    # Nothing is pretrained: phase 1 trains the encoder and the LLM too (LLaVA's phase 1 would
    # freeze both with freeze: ["^audio_encoder.module", "^text_model"]); phase 2: the audio
    # encoder stays frozen, projector + LLM train.
    phase1 = {"encoders": {"audio": {"model": AUDIO, "pooling": {"stride": STRIDE, "mode": "mean"},
                                     "token_id": audio_token_id}},
              "text_model": {**steps.TEXT, "vocab_size": vocab_size}}
    model = steps.phase_model(out, phase, {"projector": "mlp2x_gelu", "loss_scaling": "num_tokens"}, phase1,
                        phase2_frozen=["^audio_encoder.module"])
    # one worker decodes clips and computes log-mel features while the main process trains
    return steps.train_config(out, phase, size, {"num_workers": 1}, model)


def run_audio_demo(out: str | Path = "runs/demo-audio", quick: bool = False,
                   size: steps.DemoSize | None = None) -> dict:
    """Run the audio pipeline in `out` (cleared first when a previous demo made it; `size` overrides
    the quick / full sizes); returns the exact-match accuracy per question type with the audio and
    with every clip silenced, and the seconds it took.

    Raises MmloomError when `out` is a non-empty folder the demo did not make, or a step fails."""
    out = Path(out).resolve()
    size = size or (QUICK if quick else FULL)
    start = time.perf_counter()
    steps.prepare_output(out)
    run = steps.Runner(out)

    print("[1/7] synthetic sounds: 1-4 beeps (low/middle/high), rising or falling sweeps, noise; captions, "
          "Q/A and a held-out split")
    write_dataset(out / "data", size.num_train, size.num_eval, seed=0)
    print(f"      {size.num_train} training clips, {size.num_eval} held-out clips (WAV, {SAMPLE_RATE} Hz, read at "
          f"{FEATURE_EXTRACTOR['sampling_rate']} Hz) in "
          f"{out / 'data'}")

    print("[2/7] a BPE tokenizer trained offline on the demo's text (special token <audio>)")
    vocab_size, audio_token_id = steps.train_tokenizer(out, ["<image>", "<audio>"], "<audio>")
    print(f"      vocabulary {vocab_size}, <audio> = {audio_token_id}, saved in {out / 'tokenizer'}")

    print("[3/7] HDF5 datasets: each clip decoded, turned into Whisper log-mel features and counted "
          f"(real length, {STRIDE} encoder positions per token)")
    steps.build_data(run, out, dataset_section(out))

    print("[4/7] training: phase 1 (alignment; the random encoder and LLM train too, nothing is pretrained), "
          "then phase 2 (instruction tuning, audio encoder frozen)")
    model = steps.train_phases(
        run, out, lambda phase: audio_train_config(out, phase, size, vocab_size, audio_token_id))

    print("[5/7] held-out evaluation: greedy answers, exact match per question type")
    media = ["--audio-dir", out / "data"]
    results = {"with audio": steps.evaluate(run, out, model, "audio", media, max_new_tokens=8)}
    print("[6/7] the same evaluation with every clip silenced: answers must fall to the majority answer")
    results["silenced audio"] = steps.evaluate(run, out, model, "silenced", media, max_new_tokens=8,
                                         extra=["--silence-audio"])

    print("[7/7] example chats and the loss curves")
    steps.show_examples(run, out, model, "audio")
    return steps.finish(out, start, quick, results, "audio demo")
