"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for SparseVLM: one shard group per vision layer and per decoder
layer plus the root (embeddings, head, projector, norms), sharded step checkpoints, consolidated weights.

Accelerate's FSDP plugin does not run on CPU (accelerate 1.16 keeps a CPU run MULTI_CPU and wraps DDP, silently
dropping the plugin), so sparsevl applies `fully_shard` itself, on CPU (gloo) and GPU (NCCL) alike, and hands
Trainer a model that already owns its sharding and gradient reduction. Each rank builds the same model from the
same seed or checkpoint before sharding, so no broadcast is needed.
"""

import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from sparsevl.model.build import load_weights, plain_state_dict, save_weights
from sparsevl.model.decoder import causal_lm_parts
from sparsevl.train.checkpointing import SHARD_INDEX_NAME, shard_file_name

# fsdp_config keys (after transformers strips the `fsdp_` prefix) and the values sparsevl accepts for each;
# None means any value. transformers fills min_num_params and the xla keys itself.
ACCEPTED_FSDP_CONFIG = {"version": {2}, "reshard_after_forward": None, "min_num_params": {0},
                        "xla": {False}, "xla_fsdp_v2": {False}, "xla_fsdp_grad_ckpt": {False},
                        "auto_wrap_policy": {"TRANSFORMER_BASED_WRAP"}, "state_dict_type": {"SHARDED_STATE_DICT"}}
# accelerate launch (distributed_type: FSDP) passes its fsdp_config to the processes as these variables.
LAUNCHER_FSDP_ENV = {"FSDP_VERSION": "version", "FSDP_RESHARD_AFTER_FORWARD": "reshard_after_forward",
                     "FSDP_AUTO_WRAP_POLICY": "auto_wrap_policy", "FSDP_STATE_DICT_TYPE": "state_dict_type",
                     "FSDP_OFFLOAD_PARAMS": "cpu_offload", "FSDP_ACTIVATION_CHECKPOINTING": "activation_checkpointing",
                     "FSDP_CPU_RAM_EFFICIENT_LOADING": "cpu_ram_efficient_loading",
                     "FSDP_TRANSFORMER_CLS_TO_WRAP": "transformer_layer_cls_to_wrap"}
_LAUNCHER_DEFAULTS = {"cpu_offload": "false", "activation_checkpointing": "false", "cpu_ram_efficient_loading": "false"}


def check_fsdp_config(fsdp_config: dict) -> bool:
    """Refuse, naming the key, any fsdp_config setting sparsevl's sharding would not honour; returns
    reshard_after_forward (True: FULL_SHARD, False: SHARD_GRAD_OP)."""
    for key, value in fsdp_config.items():
        if key not in ACCEPTED_FSDP_CONFIG:
            raise ValueError(f"--fsdp_config {key}={value!r} is not supported: sparsevl shards each vision and "
                             f"decoder layer itself (FSDP2); accepted keys: {sorted(ACCEPTED_FSDP_CONFIG)} "
                             "(use --gradient_checkpointing for activation checkpointing)")
        allowed = ACCEPTED_FSDP_CONFIG[key]
        if allowed is not None and _normalised(value) not in allowed:
            raise ValueError(f"--fsdp_config {key}={value!r} is not supported; accepted: {sorted(allowed, key=str)}")
    return _normalised(fsdp_config.get("reshard_after_forward", True)) is not False


def _normalised(value):
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return int(value) if isinstance(value, str) and value.isdigit() else value


def fsdp_flags_from_launcher(environ) -> list[str]:
    """`accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP and FSDP_* variables: turn them into
    `--fsdp --fsdp_config {...}` and remove ACCELERATE_USE_FSDP, so that Accelerate does not shard a second time."""
    if environ.pop("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return []
    config = {}
    for variable, key in LAUNCHER_FSDP_ENV.items():
        value = environ.get(variable)
        if value is not None and value.lower() != _LAUNCHER_DEFAULTS.get(key):
            config[key] = value
    return ["--fsdp", "--fsdp_config", json.dumps(config)]


def vision_layers(model: nn.Module) -> nn.ModuleList:
    encoder = model.vision_tower.encoder
    return getattr(encoder, "vision_model", encoder).encoder.layers


def shard_model(model: nn.Module, *, device_type: str, reshard_after_forward: bool = True) -> nn.Module:
    """fully_shard every vision layer, every decoder layer, then the root, over all processes (in place)."""
    if not dist.is_initialized() or dist.get_world_size() < 2:
        raise ValueError("--fsdp needs several processes: launch with `torchrun --nproc_per_node N -m sparsevl "
                         "train ...` or `accelerate launch --config_file configs/accelerate/fsdp_cpu_2proc.yaml ...`")
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    decoder, _ = causal_lm_parts(model.llm)
    for layer in [*vision_layers(model), *decoder.layers]:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def is_sharded(model: nn.Module | None) -> bool:
    return isinstance(model, FSDPModule)


