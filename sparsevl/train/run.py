"""The training recipe: build or load the model, set what trains, train, save. Used by `sparsevl train`."""

import json
import logging
import pickle
from pathlib import Path

from transformers import AutoImageProcessor, set_seed

from sparsevl.config import DataArguments, ModelArguments, SparseVLTrainingArguments, resolved_config
from sparsevl.data.dataset import LlavaJsonDataset, PaddingCollator, with_aspect_ratio
from sparsevl.data.tokenizer import add_image_token, load_tokenizer
from sparsevl.model.adaptive import attach_layer_selector
from sparsevl.model.build import (apply_load_options, build_image_processor, build_model, configure_trainable,
                                  count_activated_parameters, count_parameters, is_checkpoint, load_checkpoint,
                                  save_checkpoint)
from sparsevl.model.checkpoint_flags import apply_checkpoint_flags
from sparsevl.model.llava_original import load_projector_adapter
from sparsevl.model.pruning import build_pruning_plan
from sparsevl.model.upcycle import apply_moe_arguments
from sparsevl.train.checkpointing import latest_checkpoint, remove_staging_dirs, resolve_resume
from sparsevl.train.distill import load_teacher, make_teacher
from sparsevl.train.expert_usage import ExpertUsageCallback
from sparsevl.train.guard import NonFiniteGuard, TooManyBadSteps
from sparsevl.train.layer_stats import layer_selection_callbacks
from sparsevl.train.sharding import check_fsdp_config, consolidated_state_dict, is_sharded, shard_model
from sparsevl.train.trainer import BestCheckpointCallback, SparseVLTrainer, whole_parameters
from sparsevl.train.zero import check_deepspeed

logger = logging.getLogger(__name__)


def load_model_and_processors(model_args: ModelArguments):
    """(model, tokenizer, image_processor, model_args) from a sparsevl checkpoint or from presets/local dirs."""
    source = model_args.model_name_or_path
    tokenizer_path = model_args.tokenizer_name_or_path or source
    if not Path(tokenizer_path).is_dir():
        raise ValueError(f"--tokenizer_name_or_path is needed: {tokenizer_path!r} is not a tokenizer directory")
    tokenizer = load_tokenizer(tokenizer_path)
    image_token_id = add_image_token(tokenizer)
    if is_checkpoint(source):
        model, saved = load_checkpoint(source)
        model_args = apply_checkpoint_flags(model, saved, model_args, source=source)
        apply_load_options(model, model_args)
        apply_moe_arguments(model.llm, model_args)  # --stage moe upcycles a dense stage-2 checkpoint
        attach_layer_selector(model, model_args)
        image_processor = AutoImageProcessor.from_pretrained(source, local_files_only=True)
        if model.image_token_id != image_token_id:
            raise ValueError(f"tokenizer {tokenizer_path} maps <image> to {image_token_id}, but checkpoint "
                             f"{source} was trained with {model.image_token_id}")
    else:
        model = build_model(model_args, vocab_size=len(tokenizer), image_token_id=image_token_id)
        image_processor = build_image_processor(model_args.vision_tower, model.vision_tower.config)
    if model_args.pretrain_mm_mlp_adapter:
        load_projector_adapter(model, model_args.pretrain_mm_mlp_adapter)
        print(f"projector weights from {model_args.pretrain_mm_mlp_adapter}", flush=True)
    return model, tokenizer, image_processor, model_args


def loss_weights(training_args: SparseVLTrainingArguments) -> dict[str, float]:
    """Weight of every named loss a model may return (the trainer refuses a loss without one)."""
    z_weight = training_args.router_z_loss_weight
    return {"lm": 1.0, "balance": training_args.moe_load_balancing_weight, "z": z_weight,
            "llm_balance": training_args.moe_aux_loss_coef, "llm_z": z_weight, "align": training_args.align_loss_weight,
            "layer_cls": training_args.layer_classifier_loss_weight}


def describe_parameters(model, mode: str) -> str:
    """Trainable and total parameters; for a model with MoE layers also the activated ones (per token)."""
    trainable, total = count_parameters(model)
    activated = count_activated_parameters(model)
    line = (f"training mode {mode}: trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}")
    return line + (f" || activated params: {activated:,}" if activated != total else "")


