"""Checkpoints: weights as safetensors, everything needed to rebuild the model as JSON (never pickle)."""

import json
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_model, save_model
from transformers import PreTrainedTokenizerFast

from sparsevl.classify.config import ModelConfig
from sparsevl.classify.model import MultiModalMoE

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def save_checkpoint(folder: str | Path, model: MultiModalMoE, *, class_names: list[str], dataset: str,
                    label_token_ids: list[list[int]] | None, tokenizer: PreTrainedTokenizerFast, args: dict | None = None) -> Path:
    """Write weights, the resolved config (and all run arguments, if given) and the tokenizer into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / WEIGHTS))  # save_model handles the expert pool shared by both modalities' layers
    meta = {"model": asdict(model.config), "num_classes": len(class_names), "class_names": class_names,
            "dataset": dataset, "label_token_ids": label_token_ids, "args": args}
    (folder / CONFIG).write_text(json.dumps(meta, indent=2))
    tokenizer.save_pretrained(folder)
    return folder


def load_checkpoint(folder: str | Path) -> tuple[MultiModalMoE, PreTrainedTokenizerFast, dict]:
    """Rebuild the model from `config.json` and load `model.safetensors`; returns (model, tokenizer, meta)."""
    folder = Path(folder)
    for name in (WEIGHTS, CONFIG):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"checkpoint file not found: {folder / name}")
    meta = json.loads((folder / CONFIG).read_text())
    model = MultiModalMoE(ModelConfig(**meta["model"]), num_classes=meta["num_classes"], label_token_ids=meta["label_token_ids"])
    load_model(model, str(folder / WEIGHTS))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    return model.eval(), tokenizer, meta
