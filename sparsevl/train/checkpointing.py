"""Step checkpoints that survive a kill: staged then renamed into place, found again by `latest`, reloaded strictly.

A step checkpoint is a directory `checkpoint-<step>` holding the model (`save_checkpoint`'s files), the
optimizer, scheduler and RNG states and `trainer_state.json` (which also records the data-loader position).
It is written under `.staging-checkpoint-<step>` and renamed when every file is on disk, so a process killed
during a save leaves a staging folder that nothing reads, and every `checkpoint-<step>` is complete.
"""

import json
import logging
import os
import re
import shutil
from pathlib import Path

from torch import nn

from sparsevl.model.build import CONFIG_NAME, WEIGHTS_NAME, load_weights, save_weights

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".staging-"
# The unmerged weights of a LoRA run (model.safetensors holds them merged, which cannot be trained on).
RESUME_WEIGHTS_NAME = "resume_weights.safetensors"
TRAINER_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth")
RESUME_LATEST = "latest"
# Sharded (FSDP) step checkpoints: one safetensors file per process, named in the index, instead of optimizer.pt.
SHARD_INDEX_NAME = "fsdp_shards.json"
_STEP_DIR = re.compile(r"^checkpoint-(\d+)$")


def shard_file_name(rank: int, world_size: int) -> str:
    return f"fsdp-shard-{rank:05d}-of-{world_size:05d}.safetensors"


def missing_files(checkpoint: str | Path) -> list[str]:
    """The files a resumable step checkpoint needs but `checkpoint` lacks (empty when complete)."""
    checkpoint = Path(checkpoint)
    needed = [CONFIG_NAME, WEIGHTS_NAME, *TRAINER_FILES]
    if (checkpoint / "rng_state_0.pth").is_file():  # several processes: one RNG state each
        needed.remove("rng_state.pth")
    index = checkpoint / SHARD_INDEX_NAME
    if index.is_file():  # a sharded checkpoint: every process's shard and RNG state replace optimizer.pt
        world_size = json.loads(index.read_text())["world_size"]
        needed = [name for name in needed if name not in ("optimizer.pt", "rng_state.pth")]
        needed += [shard_file_name(r, world_size) for r in range(world_size)]
        needed += [f"rng_state_{r}.pth" for r in range(world_size)]
    return [name for name in needed if not (checkpoint / name).is_file()]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete `checkpoint-<step>` with the highest step in `output_dir`, or None."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = {int(m.group(1)): path for path in output_dir.iterdir() if (m := _STEP_DIR.match(path.name))}
    for step in sorted(steps, reverse=True):
        if not missing_files(steps[step]):
            return steps[step]
        logger.warning("ignoring incomplete checkpoint %s (missing %s)", steps[step], missing_files(steps[step]))
    return None


def resolve_resume(value: str | None, output_dir: str | Path) -> str | None:
    """`--resume_from_checkpoint` as a directory: `latest` is the newest complete checkpoint (None if none yet)."""
    if value is None or value.lower() in ("", "false", "none"):
        return None
    if value.lower() in (RESUME_LATEST, "true"):
        found = latest_checkpoint(output_dir)
        if found is None:
            print(f"no complete checkpoint in {output_dir} yet: starting fresh", flush=True)
        return str(found) if found else None
    missing = missing_files(value)
    if missing:
        raise ValueError(f"--resume_from_checkpoint {value}: not a complete step checkpoint (missing {missing})")
    return value


def remove_staging_dirs(output_dir: str | Path) -> list[Path]:
    """Delete the staging folders of saves that never finished (a process killed mid-save leaves them).

    A folder that `publish` had moved aside but whose replacement never arrived is put back instead.
    """
    output_dir = Path(output_dir)
    for old in output_dir.glob(f"{STAGING_PREFIX}old-*"):  # nothing when the folder does not exist
        final = output_dir / old.name.removeprefix(f"{STAGING_PREFIX}old-")
        if not final.exists():
            os.replace(old, final)
    stale = sorted(output_dir.glob(STAGING_PREFIX + "*"))
    for path in stale:
        logger.warning("removing %s: a save that did not finish", path)
        shutil.rmtree(path, ignore_errors=True)
    return stale


def publish(staged: Path, final: Path) -> None:
    """Move a fully written directory to its final name; a previous `final` is replaced only afterwards."""
    _fsync_tree(staged)
    old = final.with_name(f"{STAGING_PREFIX}old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    """Flush the files' contents to disk before the rename makes them visible (a power cut, not only a kill)."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def save_resume_weights(model: nn.Module, directory: str | Path) -> None:
    """For LoRA runs, also keep the live (unmerged) weights so that training can continue from them."""
    if hasattr(getattr(model, "llm", None), "merge_adapter"):
        save_weights(model.state_dict(), Path(directory) / RESUME_WEIGHTS_NAME)


def load_resume_weights(model: nn.Module, checkpoint: str | Path) -> None:
    """Load a step checkpoint's weights into the live model, strictly (safetensors only, nothing unpickled)."""
    checkpoint = Path(checkpoint)
    live = checkpoint / RESUME_WEIGHTS_NAME
    is_lora = hasattr(getattr(model, "llm", None), "merge_adapter")
    if is_lora and not live.is_file():
        raise ValueError(f"checkpoint {checkpoint} has no {RESUME_WEIGHTS_NAME}: it was not saved by a LoRA run, "
                         "so a LoRA run cannot resume from it")
    state = load_weights(live if is_lora else checkpoint / WEIGHTS_NAME)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"checkpoint {checkpoint} does not fit the model being trained: {error}") from None
