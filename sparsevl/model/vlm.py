"""The LLaVA-style model: vision tower -> projector -> merge into text embeddings -> causal LM -> logits.

Text arrives with one `<image>` placeholder token per image; `prepare_inputs` replaces each placeholder
by that image's projected tokens, so the number of visual tokens may differ per model (pruning before
the LLM, Q-Former) without the data pipeline knowing.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from sparsevl.model.cache_kwarg import cache_kwarg
from sparsevl.model.decoder import LayerwiseCache, decoder_forward
from sparsevl.model.pruning import PruningContext, PruningPlan
from sparsevl.model.vision_pruning import cls_attention_patches, visionzip_features
from sparsevl.model.vision import VisionTower

IGNORE_INDEX = -100


@dataclass
class MultimodalInputs:
    """Merged, padded inputs for the LLM; all tensors (batch, seq[, dim])."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    image_mask: torch.Tensor  # True where the token is a visual token
    copies: int = 1  # rows per sample: k when adaptive training runs each sample with k vision layers


@dataclass
class VLMOutput:
    logits: torch.Tensor  # (batch, seq, vocab)
    losses: dict[str, torch.Tensor]  # named losses: "lm", the projector's auxiliary ones, "llm_*" of LLM modules
    inputs: MultimodalInputs
    selected_layers: torch.Tensor | None = None  # (images,) vision hidden-state index per image (adaptive training)
    last_hidden_state: torch.Tensor | None = None  # (batch, kept seq, dim), from the decoder loop only
    kept_index: torch.Tensor | None = None  # (batch, kept seq) position in `inputs` of each output; None: all
    kept_mask: torch.Tensor | None = None  # (batch, kept seq) True at real (not fill) positions


