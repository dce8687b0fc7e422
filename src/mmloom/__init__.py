"""mmloom: compose and train multimodal LLMs from HuggingFace parts (LLaVA-1.5 recipe)."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# A dependency outside the declared range fails here, with one clear message (mmloom.dependencies).
from mmloom.dependencies import check_installed  # noqa: E402

check_installed()

# Public names, imported lazily so that `mmloom --help` does not pay for torch/transformers.
_EXPORTS = {
    "MultimodalModel": "mmloom.model.multimodal",
    "MultimodalConfig": "mmloom.model.multimodal",
    "ModalEncoderModule": "mmloom.model.encoder",
    "MultimodalProjector": "mmloom.model.projector",
    "MultimodalProjectorConfig": "mmloom.model.projector",
    "FeatureSelect": "mmloom.model.callbacks",
    "AnyresPack": "mmloom.model.callbacks",
    "AudioPool": "mmloom.model.callbacks",
    "MultimodalProcessor": "mmloom.processing.processor",
    "get_template": "mmloom.processing.templates",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mmloom' has no attribute {name!r}")
