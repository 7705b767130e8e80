"""`sparsevl analyze routing --model DIR --data FILE [FILE ...] --out DIR`: where text and image tokens are routed.

For every MoE layer of a checkpoint (the moe projector; the upcycled LLM layers) and every expert: the share of
text tokens and of image tokens routed to it, and the share of its tokens that are image tokens (MoE-LLaVA's
routing figures). Runs the model on whole conversations (question and answer, chat template) and counts each
token's top-k assignments. Writes routing.json and routing.png (heatmaps).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from sparsevl.model.upcycle import moe_feed_forwards

MODALITIES = ("text", "image")


def routed_assignments(model, inputs):
    """(layer name, expert indices (tokens, top_k), token is image (tokens,)) per MoE layer of the last forward."""
    if getattr(model.projector, "last_expert_indices", None) is not None:
        indices = model.projector.last_expert_indices
        indices = indices.reshape(-1, indices.shape[-1])  # every projector token is an image token
        yield "projector", indices, torch.ones(len(indices), dtype=torch.bool, device=indices.device)
    valid = inputs.attention_mask.bool()  # (batch, seq)
    for index, ffn in moe_feed_forwards(model.llm):
        yield f"llm.layer{index}", ffn.last_expert_indices[valid], inputs.image_mask[valid]


@torch.no_grad()
def routing_counts(model, batches) -> dict[str, dict[str, list[int]]]:
    """layer -> {"text": assignments per expert, "image": assignments per expert}, summed over all batches."""
    model.eval()
    totals: dict[str, dict[str, torch.Tensor]] = {}
    for batch in batches:
        out = model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        for name, indices, is_image in routed_assignments(model, out.inputs):
            num_experts = _num_experts(model, name)
            layer = totals.setdefault(name, {m: torch.zeros(num_experts, dtype=torch.long) for m in MODALITIES})
            for modality, mask in zip(MODALITIES, (~is_image, is_image)):
                layer[modality] += torch.bincount(indices[mask].flatten().cpu(), minlength=num_experts)
    if not totals:
        raise ValueError("the model has no MoE layer (use --mm_projector_type moe or a --stage moe checkpoint)")
    return {name: {m: counts.tolist() for m, counts in layer.items()} for name, layer in totals.items()}


def _num_experts(model, name: str) -> int:
    if name == "projector":
        return model.projector.moe.router.num_experts
    return dict(moe_feed_forwards(model.llm))[int(name.removeprefix("llm.layer"))].moe.router.num_experts


def routing_shares(counts: dict[str, dict[str, list[int]]]) -> dict[str, dict[str, list[float]]]:
    """Per layer: text / image = share of that modality's assignments per expert (each sums to 1, or all 0);
    image_fraction = share of each expert's assignments that are image tokens."""
    def normalise(values, totals):
        return [v / t if t else 0.0 for v, t in zip(values, totals)]

    shares = {}
    for name, layer in counts.items():
        text, image = layer["text"], layer["image"]
        shares[name] = {"text": normalise(text, [sum(text)] * len(text)),
                        "image": normalise(image, [sum(image)] * len(image)),
                        "image_fraction": normalise(image, [t + i for t, i in zip(text, image)])}
    return shares


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsevl analyze routing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="sparsevl checkpoint with MoE layers")
    p.add_argument("--data", nargs="+", required=True, help="LLaVA JSON conversation file(s), e.g. test_qa.json")
    p.add_argument("--out", required=True, help="output folder for routing.json and routing.png")
    p.add_argument("--limit", type=int, default=256, help="first N records of each file (default 256)")
    p.add_argument("--batch_size", type=int, default=16, help="conversations per forward pass")
    return p


def analyze(model_dir: str, data_paths: list[str], out_dir: str | Path, *, limit: int, batch_size: int) -> dict:
    """Count routing on the files, write routing.json and routing.png into out_dir, return the JSON content."""
    from sparsevl.data.dataset import LlavaJsonDataset, PaddingCollator
    from sparsevl.eval.run import load_for_inference
    from sparsevl.viz.routing import plot_routing_heatmaps

    model, tokenizer, image_processor = load_for_inference(model_dir)
    counts: dict[str, dict[str, list[int]]] = {}
    for data_path in data_paths:
        data = LlavaJsonDataset(data_path, tokenizer=tokenizer, image_processor=image_processor,
                                num_image_tokens=model.num_image_tokens, max_length=4096)
        data = Subset(data, range(min(limit, len(data))))
        loader = DataLoader(data, batch_size=batch_size, collate_fn=PaddingCollator(tokenizer.pad_token_id))
        for name, layer in routing_counts(model, loader).items():
            merged = counts.setdefault(name, {m: [0] * len(layer[m]) for m in MODALITIES})
            for m in MODALITIES:
                merged[m] = [a + b for a, b in zip(merged[m], layer[m])]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"model": str(model_dir), "data": [str(p) for p in data_paths], "counts": counts,
              "shares": routing_shares(counts)}
    (out_dir / "routing.json").write_text(json.dumps(result, indent=2))
    plot_routing_heatmaps(result["shares"], out_dir / "routing.png")
    return result


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        result = analyze(args.model, args.data, args.out, limit=args.limit, batch_size=args.batch_size)
    except (ValueError, FileNotFoundError) as error:
        print(f"sparsevl analyze routing: error: {error}", file=sys.stderr)
        return 2
    for name, shares in result["shares"].items():
        cells = " ".join(f"{share:.2f}" for share in shares["image_fraction"])
        print(f"{name:<14} image share per expert: {cells}")
    print(f"wrote {args.out}/routing.json and {args.out}/routing.png")
    return 0
