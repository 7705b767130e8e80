"""The trainer's sharded (FSDP2) checkpoint paths, in one process: a one-rank gloo group shards a small model, and
a resumed copy must get back the weights, the optimizer state and the scheduler, with the resume announced."""

from pathlib import Path
from types import SimpleNamespace

import pickle

import pytest
import torch
import torch.distributed as dist
from test_trainer_units import HiddenStates
from tiny import make_model
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import TrainingArguments
from transformers.trainer import SCHEDULER_NAME

from sparsevl.model.build import WEIGHTS_NAME, build_image_processor, load_checkpoint, save_weights
from sparsevl.train.checkpointing import SHARD_INDEX_NAME, shard_file_name
from sparsevl.train.trainer import SparseVLTrainer


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def mlp(seed: int, sharded: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    if sharded:
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    return model


def trained(model: nn.Module):
    """An AdamW optimizer and a step scheduler that have taken one step on `model`."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model(torch.randn(3, 4)).square().sum().backward()
    optimizer.step()
    scheduler.step()
    return optimizer, scheduler


def bare_trainer(model, optimizer=None, scheduler=None, *, sharded=True, should_save=True) -> SparseVLTrainer:
    """A trainer holding only what its checkpoint methods read (no Trainer set-up, no accelerator)."""
    trainer = SparseVLTrainer.__new__(SparseVLTrainer)
    trainer.model, trainer.sharded, trainer.optimizer, trainer.lr_scheduler = model, sharded, optimizer, scheduler
    trainer.args = SimpleNamespace(should_save=should_save)
    return trainer


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(full(x), full(y)), name


def test_sharded_resume_restores_weights_optimizer_and_scheduler(one_rank, tmp_path, capsys):
    source = mlp(0)
    optimizer, scheduler = trained(source)
    bare_trainer(source, optimizer, scheduler)._save_optimizer_and_scheduler(str(tmp_path))
    assert (tmp_path / SCHEDULER_NAME).is_file() and (tmp_path / shard_file_name(0, 1)).is_file()
    assert (tmp_path / SHARD_INDEX_NAME).is_file()

    target = mlp(1)
    target_optimizer, target_scheduler = trained(target)
    target_scheduler.step()  # a different schedule position, to be overwritten
    resumed = bare_trainer(target, target_optimizer, target_scheduler)
    resumed._load_from_checkpoint(str(tmp_path))
    assert capsys.readouterr().out == f"resuming from {tmp_path}\n"
    assert_same_weights(target, source)
    resumed._load_optimizer_and_scheduler(str(tmp_path))
    assert target_scheduler.state_dict() == scheduler.state_dict()
    for param, twin in zip(source.parameters(), target.parameters(), strict=True):
        saved, loaded = optimizer.state[param], target_optimizer.state[twin]
        assert set(saved) == set(loaded) and all(torch.equal(full(saved[k]), full(loaded[k])) for k in saved)
    resumed._load_optimizer_and_scheduler(None)  # nothing to resume from: Trainer's own path, which does nothing
    assert target_scheduler.state_dict() == scheduler.state_dict()

    other = mlp(2)  # the model Trainer passes in (e.g. the wrapped one) is the one loaded, not the trainer's own
    bare_trainer(mlp(3))._load_from_checkpoint(str(tmp_path), model=other)
    assert_same_weights(other, source)


def test_only_the_writer_process_saves_the_scheduler(one_rank, tmp_path):
    source = mlp(0)
    optimizer, scheduler = trained(source)
    bare_trainer(source, optimizer, scheduler, should_save=False)._save_optimizer_and_scheduler(str(tmp_path))
    assert (tmp_path / shard_file_name(0, 1)).is_file() and not (tmp_path / SCHEDULER_NAME).exists()


def test_an_unsharded_resume_loads_the_model_it_is_given(tmp_path, capsys):
    source = mlp(0, sharded=False)
    save_weights(source.state_dict(), tmp_path / WEIGHTS_NAME)
    other = mlp(1, sharded=False)
    bare_trainer(mlp(2, sharded=False), sharded=False)._load_from_checkpoint(str(tmp_path), model=other)
    assert capsys.readouterr().out == f"resuming from {tmp_path}\n"
    assert_same_weights(other, source)


def saving_trainer(model, model_args, tokenizer, out, *, sharded=False, should_save=True) -> SparseVLTrainer:
    trainer = bare_trainer(model, sharded=sharded, should_save=should_save)
    trainer.args.output_dir = str(out)
    trainer.model_args, trainer.processing_class = model_args, tokenizer
    trainer.image_processor = build_image_processor(model_args.vision_tower, model.vision_tower.config)
    return trainer


def test_save_writes_the_model_with_its_tokenizer_and_image_processor(shapes_tokenizer, tmp_path):
    model, model_args = make_model("tiny-qwen3")
    saving_trainer(model, model_args, shapes_tokenizer, tmp_path / "default")._save()  # Trainer's output_dir
    saving_trainer(model, model_args, shapes_tokenizer, tmp_path / "default")._save(str(tmp_path / "given"))
    for directory in (tmp_path / "default", tmp_path / "given"):
        assert (directory / "tokenizer_config.json").is_file() and (directory / "preprocessor_config.json").is_file()
        assert_same_weights(load_checkpoint(directory)[0], model)
    saving_trainer(model, model_args, shapes_tokenizer, tmp_path / "other", should_save=False)._save()
    assert not (tmp_path / "other").exists()  # only the writer process writes


def test_a_sharded_save_gathers_the_whole_model(one_rank, shapes_tokenizer, tmp_path):
    model, model_args = make_model("tiny-qwen3")
    whole, _ = make_model("tiny-qwen3")  # the same seed: the same weights, unsharded
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    saving_trainer(model, model_args, shapes_tokenizer, tmp_path, sharded=True)._save()
    saved, _ = load_checkpoint(tmp_path)
    assert_same_weights(saved, whole)


def test_a_sharded_model_is_placed_by_fsdp_not_by_trainer(one_rank, tmp_path):
    model = mlp(0)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = SparseVLTrainer(model=model, args=args, loss_weights={"lm": 1.0}, model_args=None)
    assert trainer.sharded and trainer.is_distributed_loading_by_transformers
    plain = SparseVLTrainer(model=mlp(0, sharded=False), args=args, loss_weights={"lm": 1.0}, model_args=None)
    assert plain.sharded is False and plain.is_distributed_loading_by_transformers is False
    # Accelerate must not wrap an FSDP model a second time: its plugin is dropped for sharded models only
    assert trainer._build_accelerator_args(fsdp_plugin="a plugin")["fsdp_plugin"] is None
    assert plain._build_accelerator_args(fsdp_plugin="a plugin")["fsdp_plugin"] == "a plugin"


class Payload:
    """A pickle that would write a file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "the payload ran"))


