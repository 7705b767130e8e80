"""The trainer's loss arithmetic and logging against values worked out by hand."""

import contextlib
import json
import time
from types import SimpleNamespace

import pytest
import torch
from tiny import make_model
from torch import nn
from transformers import TrainingArguments

from sparsevl.config import SparseVLTrainingArguments
from sparsevl.data.sampler import ModalityLengthGroupedSampler
from sparsevl.model.build import CONFIG_NAME, WEIGHTS_NAME, save_weights
from sparsevl.train.checkpointing import (RESUME_WEIGHTS_NAME, SHARD_INDEX_NAME, STAGING_PREFIX, TRAINER_FILES,
                                          latest_checkpoint, load_resume_weights, missing_files, save_resume_weights)
from sparsevl.train.guard import NonFiniteGuard
from sparsevl.train.trainer import (LogValuesCallback, SparseVLTrainer, global_batch_share, labelled_tokens,
                                    weighted_total, whole_parameters)


def test_weighted_total_and_unknown_losses():
    losses = {"lm": torch.tensor(2.0), "balance": torch.tensor(3.0)}
    assert float(weighted_total(losses, {"lm": 1.0, "balance": 0.01, "z": 5.0})) == pytest.approx(2.03)
    with pytest.raises(KeyError) as error:
        weighted_total({"lm": torch.tensor(1.0), "align": torch.tensor(1.0)}, {"lm": 1.0, "z": 0.0})
    assert error.value.args[0] == "no weight configured for loss(es) ['align']; known weights: ['lm', 'z']"


def test_labelled_tokens_counts_shifted_labels():
    labels = torch.tensor([[-100, 5, 6, -100], [1, -100, 7, 8]])
    assert labelled_tokens(labels) == 2 + 2  # the first column has no previous token to predict it from
    assert labelled_tokens(None) == 0


def test_global_batch_share_by_hand():
    shares = global_batch_share({"lm": torch.tensor(2.0), "balance": torch.tensor(0.4)}, 3, 12, num_processes=2,
                                accumulation_steps=4)
    assert float(shares["lm"]) == pytest.approx(2.0 * 3 * 2 / 12)  # lm x tokens here x processes / global tokens
    assert float(shares["balance"]) == pytest.approx(0.4 / 4)
    assert set(global_batch_share({"z": torch.tensor(1.0)}, 3, 12, num_processes=1, accumulation_steps=2)) == {"z"}


class FixedLosses(nn.Module):
    """A stand-in model whose forward returns given losses and labels."""

    def __init__(self, losses, labels, copies=1):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.result = SimpleNamespace(losses=losses, inputs=SimpleNamespace(labels=labels, copies=copies))

    def forward(self, **inputs):
        return self.result


class Constant(LogValuesCallback):
    def log_values(self, model):
        return {"expert_load/x": 1.5}


def make_trainer(tmp_path, model, **kwargs):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = SparseVLTrainer(model=model, args=args, loss_weights={"lm": 1.0, "balance": 0.5}, model_args=None,
                              **kwargs)
    trainer.current_gradient_accumulation_steps = 2  # set by Trainer's loop when training
    return trainer


def test_compute_loss_weights_the_global_share_and_records_raw_values(tmp_path):
    labels = torch.tensor([[-100, 4, 5, 6]])  # 3 labelled tokens
    model = FixedLosses({"lm": torch.tensor(2.0), "balance": torch.tensor(0.4)}, labels)
    trainer = make_trainer(tmp_path, model)
    model.train()
    total = trainer.compute_loss(model, {"sample_index": torch.tensor([0])}, num_items_in_batch=6)
    assert float(total) == pytest.approx(2.0 * 3 / 6 + 0.5 * 0.4 / 2)  # balance: 1 / accumulation steps
    assert dict(trainer._loss_sums) == pytest.approx({"lm": 6.0, "balance": 0.4})
    assert dict(trainer._loss_counts) == {"lm": 3, "balance": 1}
    model.eval()  # evaluation passes are not recorded
    total, outputs = trainer.compute_loss(model, {}, return_outputs=True)
    assert float(total) == pytest.approx(2.0 + 0.5 * 0.4) and outputs is model.result
    assert dict(trainer._loss_counts) == {"lm": 3, "balance": 1}


def test_compute_loss_divides_the_tokens_of_k_copies(tmp_path):
    labels = torch.tensor([[-100, 4, 5, 6, 7], [-100, 4, 5, 6, 7]])  # 2 copies of one sample: 4 tokens each
    model = FixedLosses({"lm": torch.tensor(1.0)}, labels, copies=2)
    trainer = make_trainer(tmp_path, model)
    model.train()
    assert float(trainer.compute_loss(model, {}, num_items_in_batch=8)) == pytest.approx(4 / 8)
    assert dict(trainer._loss_counts) == {"lm": 4}


