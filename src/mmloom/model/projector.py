"""The projector that maps encoder features into the language model's embedding space."""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2CLS

from mmloom.errors import MmloomError

# LLaVA's spelled-out projector names: "mlp2x_gelu" = Linear, GELU, Linear.
_MLP_SPELLED = re.compile(r"^mlp(\d+)x_(\w+)$")


class MultimodalProjectorConfig(PretrainedConfig):
    """Describes a projector: `projector_type` is `linear`, `mlp`, `mlp{N}x_{act}` or `custom`."""

    model_type = "mmloom_projector"

    def __init__(
        self,
        in_features: int | None = None,
        out_features: int | None = None,
        projector_type: str = "linear",
        activation: str = "gelu",
        bias: bool = True,
        **kwargs,
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.projector_type = projector_type
        self.activation = activation
        self.bias = bias
        super().__init__(**kwargs)


def parse_projector_type(projector_type: str, activation: str) -> tuple[int, str]:
    """Return (number of Linear layers, activation name) for a projector type string."""
    if projector_type == "linear":
        return 1, activation
    if projector_type == "mlp":
        depth = 2
    elif match := _MLP_SPELLED.match(projector_type):
        depth, activation = int(match.group(1)), match.group(2)
    else:
        raise MmloomError(
            f"unknown projector type {projector_type!r}: use 'linear', 'mlp' or 'mlp{{N}}x_{{act}}' "
            "(e.g. 'mlp2x_gelu')"
        )
    if activation not in ACT2CLS:
        raise MmloomError(f"unknown activation {activation!r}; valid: {', '.join(sorted(ACT2CLS))}")
    if depth < 1:
        raise MmloomError(f"projector type {projector_type!r} needs at least one layer")
    return depth, activation


def build_projection(config: MultimodalProjectorConfig) -> nn.Sequential:
    """Linear (act Linear)*: index 0, 2, 4... are Linear layers, as in LLaVA's `mm_projector`."""
    depth, activation = parse_projector_type(config.projector_type, config.activation)
    layers: list[nn.Module] = [nn.Linear(config.in_features, config.out_features, bias=config.bias)]
    for _ in range(depth - 1):
        layers += [ACT2CLS[activation](), nn.Linear(config.out_features, config.out_features, bias=config.bias)]
    return nn.Sequential(*layers)


class MultimodalProjector(PreTrainedModel):
    """Wraps a projection module; builds one from the config when `projection` is None.

    A projector whose config lacks `in_features`/`out_features` is created lazily by
    `MultimodalModel`, which knows the encoder's and the language model's hidden sizes.
    """

    config_class = MultimodalProjectorConfig
    base_model_prefix = "projector"
    supports_gradient_checkpointing = True
    _no_split_modules: list[str] = []

    def __init__(self, config: MultimodalProjectorConfig, projection: nn.Module | None = None):
        super().__init__(config)
        if projection is not None:
            config.projector_type = "custom"
        elif config.in_features is not None and config.out_features is not None:
            projection = build_projection(config)
        self.projection = projection
        self.gradient_checkpointing = False
        self.post_init()

    @property
    def is_built(self) -> bool:
        return self.projection is not None

    def build(self, in_features: int, out_features: int) -> None:
        """Create the projection module now that both hidden sizes are known."""
        self.config.in_features, self.config.out_features = in_features, out_features
        self.projection = build_projection(self.config)

    def _init_weights(self, module: nn.Module) -> None:
        # Projections keep PyTorch's default Linear init (as LLaVA does).
        pass

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # (N, L, D_enc) -> (N, L, D_llm)
        if self.projection is None:
            raise MmloomError("projector has no projection module yet: build it inside a MultimodalModel")
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.projection, features, use_reentrant=False)
        return self.projection(features)