class SparseVLM(nn.Module):
    """Vision tower + projector + any transformers causal LM.

    With a `pruning` plan set, visual tokens are dropped (before the LLM for cls_attention, else between
    decoder layers by our own decoder loop); without one the LLM's own forward runs. With a `layer_selector`
    (sparsevl.model.adaptive) each image's vision layer is chosen per image instead of the tower's fixed
    `select_layer`; in training the selector also prepares the inputs of the layer(s) the LM trains on.
    """

    def __init__(self, *, vision_tower: VisionTower, projector: nn.Module, llm: PreTrainedModel, image_token_id: int,
                 pruning: PruningPlan | None = None, layer_selector: nn.Module | None = None):
        super().__init__()
        self.vision_tower = vision_tower
        self.projector = projector
        self.llm = llm
        self.image_token_id = image_token_id
        self.pruning = pruning
        self.layer_selector = layer_selector

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image entering the LLM (after any pruning before the LLM)."""
        if self.pruning is not None and self.pruning.before_llm:
            return self.pruning.tokens_entering_llm
        return self.num_projected_tokens

    @property
    def num_projected_tokens(self) -> int:
        """Visual tokens per image out of the projector (which may change the vision tower's count)."""
        return getattr(self.projector, "num_output_tokens", None) or self.vision_tower.num_output_tokens

    @property
    def prunes_in_llm(self) -> bool:
        return self.pruning is not None and bool(self.pruning.steps)

    def encode_images(self, pixel_values: torch.Tensor, *, instruction: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(images, channels, height, width) -> projected visual tokens (images, tokens, llm_dim), aux losses.

        With a layer selector, each image's most likely layer (`instruction`: (images, dim) text for its classifier).
        """
        prunes_before_llm = self.pruning is not None and self.pruning.before_llm
        if self.layer_selector is not None:
            if prunes_before_llm:
                raise ValueError(f"--token_pruner {self.pruning.pruner} reads the fixed --mm_vision_select_layer and "
                                 "cannot be combined with --use_adaptive_layer_selection")
            return self.projector(self.layer_selector.select_features(self.vision_tower, pixel_values, instruction))
        if not prunes_before_llm:
            features = self.vision_tower(pixel_values)  # (images, patches, vision_dim)
            return self.projector(features)
        hidden_states = self.vision_tower.all_hidden_states(pixel_values)
        if self.pruning.pruner == "visionzip":
            return self.projector(visionzip_features(self.vision_tower, hidden_states, self.pruning)[0])
        features = self.vision_tower.select_tokens(hidden_states[self.vision_tower.select_layer])
        kept = cls_attention_patches(self.vision_tower, hidden_states, self.pruning.num_kept_patches)
        embeds, losses = self.projector(features)  # (images, patches, llm_dim)
        return embeds.gather(1, kept[..., None].expand(-1, -1, embeds.shape[-1])), losses

    def prepare_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                       *, padding_side: str = "right") -> tuple[MultimodalInputs, dict[str, torch.Tensor]]:
        """Replace every `<image>` placeholder by its image's tokens and re-pad the batch."""
        text_embeds = self.llm.get_input_embeddings()(input_ids)  # (batch, seq, dim)
        if pixel_values is not None and len(pixel_values) > 0:
            instruction = None if self.layer_selector is None else self.layer_selector.instruction_per_image(
                text_embeds, input_ids, attention_mask, labels, image_token_id=self.image_token_id)
            image_embeds, aux_losses = self.encode_images(pixel_values, instruction=instruction)
        else:
            image_embeds, aux_losses = None, {}
        return self.merge_inputs(input_ids, attention_mask, text_embeds, image_embeds, labels,
                                 padding_side=padding_side), aux_losses

    def merge_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, text_embeds: torch.Tensor,
                     image_embeds: torch.Tensor | None, labels: torch.Tensor | None = None,
                     *, padding_side: str = "right") -> MultimodalInputs:
        """Splice projected images (images, tokens, dim), in placeholder order, into the text embeddings."""
        rows, next_image = [], 0
        for i in range(input_ids.shape[0]):
            keep = attention_mask[i].bool()
            row_labels = labels[i][keep] if labels is not None else None
            row, next_image = self._merge_row(input_ids[i][keep], text_embeds[i][keep], row_labels,
                                              image_embeds, next_image)
            rows.append(row)
        num_images = 0 if image_embeds is None else image_embeds.shape[0]
        if next_image != num_images:
            raise ValueError(f"the batch has {num_images} images but {next_image} {'<image>'} placeholders")
        return _pad_rows(rows, padding_side, with_labels=labels is not None)

    def _merge_row(self, ids, embeds, row_labels, image_embeds, next_image):
        """One sample: splice image tokens in at each placeholder. Returns (pieces dict, next image index)."""
        positions = (ids == self.image_token_id).nonzero().flatten().tolist()
        if positions and (image_embeds is None or next_image + len(positions) > image_embeds.shape[0]):
            have = 0 if image_embeds is None else image_embeds.shape[0]
            raise ValueError(f"text has more {'<image>'} placeholders than the {have} images given")
        embed_parts, label_parts, image_parts, start = [], [], [], 0
        for pos in positions:
            image = image_embeds[next_image]  # (tokens, dim)
            next_image += 1
            embed_parts += [embeds[start:pos], image.to(embeds.dtype)]
            image_parts += [torch.zeros(pos - start, dtype=torch.bool), torch.ones(len(image), dtype=torch.bool)]
            if row_labels is not None:
                label_parts += [row_labels[start:pos], row_labels.new_full((len(image),), IGNORE_INDEX)]
            start = pos + 1
        embed_parts.append(embeds[start:])
        image_parts.append(torch.zeros(len(ids) - start, dtype=torch.bool))
        if row_labels is not None:
            label_parts.append(row_labels[start:])
        row = {"embeds": torch.cat(embed_parts), "image_mask": torch.cat(image_parts).to(ids.device),
               "labels": torch.cat(label_parts) if row_labels is not None else None}
        return row, next_image

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                return_hidden_states: bool = False) -> VLMOutput:
        """Logits and named losses; with pruning (or `return_hidden_states`) via our decoder loop."""
        layer_pass, selected_layers = None, None
        has_images = pixel_values is not None and len(pixel_values) > 0
        if self.layer_selector is not None and self.training and labels is not None and has_images:
            layer_pass = self.layer_selector.training_pass(self, input_ids, attention_mask, pixel_values, labels)
            inputs, losses = layer_pass.inputs, layer_pass.losses
        else:
            inputs, losses = self.prepare_inputs(input_ids, attention_mask, pixel_values, labels)
        if not (self.prunes_in_llm or return_hidden_states):
            logits = self.lm_logits(inputs)
            losses = {**losses, **pop_module_losses(self.llm, prefix="llm_")}
            if inputs.labels is not None:
                losses = {"lm": causal_lm_loss(logits, inputs.labels), **losses}
            if layer_pass is not None:
                layer_losses, selected_layers = layer_pass.finish(logits, inputs.labels)
                losses.update(layer_losses)
            return VLMOutput(logits=logits, losses=losses, inputs=inputs, selected_layers=selected_layers)
        context = self.pruning_context(input_ids.repeat(inputs.copies, 1), attention_mask.repeat(inputs.copies, 1),
                                       inputs)
        out = decoder_forward(self.llm, inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids,
                              plan=self.pruning, context=context)
        losses = {**losses, **pop_module_losses(self.llm, prefix="llm_")}
        if inputs.labels is not None:
            kept_labels = inputs.labels.gather(1, out.kept_index).masked_fill(~out.kept_mask, IGNORE_INDEX)
            losses = {"lm": causal_lm_loss(out.logits, kept_labels), **losses}
            if layer_pass is not None:
                layer_losses, selected_layers = layer_pass.finish(out.logits, kept_labels)
                losses.update(layer_losses)
        return VLMOutput(logits=out.logits, losses=losses, inputs=inputs, last_hidden_state=out.last_hidden_state,
                         kept_index=out.kept_index, kept_mask=out.kept_mask, selected_layers=selected_layers)

    def pruning_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        inputs: MultimodalInputs) -> PruningContext:
        """Which merged tokens are visual, and which may rate them: instruction text after the first image
        (never answer tokens, which carry labels, so training ranks tokens as inference does)."""
        valid = inputs.attention_mask.bool()
        after_image = inputs.image_mask.long().cumsum(1) > 0
        raters = valid & ~inputs.image_mask & after_image
        if inputs.labels is not None:
            raters &= inputs.labels == IGNORE_INDEX
        images_per_row = ((input_ids == self.image_token_id) & attention_mask.bool()).sum(1)
        return PruningContext(inputs.image_mask, raters, images_per_row)

    def lm_logits(self, inputs: MultimodalInputs, **llm_kwargs) -> torch.Tensor:
        """The LLM over merged inputs, no cache: (batch, seq, vocab) (`logits_to_keep` may select positions)."""
        return self.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask,
                        position_ids=inputs.position_ids, use_cache=False, **llm_kwargs).logits

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None,
                 *, max_new_tokens: int = 16, eos_token_id: int, use_cache: bool = True,
                 temperature: float = 0.0, generator: torch.Generator | None = None,
                 on_inputs: Callable[[MultimodalInputs], None] | None = None,
                 on_token: Callable[[torch.Tensor], None] | None = None,
                 on_kept: Callable[[torch.Tensor], None] | None = None) -> list[list[int]]:
        """Greedy (temperature 0) or sampled decoding; returns each sample's new tokens, eos excluded.

        Streaming: `on_inputs` sees the merged prompt once (its `image_mask` says which positions are visual),
        `on_token` each step's tokens (batch,) as they are chosen (finished rows repeat eos), and `on_kept`,
        when a pruner runs inside the LLM, the prompt positions the last layer kept (batch, kept seq).
        """
        with torch.no_grad():  # a block, not a decorator: mutmut does not mutate decorated functions
            inputs, _ = self.prepare_inputs(input_ids, attention_mask, pixel_values, padding_side="left")
            if on_inputs is not None:
                on_inputs(inputs)
            embeds, mask, positions = inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids
            context = self.pruning_context(input_ids, attention_mask, inputs) if self.prunes_in_llm else None
            cache = DynamicCache() if use_cache and context is None else None
            step_embeds, step_positions = embeds, positions
            new_tokens = torch.empty(len(embeds), 0, dtype=torch.long, device=embeds.device)
            finished = torch.zeros(len(embeds), dtype=torch.bool, device=embeds.device)
            for _ in range(max_new_tokens):
                if context is None:
                    logits = self.llm(inputs_embeds=step_embeds, attention_mask=mask, position_ids=step_positions,
                                      use_cache=use_cache, **cache_kwarg(self.llm, cache)).logits[:, -1]
                else:
                    logits, cache, kept_index = self._pruned_step(step_embeds, mask, step_positions, context, cache,
                                                                  use_cache)
                    if on_kept is not None and new_tokens.shape[1] == 0:  # the prefill decided what is kept
                        on_kept(kept_index)
                token = _next_token(logits, temperature, generator)
                token = torch.where(finished, torch.full_like(token, eos_token_id), token)
                if on_token is not None:
                    on_token(token)
                new_tokens = torch.cat([new_tokens, token[:, None]], dim=1)
                finished |= token == eos_token_id
                if finished.all():
                    break
                token_embeds = self.llm.get_input_embeddings()(token[:, None])
                mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
                next_positions = positions[:, -1:] + 1
                positions = torch.cat([positions, next_positions], dim=1)
                if use_cache:
                    step_embeds, step_positions = token_embeds, next_positions
                else:
                    embeds = torch.cat([embeds, token_embeds], dim=1)
                    step_embeds, step_positions = embeds, positions
            return [_until_eos(row, eos_token_id) for row in new_tokens.tolist()]

    def _pruned_step(self, embeds, mask, positions, context: PruningContext, past: LayerwiseCache | None,
                     use_cache: bool) -> tuple[torch.Tensor, LayerwiseCache | None, torch.Tensor]:
        """Next-token logits through the decoder loop: prefill prunes; cached steps reuse each layer's kept KV;
        uncached steps re-run the whole sequence, rated by the same prompt tokens as the prefill.
        Returns the last position's logits, the caches and the kept input positions (-1 at merged or fill ones)."""
        out = decoder_forward(self.llm, embeds, mask, positions, plan=self.pruning,
                              context=context.padded_to(embeds.shape[1]) if past is None else None,
                              past=past, use_cache=use_cache, logits_to_keep=1, padding_side="left")
        return out.logits[:, -1], out.past, out.kept_index.masked_fill(~out.kept_mask, -1)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute layer activations in backward (`--gradient_checkpointing True`): the LLM's and the vision
        encoder's own checkpointing, with the keywords transformers' Trainer passes. Our decoder loop calls the
        same (checkpointed) decoder layers, so pruning runs checkpoint them too."""
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        for module in (self.llm, self.vision_tower.encoder):
            module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs,
                                                   every_n_layers=every_n_layers, offload=offload)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """transformers' older name of `activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)


