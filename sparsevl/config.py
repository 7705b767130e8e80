"""Typed arguments for every command that builds or trains a model.

Flags follow LLaVA's names where LLaVA has one. A YAML file (`--config FILE`) supplies defaults that
flags override; YAML values go through the same argparse path as flags, so types are converted alike.
"""

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser, TrainingArguments

from sparsevl.model.moe import BALANCE_COUNTS, SECOND_EXPERT_POLICIES
from sparsevl.model.upcycle import MOE_MODES
from sparsevl.upstream_flags import translate_upstream_flags


LM_LOSS_SOURCES = ("best", "classifier", "all")  # --layer_lm_loss_from
TORCH_DTYPES = ("float32", "bfloat16", "float16", "auto")  # --torch_dtype
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")  # --attn_implementation


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="tiny-qwen3", metadata={"help": (
        "The LLM: a preset (tiny-qwen3, tiny-llama, mid-llama, mid-qwen3), a local transformers checkpoint "
        "directory, or a sparsevl checkpoint directory to continue from (then vision tower and projector load too).")})
    vision_tower: str = field(default="tiny-clip", metadata={"help": (
        "Vision encoder: a preset (tiny-clip, tiny-clip16, tiny-siglip, mid-clip) or a local CLIP/SigLIP directory.")})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": (
        "Tokenizer directory; default: the checkpoint's own (for presets this flag is required).")})
    torch_dtype: str = field(default="float32", metadata={"help": (
        "Weights' dtype when loading: float32 (CPU training), bfloat16, float16, or auto (the LLM checkpoint's own; "
        "float32 for presets). Vision tower, projector and classifier follow the LLM.")})
    attn_implementation: str | None = field(default=None, metadata={"help": (
        "Attention kernel of the LLM and vision tower, passed to transformers: sdpa, flash_attention_2 (needs the "
        "flash-attn package and a GPU) or eager; default: transformers' choice (sdpa).")})
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={"help": (
        "Projector weights to start from: LLaVA's stage-1 mm_projector.bin (keys model.mm_projector.*; read with "
        "torch.load(weights_only=True), never unpickling code) or a .safetensors file of the same keys.")})
    mm_projector_type: str = field(default="mlp2x_gelu", metadata={"help": (
        "Projector: linear, mlp2x_gelu, qformer, or moe (alias adaptive_moe: top-k of --mm_moe_num_experts "
        "mlp2x_gelu experts).")})
    num_query_tokens: int = field(default=32, metadata={"help": (
        "qformer projector: learned queries, i.e. visual tokens per image entering the LLM.")})
    mm_vision_select_layer: int = field(default=-2, metadata={"help": "Vision layer whose features are projected."})
    mm_vision_select_feature: str = field(default="patch", metadata={"help": (
        "patch: patch tokens only (drop CLIP's [CLS]); cls_patch: keep [CLS] too.")})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "Train only the projector (LLaVA pretrain)."})
    freeze_backbone: bool = field(default=False, metadata={"help": "Freeze the LLM; train the projector."})
    unfreeze_mm_vision_tower: bool = field(default=False, metadata={"help": (
        "Also train the vision tower (needed when it starts from random weights).")})
    mm_moe_num_experts: int = field(default=8, metadata={"help": "moe projector: number of mlp2x_gelu experts."})
    mm_moe_top_k: int = field(default=2, metadata={"help": "moe projector: experts per visual token."})
    moe_enable: bool = field(default=False, metadata={"help": (
        "MoE-Tuning stage 3: upcycle the LLM's FFNs into MoE layers (each expert a copy of the trained FFN) and "
        "train what --train_modules says. Set by --stage moe. Defaults reproduce MoE-LLaVA's stage-3 scripts.")})
    num_experts: int = field(default=4, metadata={"help": "--moe_enable: experts per upcycled FFN."})
    top_k_experts: int = field(default=2, metadata={"help": (
        "--moe_enable: experts per token. Top-2 weights are renormalised over the experts that kept the token; "
        "top-1 is weighted by its raw router probability (MoE-LLaVA/DeepSpeed; the router then learns from the "
        "LM loss).")})
    moe_mode: str = field(default="sparse", metadata={"help": (
        "--moe_enable: which decoder layers become MoE (MoE-LLaVA's names): sparse = 0, 2, 4, ... (its stage-3 "
        "scripts); first_half = 0..L/2-1; second_half = L/2..L-1; dense = all. --moe_layers or "
        "--moe_layers_every replace it.")})
    moe_layers_every: int | None = field(default=None, metadata={"help": (
        "--moe_enable: instead of --moe_mode, upcycle decoder layers i with i + 1 divisible by N (N=2: layers "
        "1, 3, ...; Qwen3-MoE's decoder_sparse_step).")})
    moe_layers: list[int] | None = field(default=None, metadata={"help": (
        "--moe_enable: instead of --moe_mode, explicit decoder-layer indices to upcycle (0-based), e.g. "
        "`--moe_layers 0 2` (MoE-LLaVA's moe_layers_idx).")})
    capacity_factor: float = field(default=1.5, metadata={"help": (
        "--moe_enable: in training each expert takes at most max(--min_capacity, ceil(tokens / E x factor x "
        "top_k)) token assignments per micro-batch (tokens include padding); first choices fill in token order, "
        "then second choices; overflow is dropped (the token keeps the layer's residual). 1.5 as MoE-LLaVA's "
        "scripts (its code's default is 1.0); 0 = no limit.")})
    eval_capacity_factor: float = field(default=2.0, metadata={"help": (
        "--moe_enable: the capacity factor in eval and generation (MoE-LLaVA 2.0); 0 = no limit.")})
    min_capacity: int = field(default=0, metadata={"help": (
        "--moe_enable: lower bound of every expert's capacity (MoE-LLaVA 0; DeepSpeed's own default 4).")})
    use_residual: bool = field(default=False, metadata={"help": (
        "--moe_enable: Residual MoE (DeepSpeed/MoE-LLaVA use_residual): the dense FFN stays beside the experts "
        "and a learned softmax(Linear(dim, 2)) mixes the two outputs per token.")})
    second_expert_policy: str = field(default="sampling", metadata={"help": (
        "--moe_enable: how experts after the first are chosen. sampling: argmax of router logits + Gumbel(0, 1) "
        "noise with the first expert masked, in training and eval (MoE-LLaVA's code, DeepSpeed top2gating); "
        "argmax: the next most probable (the paper's text, Mixtral, Qwen3-MoE). Weights are the noise-free "
        "probabilities either way.")})
    balance_loss_count: str = field(default="top1", metadata={"help": (
        "--moe_enable: what the balance loss E x sum_e mean_prob_e x frac_e counts in frac: top1 = each token's "
        "first choice (MoE-LLaVA/DeepSpeed/Switch; balanced value 1 per layer) or top_k = every assignment "
        "(transformers' load_balancing_loss_func; balanced value top_k).")})
    train_modules: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj", "wg"],
                                     metadata={"help": (
        "--moe_enable: LLM parameters that train in stage 3: those whose name holds one of these strings "
        "(MoE-LLaVA's rule and default: the experts and the dense FFNs of the non-MoE layers; `wg` names the "
        "routers, which train anyway as new parameters); the stage-2 projector trains too; attention, norms, "
        "embeddings, lm_head and the vision tower stay frozen. `moe_layers`: only the MoE layers (routers + "
        "experts) train, as the paper's text says, projector frozen.")})
    lora_enable: bool = field(default=False, metadata={"help": "Train LoRA adapters on the LLM (merged on save)."})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA path."})
    token_pruner: str = field(default="none", metadata={"help": (
        "Visual-token pruner: none, sparsevlm (SparseVLM v1.5's rule), sparsevlm_weighted (this project's variant), "
        "fastv (FastV), random, cls_attention or visionzip (VisionZip; both before the LLM). README: Token pruning.")})
    pruning_layers: str = field(default="", metadata={"help": (
        "Comma-separated, increasing; each pruner's own meaning: sparsevlm: layers whose *output* is pruned (they run "
        "on all tokens and their attention decides; the paper's 2,6,15); fastv: K, the first layer on the kept tokens "
        "(layer K-1's attention decides); sparsevlm_weighted/random: layers before which tokens drop (sparsevlm_"
        "weighted ranks with that layer's own attention).")})
    retained_tokens: str = field(default="", metadata={"help": (
        "Visual tokens kept per image at each pruning layer, decreasing: counts (192,128,96) or ratios (0.25); "
        "sparsevlm's recycled tokens come on top.")})
    fastv_k: int | None = field(default=None, metadata={"help": (
        "fastv: K, the first layer on the kept tokens; layer K-1's attention decides (default 2).")})
    fastv_ratio: float | None = field(default=None, metadata={"help": (
        "fastv: R, the fraction of visual tokens pruned; round(N(1-R)) are kept (default 0.5).")})
    num_recycled_tokens: int = field(default=0, metadata={"help": (
        "sparsevlm_weighted: pruned tokens pooled into this many tokens per image (inside the retained budget).")})
    sparsevlm_budget: int | None = field(default=None, metadata={"help": (
        "sparsevlm: the paper's budget 192, 128 or 64 (average visual tokens over LLaVA-1.5-7B's 32 layers): its "
        "stage table (prune outputs of layers 2,6,15 to 300/200/110, 303/110/36 or 66/30/17 of 576 tokens) scaled "
        "to this model: layer round((l+1) x layers/32) - 1, count round(c x visual tokens/576).")})
    sparsevlm_recycling: str = field(default="", metadata={"help": (
        "sparsevlm: on (default; v1.5) or off. On: the top 30 percent (+1) of each stage's dropped tokens are "
        "clustered (DPC-kNN) into floor(n/10)+1 averaged tokens appended after the kept visual tokens.")})
    dominant: int | None = field(default=None, metadata={"help": (
        "visionzip: dominant patches kept by [CLS] attention (the [CLS] token is kept too; paper: 54, 108, 162).")})
    contextual: int | None = field(default=None, metadata={"help": (
        "visionzip: contextual tokens merged from the rest (paper: 10, 20, 30).")})
    use_adaptive_layer_selection: bool = field(default=False, metadata={"help": (
        "A small classifier picks, per image, which vision layer feeds the projector (instead of "
        "--mm_vision_select_layer). Training tries the classifier's --top_k_layers layers and teaches it the best "
        "one.")})
    candidate_layers: list[int] | None = field(default=None, metadata={"help": (
        "Vision layers the adaptive classifier chooses from (hidden-state indices like --mm_vision_select_layer: "
        "-1 is the last layer, 0 the embeddings); default: every layer's output.")})
    top_k_layers: int = field(default=3, metadata={"help": (
        "Adaptive training scores the classifier's k most likely layers per image (projector + LLM as one no-grad "
        "batch of k x batch rows); each sample's lowest-LM-loss layer is the classifier's target "
        "(--layer_lm_loss_from says which layer the LM trains on).")})
    layer_classifier_use_text: bool = field(default=False, metadata={"help": (
        "The layer classifier also sees the mean embedding of the text instruction (not the answer).")})
    layer_classifier_hidden_size: int = field(default=128, metadata={"help": "Hidden width of the layer classifier MLP."})
    layer_lm_loss_from: str = field(default="classifier", metadata={"help": (
        "Which tried layers supply the LM loss in adaptive training: classifier (the classifier's own top choice, "
        "as at inference), all (the mean over the k tried layers, one forward-backward of k x batch rows) or best "
        "(the lowest-loss one, chosen with the answer in view; it collapses on the built-in benchmark, as the LM "
        "learns a different answer per layer that the classifier cannot pick at inference: see the README). "
        "The lowest-loss layer is always the classifier's target.")})

    def __post_init__(self):
        if self.torch_dtype not in TORCH_DTYPES:
            raise ValueError(f"--torch_dtype {self.torch_dtype!r} must be one of {TORCH_DTYPES}")
        if self.attn_implementation not in (None, *ATTN_IMPLEMENTATIONS):
            raise ValueError(f"--attn_implementation {self.attn_implementation!r} must be one of "
                             f"{ATTN_IMPLEMENTATIONS}")
        check_moe_arguments(self)
        if self.layer_lm_loss_from not in LM_LOSS_SOURCES:
            raise ValueError(f"--layer_lm_loss_from {self.layer_lm_loss_from!r} must be one of {LM_LOSS_SOURCES}")
        if self.top_k_layers < 1:
            raise ValueError(f"--top_k_layers must be at least 1, got {self.top_k_layers}")
        if self.candidate_layers is not None:
            if not self.candidate_layers:
                raise ValueError("--candidate_layers is empty; give at least one layer index or leave it unset")
            if len(set(self.candidate_layers)) != len(self.candidate_layers):
                raise ValueError(f"--candidate_layers {self.candidate_layers} repeats a layer")
            if self.use_adaptive_layer_selection and self.top_k_layers > len(self.candidate_layers):
                raise ValueError(f"--top_k_layers {self.top_k_layers} is larger than the {len(self.candidate_layers)} "
                                 f"--candidate_layers {self.candidate_layers}")


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={"help": "LLaVA-format JSON file of conversations."})
    image_folder: str | None = field(default=None, metadata={"help": (
        "Folder that record `image` paths are relative to; default: the JSON file's folder.")})
    conversation_template: str = field(default="chat", metadata={"help": (
        "plain: image + answer only (LLaVA pretrain, `--version plain`); chat: USER/ASSISTANT turns.")})
    model_max_length: int = field(default=512, metadata={"help": (
        "Longest sequence in tokens, visual tokens included; longer text is truncated, image tokens never split.")})
    skip_bad_samples: bool = field(default=False, metadata={"help": (
        "Skip (and count) malformed records instead of stopping with an error. Checks every record before "
        "training by tokenizing it and decoding its images once (slow for 100,000s of records); without it, "
        "structure, turns and image files are checked up front and the rest when a record is first read.")})
    image_cache_mb: float = field(default=0, metadata={"help": (
        "Keep up to this many MiB of preprocessed images in memory (least recently used dropped first; per "
        "DataLoader worker). 0: decode every time (records are tokenized and decoded when read).")})
    image_aspect_ratio: str = field(default="square", metadata={"help": (
        "square: the image processor's resize and centre crop; pad: LLaVA's, expand each image to a square "
        "filled with the processor's mean colour first, so nothing is cropped (the checkpoint's image processor "
        "pads too, so evaluation and serving do the same).")})


