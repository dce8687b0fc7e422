"""The media items of HDF5 samples beyond the seed's one image (the item datasets of
`mmloom.data.h5_format`): each item read through its modality's spec and turned into encoder
inputs exactly as the build counted it.
"""

from __future__ import annotations

from typing import Any

import torch

from mmloom.errors import MmloomError
from mmloom.processing.media_spec import MediaError, MediaSpec


class MediaItemReader:
    """Reads one modality's items of a sample: the spec's `load` and `encoder_inputs`, and a check
    that each item still gives the feature-token count its span in the data says.

    `spec` comes from the data (`MediaSpec.from_data`: the settings the build read and counted
    with, the item folder). Each item becomes its encoder inputs without the batch dimension
    (`MediaSpec.encoder_inputs` of the one item) plus `"span": (start, length)`, its slots in the
    sample's row; floating inputs in `dtype`.
    """

    def __init__(self, spec: MediaSpec, dtype: torch.dtype = torch.float32):
        self.spec = spec
        self.dtype = dtype

    @property
    def modality(self) -> str:
        return self.spec.modality

    def _item(self, inputs: dict[str, Any], span: tuple[int, int]) -> dict[str, Any]:
        item = {key: value.to(self.dtype) if torch.is_floating_point(value) else value
                for key, value in inputs.items() if torch.is_tensor(value)}
        return {**item, "span": (int(span[0]), int(span[1]))}

    def item(self, relative: str, span: tuple[int, int], index: int) -> dict[str, Any]:
        """Item `relative` (a path under the spec's folder) of sample `index`, whose slots are `span`.
        Raises MmloomError (naming the sample) when it cannot be read or no longer fits its span."""
        path = self.spec.path(relative)
        try:
            loaded = self.spec.load(path)
        except MediaError as exc:
            raise MmloomError(f"sample {index}: {exc}") from None
        inputs = self.spec.encoder_inputs([loaded])
        (tokens,) = self.spec.token_counts([loaded], inputs)
        if tokens != int(span[1]):
            raise MmloomError(
                f"sample {index}: {self.spec.noun} {path} gives {tokens} feature tokens but the data holds {span[1]} "
                f"slots for it (the file or the {self.spec.noun} settings changed since `mmloom data build`)"
            )
        return self._item(inputs, span)

    def dummy(self) -> dict[str, Any]:
        """The spec's dummy item (`MediaSpec.dummy`) with its span `(0, tokens)`."""
        inputs, tokens = self.spec.dummy()
        return self._item(inputs, (0, tokens))
