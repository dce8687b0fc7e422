"""`mmloom merge-lora`: fold PEFT LoRA adapters into the language model of a saved mmloom model."""

from __future__ import annotations

from pathlib import Path

from mmloom.errors import MmloomError
from mmloom.training.builder import resolve_weights_folder


def merge_lora(model_dir: str | Path, out_dir: str | Path):
    """Load the model (a model folder, a checkpoint, or a run folder: its final_model, else its latest
    checkpoint), merge the adapters (`merge_and_unload`) and save a plain mmloom model folder to `out_dir`
    (with the processor files when the source has them)."""
    from mmloom.processing.processor import PROCESSOR_CONFIG, MultimodalProcessor
    from mmloom.training.checkpoint import load_saved_model

    folder = resolve_weights_folder(model_dir)
    model = load_saved_model(folder)  # a trainable-only checkpoint: on the base its run config describes
    if not hasattr(model.language_model, "peft_config"):
        raise MmloomError(f"{folder}: the language model has no LoRA adapters to merge")
    model.language_model = model.language_model.merge_and_unload()
    model.save_pretrained(out_dir)
    if (folder / PROCESSOR_CONFIG).exists():
        MultimodalProcessor.from_pretrained(folder).save_pretrained(out_dir)
    return model
