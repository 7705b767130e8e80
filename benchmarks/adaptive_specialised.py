"""Adaptive layer selection where the vision layers do differ: a made-up tower whose answer bit is readable at
layer 1 for half of the images and at layer 2 for the other half.

The shapes benchmark cannot show what per-image selection gains, since its layers make the same errors. Here each
image has a kind bit and an answer bit. Layer 1 shows the answer of kind-0 images, layer 2 that of kind-1 images,
and no other layer shows it; all layers show the kind. A fixed
layer can answer at most 3/4 of the questions (its half right, a guess on the rest); a selector that sends each
image to its layer can answer all of them. Each variant trains the same tiny LLaMA + MLP projector from the same
seed on the same batches (AdamW, total loss = lm + 0.1 x layer_cls), then answers 2000 fresh questions.
`--kind_in_text`: the layers no longer show the kind; the question does (one of its words differs by kind), so
only a classifier that reads the instruction (--layer_classifier_use_text True) can route.

    python -m benchmarks.adaptive_specialised [--seeds 0 1 2] [--steps 200] [--only "fixed 1" classifier]
                                              [--kind_in_text]
"""

import argparse
import statistics

import torch

from sparsevl.config import LM_LOSS_SOURCES, ModelArguments
from sparsevl.model.build import build_model
from sparsevl.model.vision import VisionTower
from sparsevl.model.vlm import IGNORE_INDEX, SparseVLM
from sparsevl.train.trainer import weighted_total

VOCAB_SIZE, IMAGE_TOKEN_ID, EOS_ID = 64, 63, 1
PROMPT = (5, IMAGE_TOKEN_ID, 6, 7)  # the answer token follows, then EOS
KIND_WORD = (6, 8)  # with the kind in the text: PROMPT[2] per image kind
ANSWER_IDS = (10, 11)  # answer bit 0, 1
INFORMATIVE_LAYER = {0: 1, 1: 2}  # image kind -> the one layer showing its answer
EXPLORATION_WARMUP = 50  # steps of uniformly random layers before the classifier's choices count
LOSS_WEIGHTS = {"lm": 1.0, "layer_cls": 0.1}


