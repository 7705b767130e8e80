"""Adaptive vision-layer selection: a light classifier picks, per image, which vision layer feeds the projector.

The vision tower runs once and returns every layer's hidden states. In training the classifier's top-k layers
(or k uniformly random ones while exploring) are scored in one projector + LLM call of k x batch rows without
autograd; per sample, the layer with the lowest LM loss is the classifier's cross-entropy target (`layer_cls`).
`lm_loss_from` says which layer's LM loss trains the rest:
- "classifier" (default): the classifier's top choice, the layer inference will use; run once more with autograd,
  so a step costs k forward passes plus one forward-backward instead of k forward-backwards.
- "best": each sample's lowest-loss layer, run the same way. Picked with the answer in view, it rewards an LM that
  answers differently from each layer (one of them right), which the classifier cannot undo at inference.
- "all": every tried layer; the k x batch rows run once, with autograd, and their per-sample losses pick the
  classifier's target, so no layer can specialise in answers the others miss.
Inference uses the classifier's argmax.
The classifier reads detached inputs and the top-k choice is not differentiable, so `layer_cls` trains only the
classifier and the LM loss never reaches it.

Layers are hidden-state indices as `--mm_vision_select_layer` takes them: 0 is the embeddings, N the last layer.
"""

from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from sparsevl.model.moe import expert_stats_paused
from sparsevl.model.vision import hidden_state_index
from sparsevl.model.vlm import IGNORE_INDEX, MultimodalInputs

SELECTION_STATS_HEADER = "=== Layer selection stats ==="


class LayerClassifier(nn.Module):
    """Mean-pooled features of every candidate layer (+ the instruction embedding) -> logits over the candidates."""

    def __init__(self, *, vision_dim: int, num_layers: int, hidden_size: int, text_dim: int | None = None):
        super().__init__()
        self.feature_norm = nn.LayerNorm(vision_dim)
        self.text_norm = nn.LayerNorm(text_dim) if text_dim else None
        self.mlp = nn.Sequential(nn.Linear(num_layers * vision_dim + (text_dim or 0), hidden_size), nn.GELU(),
                                 nn.Linear(hidden_size, num_layers))

    def forward(self, layer_features: torch.Tensor, instruction: torch.Tensor | None = None) -> torch.Tensor:
        """layer_features (layers, images, tokens, dim), instruction (images, text_dim) -> logits (images, layers)."""
        pooled = self.feature_norm(layer_features.mean(dim=2))  # (layers, images, dim)
        x = pooled.transpose(0, 1).flatten(1)  # (images, layers * dim)
        if self.text_norm is not None:
            if instruction is None:
                raise ValueError("this layer classifier was built with --layer_classifier_use_text True "
                                 "but got no instruction text")
            x = torch.cat([x, self.text_norm(instruction)], dim=-1)
        return self.mlp(x)