def test_log_adds_token_weighted_means_bad_steps_and_callback_values(tmp_path):
    guard = NonFiniteGuard(3)
    trainer = make_trainer(tmp_path, FixedLosses({}, None), guard=guard, callbacks=[Constant()])
    trainer._record({"lm": torch.tensor(2.0), "balance": torch.tensor(1.0)}, 3)
    trainer._record({"lm": torch.tensor(4.0), "balance": torch.tensor(3.0)}, 1)
    trainer.log({"loss": 9.0})
    entry = trainer.state.log_history[-1]
    assert entry["loss_lm"] == pytest.approx((2 * 3 + 4 * 1) / 4)  # weighted by labelled tokens
    assert entry["loss_balance"] == pytest.approx((1 + 3) / 2)
    assert entry["bad_steps"] == 0 and entry["expert_load/x"] == 1.5
    trainer.log({"loss": 1.0})  # the sums were cleared by the previous log
    assert "loss_lm" not in trainer.state.log_history[-1]
    trainer.log({"eval_loss": 1.0})  # entries without "loss" get nothing added
    last = trainer.state.log_history[-1]
    assert "bad_steps" not in last and "expert_load/x" not in last and last["eval_loss"] == 1.0


def test_resume_weights_load_strictly_and_name_the_problem(tmp_path):
    saved = nn.Linear(2, 3)  # no `llm`: a plain (non-LoRA) model reads model.safetensors
    save_weights(saved.state_dict(), tmp_path / WEIGHTS_NAME)
    live = nn.Linear(2, 3)
    load_resume_weights(live, tmp_path)
    assert torch.equal(live.weight, saved.weight) and torch.equal(live.bias, saved.bias)
    save_resume_weights(live, tmp_path / "elsewhere")  # only LoRA runs keep a second copy
    assert not (tmp_path / "elsewhere" / RESUME_WEIGHTS_NAME).exists()
    with pytest.raises(ValueError) as error:
        load_resume_weights(nn.Linear(2, 4), tmp_path)
    assert str(error.value).startswith(f"checkpoint {tmp_path} does not fit the model being trained: ")
    lora = nn.Module()
    lora.llm = SimpleNamespace(merge_adapter=None)  # what PEFT's wrapper has
    with pytest.raises(ValueError) as error:
        load_resume_weights(lora, tmp_path)
    assert str(error.value) == (f"checkpoint {tmp_path} has no {RESUME_WEIGHTS_NAME}: it was not saved by a LoRA "
                                "run, so a LoRA run cannot resume from it")


def test_resume_weights_refuse_extra_and_missing_names(tmp_path):
    saved = nn.Linear(2, 3)
    save_weights({**saved.state_dict(), "extra": torch.zeros(1)}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match='Unexpected key\\(s\\) in state_dict: "extra"'):
        load_resume_weights(nn.Linear(2, 3), tmp_path)
    save_weights({"weight": saved.weight.detach()}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match='Missing key\\(s\\) in state_dict: "bias"'):
        load_resume_weights(nn.Linear(2, 3), tmp_path)


def test_missing_files_of_multi_process_and_sharded_checkpoints(tmp_path):
    def touch(*names):
        for name in names:
            (tmp_path / name).write_text("")

    touch(CONFIG_NAME, WEIGHTS_NAME, "trainer_state.json", "optimizer.pt", "scheduler.pt")
    assert missing_files(tmp_path) == ["rng_state.pth"]
    touch("rng_state_0.pth")  # several processes (data parallel): numbered RNG states instead
    assert missing_files(tmp_path) == []
    (tmp_path / SHARD_INDEX_NAME).write_text(json.dumps({"world_size": 2}))
    assert missing_files(tmp_path) == ["fsdp-shard-00000-of-00002.safetensors", "fsdp-shard-00001-of-00002.safetensors",
                                       "rng_state_1.pth"]
    touch("fsdp-shard-00000-of-00002.safetensors", "fsdp-shard-00001-of-00002.safetensors", "rng_state_1.pth")
    (tmp_path / "optimizer.pt").unlink()  # a sharded run keeps its optimizer state in the shards
    assert missing_files(tmp_path) == []
    for name in ("rng_state_0.pth", "rng_state_1.pth", CONFIG_NAME):
        (tmp_path / name).unlink()  # a sharded checkpoint without its RNG states and config
    assert missing_files(tmp_path) == [CONFIG_NAME, "rng_state_0.pth", "rng_state_1.pth"]


