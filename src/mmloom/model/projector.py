"""The projector that maps encoder features into the language model's embedding space."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2CLS, ACT2FN

from mmloom.errors import MmloomError
from mmloom.model.outputs import encoder_hidden_size, feature_width

# LLaVA's spelled-out projector names: "mlp2x_gelu" = Linear, GELU, Linear.
_MLP_SPELLED = re.compile(r"^mlp(\d+)x_(\w+)$")

# Names PretrainedConfig itself accepts or writes (config.json round trips pass them back).
_BASE_CONFIG_KEYS = frozenset(PretrainedConfig().to_dict()) | {
    "name_or_path", "_name_or_path", "torch_dtype", "dtype", "transformers_version", "model_type",
    "architectures", "_commit_hash", "_attn_implementation_autoset",
}


def text_embedding_width(config) -> int:
    """Width of a language model's input embeddings from its config: OPT-style
    `word_embed_proj_dim` when set, else `hidden_size` (of the text config for composite configs).
    Raises MmloomError when the config has neither."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    width = getattr(config, "word_embed_proj_dim", None) or getattr(config, "hidden_size", None)
    if not isinstance(width, int):
        raise MmloomError(f"cannot tell the embedding width of text config {type(config).__name__}")
    return width


class MultimodalProjectorConfig(PretrainedConfig):
    """Describes a projector: `projector_type` is `linear`, `mlp`, `mlp{N}x_{act}` or `custom`;
    `activation` any key of `transformers.activations.ACT2CLS`. Left unset (None), they are
    chosen by `MultimodalModel(init_projector_type=..., init_activation=...)`, else they mean
    `linear` and `gelu`.

    Cornstarch's spelling is accepted with the same meaning:
    `MultimodalProjectorConfig(encoder_config=..., text_config=..., projection_type=..., activation=...)`
    takes `in_features` from the encoder config's width (`hidden_size`, else `d_model`) and
    `out_features` from the text config's embedding width. Unknown keyword arguments raise
    MmloomError (they used to be stored silently and ignored).
    """

    model_type = "mmloom_projector"

    def __init__(
        self,
        in_features: int | None = None,
        out_features: int | None = None,
        projector_type: str | None = None,
        activation: str | None = None,
        bias: bool = True,
        encoder_config: PretrainedConfig | None = None,
        text_config: PretrainedConfig | None = None,
        projection_type: str | None = None,
        **kwargs,
    ):
        unknown = sorted(set(kwargs) - _BASE_CONFIG_KEYS - {"encoder_model_type", "language_model_type"})
        if unknown:
            raise MmloomError(
                f"MultimodalProjectorConfig got unknown argument(s) {unknown}; it takes in_features, out_features, "
                "projector_type (or projection_type), activation, bias, encoder_config, text_config"
            )
        if projector_type is not None and projection_type is not None and projector_type != projection_type:
            raise MmloomError(
                f"projector_type={projector_type!r} and projection_type={projection_type!r} disagree: give one"
            )
        self.encoder_model_type = kwargs.pop("encoder_model_type", None)
        self.language_model_type = kwargs.pop("language_model_type", None)
        if encoder_config is not None:
            try:
                width = encoder_hidden_size(encoder_config)
            except ValueError as exc:
                raise MmloomError(str(exc)) from None
            if in_features is not None and in_features != width:
                raise MmloomError(f"in_features={in_features} but encoder_config's width is {width}")
            in_features, self.encoder_model_type = width, getattr(encoder_config, "model_type", None)
        if text_config is not None:
            width = text_embedding_width(text_config)
            if out_features is not None and out_features != width:
                raise MmloomError(f"out_features={out_features} but text_config's embedding width is {width}")
            out_features, self.language_model_type = width, getattr(text_config, "model_type", None)
        self.in_features = in_features
        self.out_features = out_features
        # None = not chosen: MultimodalModel's init_projector_type / init_activation decide.
        self.projector_type = projector_type or projection_type
        self.activation = activation
        self.bias = bias
        super().__init__(**kwargs)