@dataclass
class LayerTrainingPass:
    """One adaptive training step's inputs to the LLM and what it still owes: `finish` turns the LLM's logits into
    the classifier loss and the layer each image counts for. `tried` (k, images) candidate positions; with
    `target` unset, the inputs hold k copies of the batch (copy-major) and their losses pick it."""

    selector: "AdaptiveLayerSelector"
    inputs: MultimodalInputs
    losses: dict[str, torch.Tensor]
    layer_logits: torch.Tensor  # (images, candidates)
    tried: torch.Tensor
    sample_of_image: torch.Tensor  # (images,)
    has_labels: torch.Tensor  # (images,) whether the image's sample has labelled tokens
    target: torch.Tensor | None = None  # (images,) lowest-loss candidate position, when known before the LLM runs
    trained: torch.Tensor | None = None  # (images,) the candidate position whose LM loss trains the rest

    def finish(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """`layer_cls` and each image's vision layer (hidden-state index), from the trained pass's logits."""
        target, trained = self.target, self.trained
        if target is None:
            row_loss = per_row_lm_loss(logits.detach(), labels).view(len(self.tried), -1)  # (copies, batch)
            target = trained = lowest_loss_layer(row_loss, self.tried, self.sample_of_image)
        self.selector._record(trained)
        layers = torch.tensor(self.selector.candidate_layers, device=trained.device)[trained]
        return {"layer_cls": layer_classifier_loss(self.layer_logits, target, self.has_labels)}, layers


class AdaptiveLayerSelector(nn.Module):
    """Candidate layers, the classifier over them, and the selection counters (one count per image selected).

    In training an image counts for the layer that supplied its LM loss (with "all": its lowest-loss layer); in
    inference for its argmax layer.
    `reset_counts()` starts a new tally (the training callback does so when an epoch begins).
    """

    def __init__(self, *, classifier: LayerClassifier, candidate_layers: list[int], num_vision_layers: int,
                 top_k: int, use_text: bool, lm_loss_from: str = "classifier"):
        super().__init__()
        self.classifier = classifier
        self.candidate_layers = list(candidate_layers)  # hidden-state indices 0..num_vision_layers
        self.num_vision_layers = num_vision_layers
        self.use_text = use_text
        self.lm_loss_from = lm_loss_from  # which tried layers train the rest: "classifier" (top-1), "best" or "all"
        self.top_k = check_top_k(top_k, self.candidate_layers)
        self.exploration_rate = 0.0  # share of images that try random layers; set by the training callback
        self.forced_position: int | None = None  # inference on this candidate for every image (see `forced`)
        self.selection_counts = torch.zeros(len(self.candidate_layers), dtype=torch.long)  # CPU, not a weight

    # --- statistics -------------------------------------------------------------------------------------------
    def layer_names(self) -> list[str]:
        """'layer i (j)': hidden-state index i and its negative alias j (-1 = last layer)."""
        return [f"layer {i} ({i - self.num_vision_layers - 1})" for i in self.candidate_layers]

    def counts(self) -> dict[str, int]:
        return dict(zip(self.layer_names(), self.selection_counts.tolist()))

    def reset_counts(self) -> None:
        self.selection_counts.zero_()

    def _record(self, candidate_positions: torch.Tensor) -> None:
        self.selection_counts += torch.bincount(candidate_positions.detach().cpu(),
                                                minlength=len(self.candidate_layers))

    @contextmanager
    def forced(self, position: int):
        """Inside: inference feeds every image from candidate `position` instead of the classifier's choice."""
        if not 0 <= position < len(self.candidate_layers):
            raise ValueError(f"candidate position {position} is not in 0..{len(self.candidate_layers) - 1}")
        self.forced_position = position
        try:
            yield
        finally:
            self.forced_position = None

    # --- selection ----------------------------------------------------------------------------------------------
    def candidate_features(self, vision_tower, pixel_values: torch.Tensor) -> torch.Tensor:
        """One vision-tower pass -> features of every candidate layer (layers, images, tokens, dim)."""
        hidden_states = vision_tower.all_hidden_states(pixel_values)
        return torch.stack([vision_tower.select_tokens(hidden_states[i]) for i in self.candidate_layers])

    def layer_logits(self, layer_features: torch.Tensor, instruction: torch.Tensor | None) -> torch.Tensor:
        """Classifier logits (images, layers) on detached inputs: only its own loss may train it."""
        instruction = instruction.detach() if instruction is not None else None
        return self.classifier(layer_features.detach(), instruction)

    def instruction_per_image(self, text_embeds: torch.Tensor, input_ids: torch.Tensor,
                              attention_mask: torch.Tensor, labels: torch.Tensor | None, *,
                              image_token_id: int) -> torch.Tensor | None:
        """Each image's instruction embedding (images, dim), or None when the classifier reads no text."""
        if not self.use_text:
            return None
        instruction = instruction_embedding(text_embeds, input_ids, attention_mask, labels, image_token_id)
        return instruction[image_rows(input_ids, attention_mask, image_token_id)]

    def select_features(self, vision_tower, pixel_values: torch.Tensor,
                        instruction: torch.Tensor | None) -> torch.Tensor:
        """Inference: each image's features at its argmax layer (images, tokens, dim)."""
        features = self.candidate_features(vision_tower, pixel_values)
        if self.forced_position is None:
            choice = self.layer_logits(features, instruction).argmax(dim=-1)  # (images,)
        else:
            choice = torch.full((features.shape[1],), self.forced_position, device=features.device)
        self._record(choice)
        return features[choice, torch.arange(len(choice), device=choice.device)]

    def layers_to_try(self, layer_logits: torch.Tensor) -> torch.Tensor:
        """(k, images) candidate positions: the classifier's top-k in its order, except for a random
        `exploration_rate` share of images, which try k distinct layers in random order."""
        order = layer_logits.argsort(dim=-1, descending=True, stable=True)
        if self.exploration_rate > 0:
            random_order = torch.rand(layer_logits.shape, device=layer_logits.device).argsort(dim=-1)
            explores = torch.rand(len(order), device=order.device) < self.exploration_rate  # (images,)
            order = torch.where(explores[:, None], random_order, order)
        return order[:, : self.top_k].T

    def training_pass(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      pixel_values: torch.Tensor, labels: torch.Tensor) -> LayerTrainingPass:
        """Training: the merged inputs the LLM trains on, from one vision-tower pass. With lm_loss_from "best" or
        "classifier", k layers per image are first scored in one k x batch pass of `model` (a SparseVLM) without
        autograd; the inputs are those of each sample's lowest-loss layer ("best") or of the classifier's top choice
        ("classifier"), and the lowest-loss layer is the classifier's target. With "all" the inputs are all k copies."""
        text_embeds = model.llm.get_input_embeddings()(input_ids)  # (batch, seq, dim)
        features = self.candidate_features(model.vision_tower, pixel_values)  # (layers, images, tokens, vdim)
        instruction = self.instruction_per_image(text_embeds, input_ids, attention_mask, labels,
                                                 image_token_id=model.image_token_id)
        layer_logits = self.layer_logits(features, instruction)  # (images, layers)
        tried = self.layers_to_try(layer_logits)  # (k, images) candidate positions
        image_index = torch.arange(tried.shape[1], device=tried.device)
        sample_of_image = image_rows(input_ids, attention_mask, model.image_token_id)  # (images,)
        has_labels = (labels[:, 1:] != IGNORE_INDEX).any(dim=1)[sample_of_image]  # (images,)
        step = {"selector": self, "layer_logits": layer_logits, "tried": tried, "sample_of_image": sample_of_image,
                "has_labels": has_labels}
        if self.lm_loss_from == "all":
            image_embeds, losses = model.projector(features[tried, image_index].flatten(0, 1))  # copy-major
            inputs = merge_copies(model, image_embeds, input_ids, attention_mask, text_embeds, labels, len(tried))
            return LayerTrainingPass(inputs=inputs, losses=losses, **step)
        if len(tried) == 1:
            target = tried[0]
        else:
            loss = score_layers(model, features[tried, image_index], input_ids, attention_mask, text_embeds, labels)
            target = lowest_loss_layer(loss, tried, sample_of_image)
        trained = target if self.lm_loss_from == "best" else tried[0]
        image_embeds, losses = model.projector(features[trained, image_index])  # (images, tokens, dim)
        inputs = model.merge_inputs(input_ids, attention_mask, text_embeds, image_embeds, labels)
        return LayerTrainingPass(inputs=inputs, losses=losses, target=target, trained=trained, **step)


def lowest_loss_layer(loss: torch.Tensor, tried: torch.Tensor, sample_of_image: torch.Tensor) -> torch.Tensor:
    """(images,) the candidate position, among each image's tried ones (k, images), whose copy of the image's
    sample has the lowest loss (copies, batch); the first tried on ties."""
    image_index = torch.arange(tried.shape[1], device=tried.device)
    return tried[loss.argmin(dim=0)[sample_of_image], image_index]


def merge_copies(model, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 text_embeds: torch.Tensor, labels: torch.Tensor, copies: int) -> MultimodalInputs:
    """Merged inputs of `copies` x batch rows: row c * batch + i is copy c of sample i and consumes copy c's images
    (image_embeds: (copies * images, tokens, dim), copy-major, images in placeholder order)."""
    inputs = model.merge_inputs(input_ids.repeat(copies, 1), attention_mask.repeat(copies, 1),
                                text_embeds.repeat(copies, 1, 1), image_embeds, labels.repeat(copies, 1))
    return replace(inputs, copies=copies)


@torch.no_grad()
def score_layers(model, features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 text_embeds: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean LM loss (copies, batch) of each sample with each copy's images: one projector + LLM call of
    copies x batch rows. features: (copies, images, tokens, vdim), images in placeholder order."""
    copies, batch = len(features), len(input_ids)
    with expert_stats_paused(model):  # expert usage counts the trained pass only
        image_embeds, _ = model.projector(features.flatten(0, 1))  # (copies * images, tokens, dim), copy-major
        inputs = merge_copies(model, image_embeds, input_ids, attention_mask, text_embeds, labels, copies)
        return per_sample_lm_loss(model, inputs).view(copies, batch)


def per_sample_lm_loss(model, inputs: MultimodalInputs) -> torch.Tensor:
    """(rows,) mean next-token loss of each row; logits are computed only where a labelled token follows."""
    next_labels = inputs.labels[:, 1:]  # (rows, seq-1)
    labelled = next_labels != IGNORE_INDEX
    if not labelled.any():
        return next_labels.new_zeros(len(next_labels), dtype=torch.float)
    predicts = F.pad(labelled, (0, 1))  # (rows, seq): this position's logits predict a label
    logits = model.lm_logits(inputs, logits_to_keep=predicts)  # (labelled tokens, vocab)
    token_loss = F.cross_entropy(logits.float(), next_labels[labelled], reduction="none")
    sums = token_loss.new_zeros(len(next_labels)).index_add_(0, labelled.nonzero()[:, 0], token_loss)
    return sums / labelled.sum(dim=1).clamp(min=1)


def per_row_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(rows,) mean next-token loss of each row of full logits (rows, seq, vocab); 0 for a row without labels."""
    next_labels = labels[:, 1:]
    token_loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), next_labels, ignore_index=IGNORE_INDEX,
                                 reduction="none")  # (rows, seq-1), 0 where ignored
    return token_loss.sum(dim=1) / (next_labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)


