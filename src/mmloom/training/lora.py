"""`mmloom merge-lora`: fold PEFT LoRA adapters into the language model of a saved mmloom model."""

from __future__ import annotations

from pathlib import Path

from mmloom.errors import MmloomError
from mmloom.training.builder import resolve_weights_folder


def merge_lora(model_dir: str | Path, out_dir: str | Path, overwrite: bool = False):
    """Load the model (a model folder, a checkpoint, or a run folder: its final_model, else its latest
    checkpoint), merge the adapters (`merge_and_unload`) and save a plain mmloom model folder to `out_dir`
    (with the processor files when the source has them).

    `out_dir` is claimed first (:func:`mmloom.outputs.check_destination`): new, an empty folder, or with
    `overwrite` an earlier `mmloom merge-lora` output, never inside `model_dir` or holding it. The model
    and its processor are written into a temporary sibling, verified and renamed into place together
    (:func:`mmloom.outputs.new_folder`). Raises MmloomError for a refused destination, a model without
    adapters, or a full disk (naming `out_dir` and the bytes needed)."""
    from mmloom.model.serialization import verify_weight_files, weight_bytes
    from mmloom.outputs import check_destination, new_folder
    from mmloom.processing.processor import PROCESSOR_CONFIG, MultimodalProcessor
    from mmloom.training.checkpoint import load_saved_model

    check_destination(out_dir, "merge-lora", overwrite=overwrite, sources=[model_dir])
    folder = resolve_weights_folder(model_dir)
    model = load_saved_model(folder)  # a trainable-only checkpoint: on the base its run config describes
    if not hasattr(model.language_model, "peft_config"):
        raise MmloomError(f"{folder}: the language model has no LoRA adapters to merge")
    model.language_model = model.language_model.merge_and_unload()
    with new_folder(out_dir, "merge-lora", needed=weight_bytes(model) + 2**20, verify=verify_weight_files) as tmp:
        model.save_pretrained(tmp)
        if (folder / PROCESSOR_CONFIG).exists():
            MultimodalProcessor.from_pretrained(folder).save_pretrained(tmp)
    return model