def parse_projector_type(projector_type: str, activation: str) -> tuple[int, str]:
    """Return (number of Linear layers, activation name) for a projector type string.
    Raises MmloomError for an unknown type or activation, or zero layers."""
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


def init_activation(name: str) -> nn.Module:
    """A new activation module for any key of `transformers.activations.ACT2CLS`, including the
    `(class, kwargs)` entries such as `gelu_10` (built by transformers' own `ACT2FN`).
    Raises MmloomError for an unknown name."""
    if name not in ACT2CLS:
        raise MmloomError(f"unknown activation {name!r}; valid: {', '.join(sorted(ACT2CLS))}")
    return ACT2FN[name]


def build_projection(config: MultimodalProjectorConfig) -> nn.Sequential:
    """Linear (act Linear)*: index 0, 2, 4... are Linear layers, as in LLaVA's `mm_projector`."""
    depth, activation = parse_projector_type(config.projector_type or "linear", config.activation or "gelu")
    layers: list[nn.Module] = [nn.Linear(config.in_features, config.out_features, bias=config.bias)]
    for _ in range(depth - 1):
        layers += [init_activation(activation), nn.Linear(config.out_features, config.out_features, bias=config.bias)]
    return nn.Sequential(*layers)


class MultimodalProjector(PreTrainedModel):
    """Wraps a projection module; builds one from the config when `projection` is None.

    A projector whose config lacks `in_features`/`out_features` is created lazily by
    `MultimodalModel`, which knows the encoder's and the language model's widths.
    `forward` takes features `(N, L, D_enc)`, `(T, D_enc)` or a list of `(L_i, D_enc)`, casts
    them to the projection's dtype, and returns the same form with width `D_llm`.
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
        """Whether the projection module exists (it is built once both widths are known)."""
        return self.projection is not None

    def build(self, in_features: int, out_features: int) -> None:
        """Create the projection module now that both widths are known."""
        self.config.in_features, self.config.out_features = in_features, out_features
        self.projection = build_projection(self.config)

    def _init_weights(self, module: nn.Module) -> None:
        # Projections keep PyTorch's default Linear init (as LLaVA does).
        pass

    def output_width(self, in_features: int) -> int:
        """Width the projection gives for `in_features`-wide input, from a dry run on one token.

        Raises MmloomError when the projection does not take such input."""
        param = next((p for p in self.parameters() if p.is_floating_point()), None)
        probe = torch.zeros(1, 1, in_features, dtype=param.dtype if param is not None else torch.float32,
                            device=param.device if param is not None else None)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                out = self(probe)
        except Exception as exc:  # noqa: BLE001 - any failure means the widths do not fit
            raise MmloomError(f"the projection does not take {in_features}-wide features: {exc}") from None
        finally:
            self.train(was_training)

        return feature_width(out)

    def forward(self, features: Any) -> Any:  # (N, L, D_enc) | (T, D_enc) | [(L_i, D_enc)] -> same, D_llm
        """Project encoder features to the LLM's width: (N, L, D_enc) or (T, D_enc) -> the same with
        D_llm, or a list of per-item (L_i, D_enc) -> a list of (L_i, D_llm). Raises MmloomError when the
        projection is not built yet or the features' width is not `config.in_features`."""
        if self.projection is None:
            raise MmloomError("projector has no projection module yet: build it inside a MultimodalModel")
        if isinstance(features, (list, tuple)):
            lengths = [f.shape[0] for f in features]
            return list(self(torch.cat(list(features))).split(lengths)) if features else []
        expected = self.config.in_features
        if expected is not None and features.shape[-1] != expected:
            raise MmloomError(
                f"the projector takes {expected}-wide features but got features of shape {tuple(features.shape)}: "
                "the encoder's width was guessed wrong or changed; give the projector explicitly, "
                "MultimodalProjector(MultimodalProjectorConfig(in_features=...))"
            )
        param = next((p for p in self.projection.parameters() if p.is_floating_point()), None)
        if param is not None and features.is_floating_point() and features.dtype != param.dtype:
            features = features.to(param.dtype)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.projection, features, use_reentrant=False)
        return self.projection(features)