def pop_module_losses(root: nn.Module, *, prefix: str) -> dict[str, torch.Tensor]:
    """Per name, the sum over submodules of the losses they kept from their last forward (a `pop_losses()`
    method, e.g. upcycled MoE FFNs: balance, z), named `prefix + name`. Summed over layers as in MoE-LLaVA."""
    totals: dict[str, torch.Tensor] = {}
    for module in root.modules():
        pop_losses = getattr(module, "pop_losses", None)
        if callable(pop_losses):
            for name, value in pop_losses().items():
                totals[prefix + name] = totals[prefix + name] + value if prefix + name in totals else value
    return totals


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions (0 when none is labelled)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (batch * (seq-1), vocab)
    shift_labels = labels[:, 1:].reshape(-1)
    if (shift_labels != IGNORE_INDEX).sum() == 0:
        return shift_logits.sum() * 0.0
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


def _pad_rows(rows: list[dict], padding_side: str, *, with_labels: bool) -> MultimodalInputs:
    batch, max_len = len(rows), max(len(r["embeds"]) for r in rows)
    dim, ref = rows[0]["embeds"].shape[-1], rows[0]["embeds"]
    embeds = ref.new_zeros(batch, max_len, dim)
    mask = torch.zeros(batch, max_len, dtype=torch.long, device=ref.device)
    positions = torch.zeros(batch, max_len, dtype=torch.long, device=ref.device)
    image_mask = torch.zeros(batch, max_len, dtype=torch.bool, device=ref.device)
    labels = torch.full((batch, max_len), IGNORE_INDEX, dtype=torch.long, device=ref.device) if with_labels else None
    for i, row in enumerate(rows):
        length = len(row["embeds"])
        span = slice(max_len - length, max_len) if padding_side == "left" else slice(0, length)
        embeds[i, span] = row["embeds"]
        mask[i, span] = 1
        positions[i, span] = torch.arange(length, device=ref.device)
        image_mask[i, span] = row["image_mask"]
        if with_labels:
            labels[i, span] = row["labels"]
    return MultimodalInputs(embeds, mask, positions, labels, image_mask)


def _next_token(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _until_eos(tokens: list[int], eos_token_id: int) -> list[int]:
    return tokens[: tokens.index(eos_token_id)] if eos_token_id in tokens else tokens
