"""Vision tower: a transformers CLIP/SigLIP vision encoder read at one chosen layer (or all layers)."""

import torch
from torch import nn
from transformers import CLIPVisionModel, PreTrainedModel, SiglipVisionModel

SELECT_FEATURES = ("patch", "cls_patch")


class VisionTower(nn.Module):
    """Wraps a `CLIPVisionModel` / `SiglipVisionModel`; returns patch features of `select_layer`.

    select_feature "patch" drops CLIP's [CLS] token (LLaVA's default), "cls_patch" keeps it.
    SigLIP has no [CLS] token, so both give all patch tokens there.
    """

    def __init__(self, *, encoder: PreTrainedModel, select_layer: int = -2, select_feature: str = "patch"):
        super().__init__()
        if select_feature not in SELECT_FEATURES:
            raise ValueError(f"--mm_vision_select_feature must be one of {SELECT_FEATURES}, got {select_feature!r}")
        hidden_state_index(select_layer, encoder.config.num_hidden_layers, flag="--mm_vision_select_layer")
        self.encoder = encoder
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.has_cls_token = isinstance(encoder, CLIPVisionModel)

    @property
    def config(self):
        return self.encoder.config

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    @property
    def num_patches(self) -> int:
        return (self.config.image_size // self.config.patch_size) ** 2

    @property
    def num_output_tokens(self) -> int:
        keeps_cls = self.has_cls_token and self.select_feature == "cls_patch"
        return self.num_patches + int(keeps_cls)

    def all_hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Hidden states of the embeddings and every layer, each (images, tokens, dim)."""
        pixel_values = pixel_values.to(dtype=self.encoder.dtype)
        return self.encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states

    def select_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Drop the [CLS] token when the feature choice asks for patches only."""
        if self.has_cls_token and self.select_feature == "patch":
            return hidden_states[:, 1:]
        return hidden_states

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_states = self.all_hidden_states(pixel_values)[self.select_layer]  # (images, 1 + patches, dim)
        return self.select_tokens(hidden_states)


def hidden_state_index(layer: int, num_layers: int, *, flag: str) -> int:
    """A layer as the flags give it (0 = embeddings, negative counts from the end) -> index 0..num_layers."""
    if not -(num_layers + 1) <= layer <= num_layers:
        raise ValueError(f"{flag} {layer} is out of range for a vision tower with {num_layers} layers "
                         f"(valid: {-(num_layers + 1)}..{num_layers})")
    return layer % (num_layers + 1)


def vision_encoder_class(model_type: str) -> type[PreTrainedModel]:
    classes = {"clip_vision_model": CLIPVisionModel, "clip": CLIPVisionModel,
               "siglip_vision_model": SiglipVisionModel, "siglip": SiglipVisionModel}
    if model_type not in classes:
        raise ValueError(f"unsupported vision tower type {model_type!r}; supported: {sorted(classes)}")
    return classes[model_type]