def test_a_sharded_resume_refuses_a_pickled_scheduler_payload(one_rank, tmp_path):
    source = mlp(0)
    optimizer, scheduler = trained(source)
    bare_trainer(source, optimizer, scheduler)._save_optimizer_and_scheduler(str(tmp_path))
    torch.save(Payload(tmp_path / "ran.txt"), tmp_path / SCHEDULER_NAME)
    target = mlp(1)
    resumed = bare_trainer(target, *trained(target))
    with pytest.raises(pickle.UnpicklingError):
        resumed._load_optimizer_and_scheduler(str(tmp_path))
    assert not (tmp_path / "ran.txt").exists()


def test_distillation_reshards_a_sharded_teacher_after_its_forward(one_rank, tmp_path):
    student = HiddenStates(torch.tensor([[[1.0, 1.0]]]), kept_index=torch.tensor([[0]]),
                           kept_mask=torch.tensor([[True]]), labels=torch.tensor([[-100, 4]]))
    teacher = HiddenStates(torch.tensor([[[1.0, 0.0]]]))
    fully_shard(teacher, mesh=init_device_mesh("cpu", (1,)))
    reshards = []
    teacher.reshard = lambda: reshards.append(True)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = SparseVLTrainer(model=student, args=args, loss_weights={"lm": 1.0, "align": 1.0}, model_args=None,
                              teacher=teacher)
    student.eval()
    assert float(trainer.compute_loss(student, {"input_ids": torch.ones(1, 2)})) == pytest.approx(1.0 + 0.5)
    assert reshards == [True]