def consolidated_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's plain state dict (LoRA merged) on every process: each shard gathered once, so tied
    weights stay one tensor. Every process must call it (the gathers are collective)."""
    gathered: dict[int, torch.Tensor] = {}
    state = {}
    for name, tensor in plain_state_dict(model).items():
        if isinstance(tensor, DTensor):
            if id(tensor) not in gathered:
                gathered[id(tensor)] = tensor.full_tensor().cpu()
            tensor = gathered[id(tensor)]
        state[name] = tensor
    return state


def _local(tensor):
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def save_shard(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | Path) -> None:
    """This process's shard of the live weights (LoRA unmerged) and of the optimizer state, as safetensors;
    rank 0 also writes the index that names every shard file."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tensors = {f"model/{name}": _local(t).detach() for name, t in model.state_dict().items()}
    optim = get_optimizer_state_dict(model, optimizer)
    for name, values in optim["state"].items():
        tensors.update({f"optim/{name}/{key}": _local(v) for key, v in values.items()})
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights({k: v.cpu() for k, v in tensors.items()}, directory / shard_file_name(rank, world),
                 metadata={"param_groups": json.dumps(optim["param_groups"])})
    if rank == 0:
        files = [shard_file_name(r, world) for r in range(world)]
        (directory / SHARD_INDEX_NAME).write_text(json.dumps({"world_size": world, "files": files}, indent=2))


def _read_shard(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    directory = Path(directory)
    index = json.loads((directory / SHARD_INDEX_NAME).read_text())
    world = dist.get_world_size()
    if index["world_size"] != world:
        raise ValueError(f"checkpoint {directory} was sharded over {index['world_size']} processes; resume it with "
                         f"as many (this run has {world})")
    return load_weights(directory / shard_file_name(dist.get_rank(), world), with_metadata=True)


def load_model_shard(model: nn.Module, directory: str | Path) -> None:
    """Copy this process's saved shard into the live (sharded) weights; every name must match."""
    saved, _ = _read_shard(directory)
    live = model.state_dict()
    names = {k.removeprefix("model/") for k in saved if k.startswith("model/")}
    if names != set(live):
        raise ValueError(f"checkpoint {directory} does not fit the model being trained: missing "
                         f"{sorted(set(live) - names)[:5]}, unexpected {sorted(names - set(live))[:5]}")
    with torch.no_grad():
        for name, tensor in live.items():
            _local(tensor).copy_(saved[f"model/{name}"])


def load_optimizer_shard(model: nn.Module, optimizer: torch.optim.Optimizer, directory: str | Path) -> None:
    """Rebuild the sharded optimizer state from this process's shard file."""
    saved, metadata = _read_shard(directory)
    params = dict(model.named_parameters())
    state: dict[str, dict] = {}
    for key, local in saved.items():
        if not key.startswith("optim/"):
            continue
        name, slot = key.removeprefix("optim/").rsplit("/", 1)
        param = params[name]
        if isinstance(param, DTensor) and local.dim() > 0:
            local = DTensor.from_local(local.to(param.device), param.device_mesh, param.placements,
                                       shape=param.shape, stride=param.stride(), run_check=False)
        state.setdefault(name, {})[slot] = local
    set_optimizer_state_dict(model, optimizer, {"state": state,
                                                "param_groups": json.loads(metadata["param_groups"])})