@dataclass
class SparseVLTrainingArguments(TrainingArguments):
    stage: str = field(default="finetune", metadata={"help": (
        "Recipe whose defaults apply before the flags: pretrain (projector only, plain template), finetune, "
        "sparse_distill (pruned student + frozen unpruned teacher, loss lm + --align_loss_weight x align), or moe "
        "(MoE-Tuning stage 3: upcycle the LLM's FFNs, train only the MoE layers).")})
    output_dir: str = field(default="runs/train", metadata={"help": "Where checkpoints and logs go."})
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"], metadata={"help": "Loggers (tensorboard, none)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=200, metadata={"help": "Save a checkpoint every N steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most N step checkpoints."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule."})
    warmup_steps: float = field(default=0.03, metadata={"help": "Warmup steps (a float < 1 is a ratio of all steps)."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep every batch key (our collator's)."})
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer."})
    dataloader_pin_memory: bool = field(default=False, metadata={"help": "Pin host memory (GPU only)."})
    moe_load_balancing_weight: float = field(default=0.01, metadata={"help": (
        "Weight of the moe projector's balance loss (logged as loss_balance).")})
    moe_aux_loss_coef: float = field(default=0.01, metadata={"aliases": ["--router_aux_loss_coef"], "help": (
        "Weight of the upcycled LLM MoE layers' balance loss, summed over layers (loss_llm_balance; alias "
        "--router_aux_loss_coef, MoE-LLaVA's name). What it counts: --balance_loss_count.")})
    router_z_loss_weight: float = field(default=0.0, metadata={"help": (
        "Weight of the ST-MoE router z-loss of every MoE (loss_z for the projector, loss_llm_z for the LLM; "
        "ST-MoE uses 0.001; MoE-LLaVA none).")})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": (
        "Continue training from a step checkpoint: a checkpoint-N directory, or `latest` for the newest complete "
        "one in --output_dir (a fresh start when there is none yet). Restores model, optimizer, scheduler, RNG "
        "states and the data-loader position.")})
    layer_classifier_loss_weight: float = field(default=0.1, metadata={"help": (
        "Weight of the adaptive layer classifier's cross-entropy loss (`layer_cls`) in the total loss.")})
    layer_exploration_warmup_steps: int = field(default=0, metadata={"help": (
        "Adaptive selection: for the first N optimizer steps the k layers tried per image are drawn uniformly "
        "at random instead of the classifier's top-k, so every layer gets a chance to be the target.")})
    layer_exploration_rate: float = field(default=0.0, metadata={"help": (
        "Adaptive selection after the warmup: this share of images (0-1) still tries random layers, so no layer "
        "stops training and the classifier cannot lock in on whichever layer led early.")})
    max_bad_steps: int = field(default=5, metadata={"help": (
        "Steps with a non-finite loss or gradient are skipped (weights untouched) and logged with their samples; "
        "after this many in a row training stops with an error, leaving the last good checkpoint.")})
    align_loss_weight: float = field(default=1.0, metadata={"help": (
        "sparse_distill: weight of the MSE between student and teacher last hidden states on retained tokens.")})

    group_by_modality_length: bool = field(default=False, metadata={"help": (
        "LLaVA's sampler: each batch holds records with images only or text-only records only, of similar "
        "length (word count); batches are shuffled with --seed, the last batch takes both modalities' remainders.")})
    teacher_model_name_or_path: str | None = field(default=None, metadata={"help": (
        "sparse_distill: the frozen, unpruned teacher, a sparsevl checkpoint directory with the student's LLM width, "
        "visual token count and <image> id (default: a copy of the student's starting weights).")})

    def __post_init__(self):
        if self.teacher_model_name_or_path and self.stage != "sparse_distill":
            raise ValueError(f"--teacher_model_name_or_path is used by --stage sparse_distill only, not --stage "
                             f"{self.stage}")
        if not 0.0 <= self.layer_exploration_rate <= 1.0:
            raise ValueError(f"--layer_exploration_rate must be between 0 and 1, got {self.layer_exploration_rate}")
        if self.max_steps == 0 or self.max_steps < -1 or (self.max_steps == -1 and self.num_train_epochs <= 0):
            raise ValueError(f"--max_steps {self.max_steps} with --num_train_epochs {self.num_train_epochs} trains "
                             "nothing: give --max_steps > 0, or --max_steps -1 (the default) and --num_train_epochs > 0")
        super().__post_init__()


# Each stage's recipe: flag defaults applied before YAML and command-line flags.
STAGE_DEFAULTS: dict[str, dict] = {
    "pretrain": {"tune_mm_mlp_adapter": True, "conversation_template": "plain"},
    "finetune": {},
    # frozen unpruned teacher + pruned student (same checkpoint); loss lm + align_loss_weight x hidden-state MSE.
    # The schedule (--pruning_layers/--retained_tokens, or --fastv_*) is the user's to give.
    "sparse_distill": {"token_pruner": "sparsevlm"},
    # MoE-Tuning stage 3 (MoE-LLaVA): upcycle the FFNs of a stage-2 checkpoint, train only the MoE layers.
    "moe": {"moe_enable": True},
}


def check_moe_arguments(args: ModelArguments) -> None:
    """Refuse impossible MoE settings at parse time, naming the flag."""
    _check_experts(args.mm_moe_num_experts, args.mm_moe_top_k, "--mm_moe_num_experts", "--mm_moe_top_k")
    _check_experts(args.num_experts, args.top_k_experts, "--num_experts", "--top_k_experts")
    if args.moe_layers_every is not None and args.moe_layers_every < 1:
        raise ValueError(f"--moe_layers_every must be at least 1, got {args.moe_layers_every}")
    if args.moe_layers is not None and (not args.moe_layers or min(args.moe_layers) < 0):
        raise ValueError(f"--moe_layers must list decoder-layer indices >= 0, got {args.moe_layers}")
    if args.moe_layers is not None and args.moe_layers_every is not None:
        raise ValueError("--moe_layers and --moe_layers_every both choose the MoE layers; give one")
    choices = {"--moe_mode": (args.moe_mode, MOE_MODES), "--second_expert_policy": (args.second_expert_policy,
               SECOND_EXPERT_POLICIES), "--balance_loss_count": (args.balance_loss_count, BALANCE_COUNTS)}
    for flag, (value, valid) in choices.items():
        if value not in valid:
            raise ValueError(f"{flag} {value!r} is unknown; valid: {', '.join(valid)}")
    for flag, value in (("--capacity_factor", args.capacity_factor), ("--eval_capacity_factor",
                                                                     args.eval_capacity_factor),
                        ("--min_capacity", args.min_capacity)):
        if value < 0:
            raise ValueError(f"{flag} must be >= 0, got {value}")
    if not args.train_modules:
        raise ValueError("--train_modules is empty; give parameter-name strings or `moe_layers`")
    if args.moe_enable and (args.tune_mm_mlp_adapter or args.lora_enable or args.freeze_backbone):
        raise ValueError("--moe_enable sets what trains itself (--train_modules): it cannot be combined with "
                         "--tune_mm_mlp_adapter, --lora_enable or --freeze_backbone")


def _check_experts(num_experts: int, top_k: int, experts_flag: str, top_k_flag: str) -> None:
    if num_experts < 1:
        raise ValueError(f"{experts_flag} must be at least 1, got {num_experts}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"{top_k_flag} must be between 1 and {experts_flag} ({num_experts}), got {top_k}")


ARGUMENT_CLASSES = (ModelArguments, DataArguments, SparseVLTrainingArguments)


def yaml_to_flags(path: str | Path) -> list[str]:
    """Turn a flat YAML mapping into `--key value` flags (lists become repeated values)."""
    try:
        values = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise SystemExit(f"config {path}: cannot read YAML: {error}") from None
    if not isinstance(values, dict):
        raise SystemExit(f"config {path}: expected a mapping of flag names to values")
    return _dict_to_flags(values)


def _dict_to_flags(values: dict) -> list[str]:
    flags = []
    for key, value in values.items():
        items = value if isinstance(value, list) else [value]
        flags += [f"--{key}", *[json.dumps(v) if isinstance(v, dict) else str(v) for v in items]]
    return flags


def split_config_files(argv: list[str], flag: str = "--config") -> tuple[list[str], list[str]]:
    """(YAML paths in the order given, the other flags): `--config A --config B` and `--config A B` both give
    [A, B]; later files override earlier ones, and flags override them all."""
    paths, rest, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        if token.startswith(flag + "="):
            paths.append(token.split("=", 1)[1])
        elif token == flag:
            values = []
            while i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                values.append(argv[i + 1])
                i += 1
            if not values:
                raise SystemExit(f"{flag} needs at least one YAML file")
            paths += values
        else:
            rest.append(token)
        i += 1
    return paths, rest


def _last_option(argv: list[str], name: str) -> str | None:
    """The value of the last `name VALUE` / `name=VALUE` in argv (the one argparse keeps)."""
    value = None
    for i, token in enumerate(argv):
        if token == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith(name + "="):
            value = token.split("=", 1)[1]
    return value


def _flag_names(argv: list[str]) -> frozenset[str]:
    return frozenset(token[2:].split("=", 1)[0] for token in argv if token.startswith("--"))


def parse_train_args(argv: list[str] | None = None):
    """Parse (model, data, training) arguments: stage recipe, then each YAML `--config` in order, then flags.

    The model arguments remember which flags were given (`given_flags`), so that a flag contradicting a loaded
    checkpoint is applied or refused, never dropped."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_paths, argv = split_config_files(argv)
    yaml_flags = [flag for path in config_paths for flag in yaml_to_flags(path)]
    stage = _last_option(argv, "--stage") or _last_option(yaml_flags, "--stage") or "finetune"
    if stage not in STAGE_DEFAULTS:
        raise SystemExit(f"--stage {stage!r} is unknown; choose from: {', '.join(STAGE_DEFAULTS)}")
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    try:
        full_argv = translate_upstream_flags(_dict_to_flags(STAGE_DEFAULTS[stage]) + yaml_flags + argv)
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=full_argv,
                                                                                  look_for_args_file=False)
    except ValueError as error:  # a dataclass's own check (e.g. --top_k_experts > --num_experts)
        raise SystemExit(f"sparsevl train: error: {error}") from None
    if training_args.stage == "sparse_distill" and model_args.layer_lm_loss_from == "all":
        raise SystemExit("sparsevl train: error: --stage sparse_distill aligns each sample's hidden states with the "
                         "teacher's, but --layer_lm_loss_from all trains k copies of every sample; use best or classifier")
    model_args.given_flags = _flag_names(full_argv)
    return model_args, data_args, training_args


def resolved_config(*arguments) -> dict:
    """All argument dataclasses as one JSON-ready dict (saved beside every checkpoint)."""
    merged = {}
    for args in arguments:
        values = args.to_dict() if isinstance(args, TrainingArguments) else asdict(args)
        merged[type(args).__name__] = values
    return merged