def test_modality_grouping_sampler_gets_the_global_batch_layout(tmp_path):
    class Records(list):
        modality_lengths = [5, -3, 7, -2]

    dataset = Records(range(4))
    args = SparseVLTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, seed=7,
                                     group_by_modality_length=True, per_device_train_batch_size=2,
                                     gradient_accumulation_steps=3)
    trainer = SparseVLTrainer(model=FixedLosses({}, None), args=args, loss_weights={"lm": 1.0}, model_args=None)
    sampler = trainer._get_train_sampler(dataset)
    assert isinstance(sampler, ModalityLengthGroupedSampler)
    assert (sampler.lengths, sampler.batch_size, sampler.world_size, sampler.seed) == ([5, -3, 7, -2], 2, 3, 7)
    trainer.train_dataset = dataset  # Trainer's own call passes no dataset
    assert trainer._get_train_sampler().lengths == [5, -3, 7, -2]
    args.group_by_modality_length = False
    trainer.train_dataset = Records(range(9))
    assert type(trainer._get_train_sampler(dataset)) is torch.utils.data.RandomSampler  # Trainer's own, on the
    assert trainer._get_train_sampler(dataset).data_source is dataset  # dataset it was given


def test_skipped_samples_are_named_by_index_and_record_id(tmp_path):
    trainer = make_trainer(tmp_path, FixedLosses({}, None))
    trainer.train_dataset = SimpleNamespace(record_id=lambda index: {3: "cat-7"}.get(index, ""))
    assert trainer._sample_name(3) == "3 (id 'cat-7')" and trainer._sample_name(4) == "4"
    trainer.train_dataset = []  # a dataset without record ids
    assert trainer._sample_name(5) == "5"


class HiddenStates(nn.Module):
    """A stand-in student (or teacher) returning fixed hidden states; it records the flags it was called with."""

    def __init__(self, hidden, kept_index=None, kept_mask=None, labels=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.hidden, self.kept_index, self.kept_mask, self.labels = hidden, kept_index, kept_mask, labels
        self.calls = []

    def forward(self, **inputs):
        self.calls.append(inputs)
        return SimpleNamespace(losses={"lm": torch.tensor(1.0)}, last_hidden_state=self.hidden,
                               kept_index=self.kept_index, kept_mask=self.kept_mask,
                               inputs=SimpleNamespace(labels=self.labels, copies=1))


def test_distillation_adds_the_alignment_loss_to_the_teacher_on_kept_tokens(tmp_path):
    teacher_hidden = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [4.0, 4.0]]])
    student = HiddenStates(torch.tensor([[[1.0, 1.0], [3.0, 3.0]]]), kept_index=torch.tensor([[0, 2]]),
                           kept_mask=torch.tensor([[True, True]]), labels=torch.tensor([[-100, 4]]))
    teacher = HiddenStates(teacher_hidden)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = SparseVLTrainer(model=student, args=args, loss_weights={"lm": 1.0, "align": 2.0}, model_args=None,
                              teacher=teacher)
    student.eval()
    total = trainer.compute_loss(student, {"input_ids": torch.ones(1, 2), "sample_index": torch.tensor([0])})
    # kept token 0 vs teacher token 0: (0 + 1) / 2; kept token 1 vs teacher token 2: (1 + 1) / 2 -> mean 0.75
    assert float(total) == pytest.approx(1.0 + 2.0 * 0.75)
    for calls in (student.calls, teacher.calls):  # both return hidden states; no sample_index passed on
        assert len(calls) == 1 and set(calls[0]) == {"input_ids", "return_hidden_states"}
        assert calls[0]["return_hidden_states"] is True


def test_latest_checkpoint_names_what_an_incomplete_one_lacks(tmp_path, caplog):
    for step, names in ((3, [CONFIG_NAME, WEIGHTS_NAME, *TRAINER_FILES]), (5, [CONFIG_NAME, WEIGHTS_NAME])):
        (tmp_path / f"checkpoint-{step}").mkdir()
        for name in names:
            (tmp_path / f"checkpoint-{step}" / name).write_text("")
    with caplog.at_level("WARNING", logger="sparsevl.train.checkpointing"):
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    assert caplog.messages == [f"ignoring incomplete checkpoint {tmp_path / 'checkpoint-5'} (missing "
                               f"{list(TRAINER_FILES)})"]


