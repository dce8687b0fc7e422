"""`mmloom demo --modality audio`: the LLaVA recipe for an audio-LLM on synthetic sounds, through
mmloom's own commands (printed before they run), as the vision demo does for scenes.

A tiny random Whisper-style encoder (log-mel input, 2 conv layers, 2 transformer layers) and a
tiny random Llama learn, in two phases, to describe synthetic clips (beeps, sweeps, noise) and to
answer questions about them; the held-out evaluation is repeated with every clip silenced.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from mmloom.demo.pipeline import Runner, prepare_output, write_yaml
from mmloom.demo.sounds import SAMPLE_RATE, write_dataset
from mmloom.processing.templates import VICUNA_SYSTEM
from mmloom.tokenization import train_bpe_tokenizer


@dataclass(frozen=True)
class AudioDemoSize:
    num_train: int
    num_eval: int
    phase1_steps: int
    phase2_steps: int
    batch_size: int


FULL = AudioDemoSize(num_train=6000, num_eval=300, phase1_steps=700, phase2_steps=700, batch_size=32)
QUICK = AudioDemoSize(num_train=800, num_eval=40, phase1_steps=150, phase2_steps=150, batch_size=16)

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
TEXT = {
    "model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}


def data_config(out: Path, phase: int, msl: int) -> dict:
    return {
        "setup": {"input_dir": str(out / "data" / f"phase{phase}"), "output_dir": str(out / "h5" / f"phase{phase}"),
                  "processes": 2},
        "processor": {"tokenizer_type": str(out / "tokenizer"), "max_sequence_length": msl},
        "dataset": {"system_prompt_style": "plain" if phase == 1 else "vicuna_v1",
                    "audio": {"feature_extractor": FEATURE_EXTRACTOR, "audio_dir": str(out / "data"),
                              "stride": STRIDE}},
    }


def train_config(out: Path, phase: int, size: AudioDemoSize, vocab_size: int, audio_token_id: int) -> dict:
    # one worker decodes clips and computes log-mel features while the main process trains
    data = {"data_dir": str(out / "h5" / f"phase{phase}"), "batch_size": size.batch_size, "shuffle": True,
            "num_workers": 1}
    model: dict = {"projector": "mlp2x_gelu", "loss_scaling": "num_tokens"}
    if phase == 1:
        # Nothing is pretrained: phase 1 trains the encoder and the LLM too (LLaVA's phase 1 would
        # freeze both with freeze: ["^audio_encoder.module", "^text_model"]).
        model |= {"encoders": {"audio": {"model": AUDIO, "pooling": {"stride": STRIDE, "mode": "mean"},
                                         "token_id": audio_token_id}},
                  "text_model": {**TEXT, "vocab_size": vocab_size}, "freeze": []}
        run = {"max_steps": size.phase1_steps}
    else:
        # phase 2: the audio encoder stays frozen, projector + LLM train
        model |= {"init_from": str(out / "runs" / "phase1" / "final_model"), "freeze": ["^audio_encoder.module"]}
        run = {"max_steps": size.phase2_steps}
    return {
        "train_input": data,
        "model": model,
        "optimizer": {"lr": 1e-3, "weight_decay": 0.0, "max_gradient_norm": 1.0},
        "schedule": {"warmup_ratio": 0.05, "decay": "cosine"},
        "runconfig": {**run, "checkpoint_steps": max(run["max_steps"] // 2, 1), "keep_last": 1,
                      "log_steps": max(run["max_steps"] // 10, 1), "seed": 0},
    }


def train_tokenizer(out: Path) -> tuple[int, int]:
    """A byte-level BPE tokenizer trained on the demo's own text, with `<audio>` as a special token."""
    texts = [VICUNA_SYSTEM, "USER: ASSISTANT:"]
    for name in ("phase1/train.jsonl", "phase2/train.jsonl"):
        for line in (out / "data" / name).read_text().splitlines():
            texts += [turn["value"] for turn in json.loads(line)["conversations"]]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=600, extra_special_tokens=("<image>", "<audio>"))
    tokenizer.save_pretrained(out / "tokenizer")
    return len(tokenizer), tokenizer.convert_tokens_to_ids("<audio>")


