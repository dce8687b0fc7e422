"""`mmloom merge-lora`: fold PEFT LoRA adapters into the language model of a saved mmloom model."""

from __future__ import annotations

from pathlib import Path

from mmloom.errors import MmloomError
from mmloom.training.builder import resolve_weights_folder


def merge_lora(model_dir: str | Path, out_dir: str | Path):
    """Load the model (a model folder or a run folder: its final_model, else its latest checkpoint),
    merge the adapters (`merge_and_unload`) and save a plain mmloom model folder to `out_dir`."""
    from mmloom.model.multimodal import MultimodalConfig, MultimodalModel

    folder = resolve_weights_folder(model_dir)
    config = MultimodalConfig.load(folder)
    if config.trainable_only:
        raise MmloomError(
            f"{folder} holds trainable weights only; merge the run's final_model (or a full save) instead"
        )
    model = MultimodalModel.from_pretrained(folder)
    if not hasattr(model.language_model, "peft_config"):
        raise MmloomError(f"{folder}: the language model has no LoRA adapters to merge")
    model.language_model = model.language_model.merge_and_unload()
    model.save_pretrained(out_dir)
    return model