class LearnedLoss(nn.Module):
    """lm loss 2 * weight (weight starts at 1) over 3 labelled tokens."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, **inputs):
        labels = torch.tensor([[-100, 4, 5, 6]])
        return SimpleNamespace(losses={"lm": 2.0 * self.weight}, inputs=SimpleNamespace(labels=labels, copies=1))


def test_training_step_passes_the_global_token_count_and_names_the_samples_to_the_guard(tmp_path):
    guard = NonFiniteGuard(3)
    seen = []
    guard.observe = lambda loss, names: seen.append((float(loss), names))
    model = LearnedLoss()
    trainer = make_trainer(tmp_path, model, guard=guard)
    trainer.train_dataset = SimpleNamespace(record_id=lambda index: f"r{index}")
    trainer.training_step(model, {"sample_index": torch.tensor([4, 7])}, num_items_in_batch=12)
    trainer.training_step(model, {"input_ids": torch.ones(1, 4)}, num_items_in_batch=12)  # no indices: no names
    assert seen == [(pytest.approx(2.0 * 3 / 12), ["4 (id 'r4')", "7 (id 'r7')"]), (pytest.approx(0.5), [])]
    assert float(model.weight.grad) == pytest.approx(2 * (2.0 * 3 / 12))  # two backward passes summed


def test_whole_parameters_gathers_only_deepspeed_partitioned_parameters():
    model = nn.Linear(2, 2)
    assert isinstance(whole_parameters(model), contextlib.nullcontext)  # nothing partitioned: nothing to gather
    model.weight.ds_id = 1  # what ZeRO-3 marks its partitioned parameters with
    gathered = whole_parameters(model)
    assert type(gathered).__name__ == "GatheredParameters" and len(gathered.params) == 1
    assert gathered.params[0] is model.weight and gathered.src_rank is None  # read-only: no rank modifies them


def test_step_checkpoints_are_staged_published_and_rotated_keeping_the_best(tmp_path):
    model, model_args = make_model("tiny-qwen3")
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, save_total_limit=1)
    trainer = SparseVLTrainer(model=model, args=args, loss_weights={"lm": 1.0}, model_args=model_args)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    stale = tmp_path / f"{STAGING_PREFIX}checkpoint-1" / "checkpoint-1" / "stale.txt"
    stale.parent.mkdir(parents=True)
    stale.write_text("left by a save that was killed")
    assert trainer._get_output_dir(None) == str(tmp_path)  # before any save, too
    for step in (1, 2, 3):
        trainer.state.global_step = step
        trainer.state.best_global_step = 2 if step >= 2 else None
        trainer._save_checkpoint(model, trial=None)
        assert trainer._get_output_dir(None) == str(tmp_path)  # the staging folder is only used during a save
        assert not (tmp_path / "checkpoint-1" / "stale.txt").exists()  # a killed save's leftovers are not published
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")  # not the staging path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]  # limit 1, plus the best
    assert not missing_files(tmp_path / "checkpoint-3") and not missing_files(tmp_path / "checkpoint-2")


def test_log_sums_the_processes_before_averaging_and_keeps_eval_entries_apart(tmp_path):
    trainer = make_trainer(tmp_path, FixedLosses({}, None))
    reductions = []

    def reduce(stats, reduction):  # another process had lm 10 over 2 tokens and balance 1
        reductions.append(reduction)
        return stats + torch.tensor([[1.0, 1.0], [10.0, 2.0]], dtype=stats.dtype)

    trainer.accelerator = SimpleNamespace(num_processes=2, reduce=reduce)
    trainer._record({"lm": torch.tensor(2.0), "balance": torch.tensor(3.0)}, 3)  # here: lm 6 over 3 tokens
    trainer.log({"eval_loss": 1.0})  # an evaluation entry neither reports nor clears the training sums
    assert "loss_lm" not in trainer.state.log_history[-1] and reductions == []
    trainer.log({"loss": 1.0})
    entry = trainer.state.log_history[-1]
    assert (entry["loss_lm"], entry["loss_balance"], reductions) == (pytest.approx(16 / 5), 2.0, ["sum"])
    trainer.accelerator = SimpleNamespace(num_processes=1, reduce=reduce)
    trainer._record({"lm": torch.tensor(123456.789, dtype=torch.float64), "z": torch.tensor(0.1234567)}, 1)
    trainer.log({"loss": 1.0})
    entry = trainer.state.log_history[-1]  # one process: nothing reduced; sums in float64, rounded to 5 places
    assert (entry["loss_lm"], entry["loss_z"], reductions) == (123456.789, 0.12346, ["sum"])


def test_log_passes_the_start_time_for_token_throughput(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                             include_num_input_tokens_seen="all")
    trainer = SparseVLTrainer(model=FixedLosses({}, None), args=args, loss_weights={"lm": 1.0}, model_args=None)
    trainer._initial_num_input_tokens_seen = 0
    trainer.log({"loss": 1.0}, start_time=time.time() - 1)
    assert "train_tokens_per_second" in trainer.state.log_history[-1]


def test_trainer_asks_for_the_labelled_tokens_of_the_whole_global_batch(tmp_path):
    trainer = make_trainer(tmp_path, FixedLosses({}, None))
    batches = [{"labels": torch.tensor([[-100, 4, 5]])}, {"labels": torch.tensor([[7, -100, 8]])}]
    # shifted as the causal loss is: 2 + 1 labelled next tokens across the accumulated micro-batches
    assert int(trainer._get_num_items_in_batch(batches, torch.device("cpu"))) == 3