class LayerSpecialisedTower(VisionTower):
    """Hidden states made up from two bits per image, read from its pixels: kind = pixels[0, 0, 0] > 0 and
    answer = pixels[1, 0, 0] > 0. Every token of layer l is kind_sign * v (unless `shows_kind` is False) + noise,
    plus answer_sign * u at the kind's informative layer. (A random bit in place of the answer elsewhere would
    leak: the classifier, which reads every layer, could pick a layer whose random bit happens to match the answer
    it sees at another.)"""

    def __init__(self, encoder, select_layer: int, *, shows_kind: bool = True, noise: float = 0.3, seed: int = 0):
        super().__init__(encoder=encoder, select_layer=select_layer)
        self.shows_kind = shows_kind
        directions = torch.randn(2, self.hidden_size, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("directions", directions / directions.norm(dim=1, keepdim=True) * 4.0)
        self.noise = noise

    def all_hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kind, answer = (pixel_values[:, 0, 0, 0] > 0).long(), (pixel_values[:, 1, 0, 0] > 0).long()
        num_tokens = self.num_patches + int(self.has_cls_token)
        answer_dir, kind_dir = self.directions
        kind_sign = 2 * kind - 1 if self.shows_kind else torch.zeros_like(kind)
        states = []
        for layer in range(self.config.num_hidden_layers + 1):
            shows_answer = torch.tensor([INFORMATIVE_LAYER[k] == layer for k in (0, 1)])[kind]  # (images,)
            answer_sign = torch.where(shows_answer, 2 * answer - 1, 0)
            signal = kind_sign[:, None] * kind_dir + answer_sign[:, None] * answer_dir  # (images, dim)
            noise = self.noise * torch.randn(len(kind), num_tokens, self.hidden_size)
            states.append(signal[:, None, :] + noise)
        return tuple(states)


def make_batch(generator: torch.Generator, size: int, *, kind: int | None = None, kind_in_text: bool = False):
    """(input_ids, attention_mask, pixel_values, labels, kinds, answers) of `size` one-question samples."""
    kinds = torch.randint(0, 2, (size,), generator=generator) if kind is None else torch.full((size,), kind)
    answers = torch.randint(0, 2, (size,), generator=generator)
    pixels = torch.zeros(size, 3, 64, 64)
    pixels[:, 0, 0, 0], pixels[:, 1, 0, 0] = 2.0 * kinds - 1, 2.0 * answers - 1
    ids = torch.tensor(PROMPT + (0, EOS_ID)).repeat(size, 1)
    ids[:, len(PROMPT)] = torch.tensor(ANSWER_IDS)[answers]
    if kind_in_text:
        ids[:, 2] = torch.tensor(KIND_WORD)[kinds]
    labels = ids.clone()
    labels[:, : len(PROMPT)] = IGNORE_INDEX
    return ids, torch.ones_like(ids), pixels, labels, kinds, answers


def build_variant(variant: str, seed: int, *, kind_in_text: bool = False) -> SparseVLM:
    """'fixed N' reads layer N; a --layer_lm_loss_from rule name is adaptive selection over every layer, top-3
    (its classifier reading the instruction too when the kind is in the text)."""
    torch.manual_seed(seed)
    flags = {"model_name_or_path": "tiny-llama", "vision_tower": "tiny-clip16", "mm_projector_type": "mlp2x_gelu"}
    if variant.startswith("fixed "):
        flags["mm_vision_select_layer"] = int(variant.split()[1])
    else:
        flags.update(use_adaptive_layer_selection=True, top_k_layers=3, layer_lm_loss_from=variant,
                     layer_classifier_use_text=kind_in_text)
    model = build_model(ModelArguments(**flags), vocab_size=VOCAB_SIZE, image_token_id=IMAGE_TOKEN_ID)
    model.vision_tower = LayerSpecialisedTower(model.vision_tower.encoder, model.vision_tower.select_layer,
                                               shows_kind=not kind_in_text, seed=seed)
    return model


def train_variant(model: SparseVLM, *, steps: int, seed: int, kind_in_text: bool = False, batch_size: int = 32,
                  lr: float = 1e-3) -> None:
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        if model.layer_selector is not None:
            model.layer_selector.exploration_rate = 1.0 if step < EXPLORATION_WARMUP else 0.0
        ids, mask, pixels, labels, _, _ = make_batch(generator, batch_size, kind_in_text=kind_in_text)
        loss = weighted_total(model(ids, mask, pixels, labels).losses, LOSS_WEIGHTS)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@torch.no_grad()
def evaluate_variant(model: SparseVLM, *, kind_in_text: bool = False, num_questions: int = 2000,
                     seed: int = 1234) -> dict:
    """Accuracy per image kind and overall; for adaptive models also each kind's share per chosen layer."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for kind in (0, 1):
        ids, mask, pixels, _, _, answers = make_batch(generator, num_questions // 2, kind=kind,
                                                      kind_in_text=kind_in_text)
        if model.layer_selector is not None:
            model.layer_selector.reset_counts()
        logits = model(ids[:, : len(PROMPT)], mask[:, : len(PROMPT)], pixels).logits[:, -1]  # predicts the answer
        predicted = logits[:, list(ANSWER_IDS)].argmax(dim=-1)
        result[f"kind {kind}"] = (predicted == answers).float().mean().item()
        if model.layer_selector is not None:
            counts = model.layer_selector.selection_counts
            result[f"kind {kind} layers"] = {layer: count / counts.sum().item() for layer, count
                                            in zip(model.layer_selector.candidate_layers, counts.tolist())}
    result["overall"] = (result["kind 0"] + result["kind 1"]) / 2
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--only", nargs="*", default=None, help="variants to run (names as printed)")
    parser.add_argument("--kind_in_text", action="store_true", help="the question, not the layers, shows the kind")
    args = parser.parse_args()
    names = ["fixed 1", "fixed 2", "fixed -1", *LM_LOSS_SOURCES]
    print(f"{'variant':<12}{'kind 0':>8}{'kind 1':>8}{'overall':>9}  per seed (overall); adaptive: layer shares "
          f"of kind 0 | kind 1 images")
    for name in names:
        if args.only and name not in args.only:
            continue
        runs = []
        for seed in args.seeds:
            model = build_variant(name, seed, kind_in_text=args.kind_in_text)
            train_variant(model, steps=args.steps, seed=seed, kind_in_text=args.kind_in_text)
            runs.append(evaluate_variant(model, kind_in_text=args.kind_in_text))
        means = [statistics.mean(run[key] for run in runs) for key in ("kind 0", "kind 1", "overall")]
        line = f"{name:<12}" + "".join(f"{m:8.3f}" for m in means[:2]) + f"{means[2]:9.3f}  "
        line += " ".join(f"{run['overall']:.3f}" for run in runs)
        if "kind 0 layers" in runs[0]:
            line += "  " + "; ".join(" | ".join(_shares(run[f"kind {k} layers"]) for k in (0, 1)) for run in runs)
        print(line, flush=True)


def _shares(shares: dict[int, float]) -> str:
    return " ".join(f"{layer}:{share:.2f}" for layer, share in shares.items() if share > 0)


if __name__ == "__main__":
    main()