def check_top_k(top_k: int, candidate_layers: list[int]) -> int:
    if not 1 <= top_k <= len(candidate_layers):
        raise ValueError(f"--top_k_layers {top_k} must be between 1 and the number of candidate layers "
                         f"({len(candidate_layers)}: {candidate_layers}; set by --candidate_layers)")
    return top_k


def layer_classifier_loss(layer_logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the classifier toward the min-loss layer, over images whose sample has labels."""
    if not keep.any():
        return layer_logits.sum() * 0.0
    return F.cross_entropy(layer_logits[keep].float(), target[keep])


def image_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """(images,) the sample each image belongs to; images are stacked in placeholder order."""
    per_row = ((input_ids == image_token_id) & attention_mask.bool()).sum(dim=1)
    return torch.repeat_interleave(torch.arange(len(input_ids), device=input_ids.device), per_row)


def instruction_embedding(text_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          labels: torch.Tensor | None, image_token_id: int) -> torch.Tensor:
    """(batch, dim) mean embedding of attended, unlabelled (so not the answer), non-<image> tokens."""
    keep = attention_mask.bool() & (input_ids != image_token_id)
    if labels is not None:
        keep &= labels == IGNORE_INDEX
    weights = keep.to(text_embeds.dtype)[..., None]  # (batch, seq, 1)
    return (text_embeds * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def format_layer_stats(counts: dict[str, int]) -> str:
    """The selection table: a header, then one line per layer with its percent and count."""
    total = sum(counts.values())
    lines = [SELECTION_STATS_HEADER]
    for name, count in counts.items():
        lines.append(f"{name:>14}: {100 * count / max(total, 1):6.2f}% ({count})")
    lines.append(f"{'total':>14}: {total}")
    return "\n".join(lines)


def build_layer_selector(args, *, vision_tower, text_dim: int) -> AdaptiveLayerSelector | None:
    """The selector `args` (ModelArguments) ask for, or None when adaptive selection is off."""
    if not args.use_adaptive_layer_selection:
        return None
    if not callable(getattr(vision_tower, "all_hidden_states", None)):
        raise ValueError(f"--use_adaptive_layer_selection needs a vision tower that returns every layer's hidden "
                         f"states; {type(vision_tower).__name__} has no all_hidden_states()")
    num_layers = vision_tower.config.num_hidden_layers
    requested = args.candidate_layers or list(range(1, num_layers + 1))
    candidates = [hidden_state_index(layer, num_layers, flag="--candidate_layers") for layer in requested]
    if len(set(candidates)) != len(candidates):
        raise ValueError(f"--candidate_layers {requested} names the same layer twice (as hidden-state indices: "
                         f"{candidates})")
    check_top_k(args.top_k_layers, candidates)
    classifier = LayerClassifier(vision_dim=vision_tower.hidden_size, num_layers=len(candidates),
                                 hidden_size=args.layer_classifier_hidden_size,
                                 text_dim=text_dim if args.layer_classifier_use_text else None)
    return AdaptiveLayerSelector(classifier=classifier, candidate_layers=candidates, num_vision_layers=num_layers,
                                 top_k=args.top_k_layers, use_text=args.layer_classifier_use_text,
                                 lm_loss_from=args.layer_lm_loss_from)


def attach_layer_selector(model, args) -> None:
    """For a loaded SparseVLM: a fresh selector when `args` ask for one and the checkpoint had none; with one,
    this run's --top_k_layers and --layer_lm_loss_from (training choices, not part of the architecture)."""
    if model.layer_selector is not None:
        model.layer_selector.top_k = check_top_k(args.top_k_layers, model.layer_selector.candidate_layers)
        model.layer_selector.lm_loss_from = args.layer_lm_loss_from
    elif args.use_adaptive_layer_selection:
        model.layer_selector = build_layer_selector(args, vision_tower=model.vision_tower,
                                                    text_dim=model.llm.get_input_embeddings().embedding_dim)