def run_audio_demo(out: str | Path = "runs/demo-audio", quick: bool = False, size: AudioDemoSize | None = None) -> dict:
    """Run the audio pipeline; returns the accuracy figures (with the audio and silenced) and the time."""
    out = Path(out).resolve()
    size = size or (QUICK if quick else FULL)
    start = time.perf_counter()
    prepare_output(out)
    run = Runner(out)

    print("[1/7] synthetic sounds: 1-4 beeps (low/middle/high), rising or falling sweeps, noise; captions, "
          "Q/A and a held-out split")
    write_dataset(out / "data", size.num_train, size.num_eval, seed=0)
    print(f"      {size.num_train} training clips, {size.num_eval} held-out clips (WAV, {SAMPLE_RATE} Hz, read at "
          f"{FEATURE_EXTRACTOR['sampling_rate']} Hz) in "
          f"{out / 'data'}")

    print("[2/7] a BPE tokenizer trained offline on the demo's text (special token <audio>)")
    vocab_size, audio_token_id = train_tokenizer(out)
    print(f"      vocabulary {vocab_size}, <audio> = {audio_token_id}, saved in {out / 'tokenizer'}")

    print("[3/7] HDF5 datasets: each clip decoded, turned into Whisper log-mel features and counted "
          f"(real length, {STRIDE} encoder positions per token)")
    for phase, msl in ((1, 64), (2, 192)):
        run.mmloom("data", "build", write_yaml(out / "configs" / f"data_phase{phase}.yaml",
                                               data_config(out, phase, msl)), "--quiet")

    print("[4/7] training: phase 1 (alignment; the random encoder and LLM train too, nothing is pretrained), "
          "then phase 2 (instruction tuning, audio encoder frozen)")
    for phase in (1, 2):
        config = write_yaml(out / "configs" / f"train_phase{phase}.yaml",
                            train_config(out, phase, size, vocab_size, audio_token_id))
        run.mmloom("train", config, "--model-dir", out / "runs" / f"phase{phase}")
    model = out / "runs" / "phase2" / "final_model"

    print("[5/7] held-out evaluation: greedy answers, exact match per question type")
    questions, references = out / "data" / "eval" / "questions.jsonl", out / "data" / "eval" / "references.jsonl"
    results = {}
    for label, extra in (("with audio", []), ("silenced audio", ["--silence-audio"])):
        if extra:
            print("[6/7] the same evaluation with every clip silenced: answers must fall to the majority answer")
        answers = out / "eval" / f"answers_{'silenced' if extra else 'audio'}.jsonl"
        scores = answers.with_suffix(".scores.json")
        run.mmloom("generate", model, questions, "--output", answers, "--audio-dir", out / "data",
                   "--batch-size", 64, "--max-new-tokens", 8, *extra)
        run.mmloom("score", answers, "--references", references, "--metric", "exact", "--by", "type",
                   "--output-json", scores)
        results[label] = json.loads(scores.read_text())

    print("[7/7] example chats and the loss curves")
    held_out = [json.loads(line) for line in questions.read_text().splitlines()]
    for example in (held_out[0], held_out[len(held_out) // 2], held_out[-1]):
        run.mmloom("chat", model, "--audio", out / "data" / example["audio"], "--prompt", example["text"],
                   "--max-new-tokens", 8)
    for phase in (1, 2):
        run.mmloom("plot", out / "runs" / f"phase{phase}")

    elapsed = time.perf_counter() - start
    summary = {"seconds": round(elapsed, 1), "quick": quick, **results}
    (out / "demo_results.json").write_text(json.dumps(summary, indent=2))
    print(f"\naudio demo finished in {elapsed:.0f} s; results in {out / 'demo_results.json'}")
    return summary
