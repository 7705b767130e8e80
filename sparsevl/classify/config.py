"""Typed arguments of the classifier: model, data and training, from a YAML file and/or flags.

YAML values go through the same argparse path as flags (YAML first, flags after, so flags win),
which converts types that `HfArgumentParser.parse_yaml_file` would leave as strings.
"""

from dataclasses import dataclass, field, fields

import yaml
from transformers import HfArgumentParser

from sparsevl.config import split_config_files


def _help(text: str, default, **kwargs):
    return field(default=default, metadata={"help": text, **kwargs})


@dataclass
class ModelConfig:
    img_size: int = _help("image height and width in pixels; inputs of another size are refused", 32)
    patch_size: int = _help("side of the square patches that become image tokens", 4)
    in_channels: int = _help("image channels (1 grayscale, 3 RGB)", 3)
    patch_overlap: int = _help("pixels each patch reaches past its stride on every side (0: plain non-overlapping patches)", 0)
    embed_dim: int = _help("width of every token", 512)
    num_layers: int = _help("blocks in the UnifiedModalEncoder", 6)
    num_heads: int = _help("attention heads", 8)
    expert_hidden_dim: int = _help("hidden width of each expert MLP", 1024)
    num_shared_experts: int = _help("routed experts open to both modalities", 4)
    num_modality_specific_experts: int = _help("routed experts open to one modality only, per modality", 2)
    top_k: int = _help("experts per token", 2)
    router_dim: int = _help("query/key width of the attentive router", 64)
    router_noise_std: float = _help("std of the Gaussian noise on router logits while training", 0.1)
    dropout: float = _help("dropout on attention weights and residual branches", 0.1)
    activation: str = _help("expert activation", "gelu", choices=["gelu", "relu", "silu"])
    max_text_len: int = _help("tokens kept from each label description or caption", 16)
    vocab_size: int = _help("size of the byte-level BPE vocabulary built on the texts", 512)
    gradient_checkpointing: bool = _help("recompute each block in backward to save memory", False)


@dataclass
class DataConfig:
    dataset: str = _help("dataset to use", "digits", choices=["digits", "cifar10", "fashion_mnist", "flickr8k"])
    data_root: str = _help("folder holding the dataset's original files", "data")
    augment_shift: int = _help("random translation in pixels applied to training images", 0)
    augment_rotation: float = _help("random rotation in degrees (+-) applied to training images", 0.0)
    max_train_samples: int | None = _help("use only the first N training samples (quick runs)", None)


@dataclass
class TrainConfig:
    mode: str = _help("what to run", "train_test", choices=["train", "test", "train_test"])
    batch_size: int = _help("samples per optimizer micro-batch", 64)
    epochs: int = _help("passes over the training set", 10)
    lr: float = _help("AdamW peak learning rate", 5e-4)
    weight_decay: float = _help("AdamW weight decay", 0.01)
    grad_accum_steps: int = _help("micro-batches per optimizer step", 1)
    lr_scheduler: str = _help("transformers scheduler name", "cosine", choices=["cosine", "linear", "constant_with_warmup"])
    warmup_ratio: float = _help("fraction of optimizer steps spent warming up", 0.05)
    routing_loss_weight: float = _help("weight of KL(expert utilisation || uniform) in the loss", 0.01)
    label_smoothing: float = _help("label smoothing of the cross-entropy (classes, or captions in the contrastive loss; 0: none)", 0.0)
    checkpoint: str | None = _help("checkpoint folder to write (train) or read (test); default <save_dir>/checkpoint", None)
    save_dir: str = _help("folder for the checkpoint, figures and metrics.json", "runs/classify")
    seed: int = _help("random seed", 0)
    figures: bool = _help("write the figures after testing", True)
    num_threads: int | None = _help("torch CPU threads (default: torch's choice); 1 can be much faster on shared cores", None)


CONFIG_CLASSES = (ModelConfig, DataConfig, TrainConfig)


def yaml_to_argv(path: str) -> list[str]:
    """Turn a flat YAML mapping into `--key value` flags."""
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of argument names to values")
    argv = []
    for key, value in values.items():
        if value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def parse_args(argv: list[str]) -> tuple[ModelConfig, DataConfig, TrainConfig]:
    """Parse `[--config a.yaml [--config b.yaml ...]] [flags]`: YAML files in order, later ones and flags win."""
    paths, argv = split_config_files(list(argv))
    argv = [flag for path in paths for flag in yaml_to_argv(path)] + argv
    parser = HfArgumentParser(CONFIG_CLASSES, prog="python -m sparsevl.classify",
                              description="Train and/or test the Diff-MoE classifier. Fetch a dataset with "
                                          "`python -m sparsevl.classify download --help`.")
    parser.add_argument("--config", nargs="+", help="YAML files of defaults, merged in order (flags override them)")
    return tuple(parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)[:3])


def check_model_flags(model_cfg: ModelConfig, saved: ModelConfig, checkpoint) -> None:
    """Test mode reads the model from `checkpoint`: a model flag set to another value than it was trained with is
    an error naming both, never dropped (recomputing in backward does not apply to testing)."""
    for f in fields(ModelConfig):
        value, saved_value = getattr(model_cfg, f.name), getattr(saved, f.name)
        if f.name != "gradient_checkpointing" and value != f.default and value != saved_value:
            raise ValueError(f"--{f.name} {value} contradicts checkpoint {checkpoint}, trained with {f.name} "
                             f"{saved_value}; drop the flag to test it")