def build_trainer(model_args: ModelArguments, data_args: DataArguments, training_args: SparseVLTrainingArguments
                  ) -> tuple[SparseVLTrainer, ModelArguments]:
    """The model (built or loaded, set to train), the data set and the trainer of one stage; also the model
    arguments resolved against a loaded checkpoint."""
    if not data_args.data_path:
        raise ValueError("--data_path is required")
    set_seed(training_args.seed)
    model, tokenizer, image_processor, model_args = load_model_and_processors(model_args)
    model.pruning = build_pruning_plan(model_args, model)
    teacher = None
    if training_args.stage == "sparse_distill":
        if not model.prunes_in_llm:  # the alignment maps student tokens to the teacher's by position in the LLM
            raise ValueError("--stage sparse_distill needs an in-LLM --token_pruner (sparsevlm, fastv or random)")
        teacher_path = training_args.teacher_model_name_or_path
        teacher = load_teacher(teacher_path, model) if teacher_path else make_teacher(model)
        print(f"teacher (frozen, no pruning) from {teacher_path or 'the student checkpoint'}: "
              + describe_parameters(teacher, "frozen"), flush=True)
    image_processor = with_aspect_ratio(image_processor, data_args.image_aspect_ratio)
    mode = configure_trainable(model, model_args)
    print(("student (pruned): " if teacher is not None else "") + describe_parameters(model, mode), flush=True)
    check_deepspeed(training_args, model)
    if training_args.fsdp:
        reshard_after_forward = check_fsdp_config(training_args.fsdp_config or {})
        for module in (model, teacher) if teacher is not None else (model,):
            shard_model(module, device_type=training_args.device.type, reshard_after_forward=reshard_after_forward)
    dataset = LlavaJsonDataset(data_args.data_path, tokenizer=tokenizer, image_processor=image_processor,
                               image_folder=data_args.image_folder, template=data_args.conversation_template,
                               max_length=data_args.model_max_length, num_image_tokens=model.num_image_tokens,
                               skip_bad_samples=data_args.skip_bad_samples, image_cache_mb=data_args.image_cache_mb)
    report_skipped(dataset.skipped, data_args.data_path)
    trainer = SparseVLTrainer(model=model, args=training_args, train_dataset=dataset,
                              data_collator=PaddingCollator(tokenizer.pad_token_id), processing_class=tokenizer,
                              callbacks=[BestCheckpointCallback(), ExpertUsageCallback(), *layer_selection_callbacks(
                                  model, training_args.layer_exploration_warmup_steps,
                                  training_args.layer_exploration_rate)],
                              loss_weights=loss_weights(training_args),
                              model_args=model_args, image_processor=image_processor,
                              guard=NonFiniteGuard(training_args.max_bad_steps), teacher=teacher)
    return trainer, model_args


def train(model_args: ModelArguments, data_args: DataArguments, training_args: SparseVLTrainingArguments) -> Path:
    """Run one training stage; returns the directory of the final checkpoint."""
    trainer, model_args = build_trainer(model_args, data_args, training_args)
    model, guard, tokenizer = trainer.model, trainer.guard, trainer.processing_class
    out_dir = Path(training_args.output_dir)
    resume = resolve_resume(training_args.resume_from_checkpoint, out_dir)
    remove_staging_dirs(out_dir)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except pickle.UnpicklingError as error:  # torch.load(weights_only=True) refused a file of the checkpoint
        raise ValueError(f"checkpoint {resume}: refused to unpickle one of its files: {error}") from None
    if guard.stopped:
        raise TooManyBadSteps(
            f"training stopped at step {trainer.state.global_step}: {guard.consecutive} consecutive steps had a "
            f"non-finite loss or gradient (--max_bad_steps {guard.max_bad_steps}); last: {guard.bad_steps[-1]}. "
            f"The last good checkpoint is {latest_checkpoint(out_dir)}; no final model was written.")
    state = consolidated_state_dict(model) if is_sharded(model) else None  # FSDP: every process gathers
    with whole_parameters(model):  # under DeepSpeed ZeRO-3 every process joins the gather; rank 0 writes
        if trainer.is_world_process_zero():
            save_checkpoint(model, out_dir, model_args=model_args, tokenizer=tokenizer,
                            image_processor=trainer.image_processor, state_dict=state)
    if trainer.is_world_process_zero():
        config = resolved_config(model_args, data_args, training_args)
        config["skipped_records"] = trainer.train_dataset.skipped
        config["bad_steps"] = guard.bad_steps
        (out_dir / "train_config.json").write_text(json.dumps(config, indent=2, default=str))
        (out_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))
    trainer.accelerator.wait_for_everyone()  # no process returns before rank 0 has written the model
    return out_dir


def report_skipped(skipped: list[tuple[str, str]], data_path: str) -> None:
    """Print every record that --skip_bad_samples dropped, with the reason (also saved in train_config.json)."""
    if skipped:
        print(f"skipped {len(skipped)} bad record(s) of {data_path}:", flush=True)
        for name, reason in skipped:
            print(f"  {name}: {reason}", flush=True)
