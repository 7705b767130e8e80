"""README commands and flags that had no test of their own, each checked by its values."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

from sparsevl.cli import main as sparsevl
from sparsevl.config import ModelArguments, parse_train_args
from sparsevl.eval.metrics import exact_match_by_type
from sparsevl.model.build import build_model, load_checkpoint
from sparsevl.model.presets import llm_preset_config
from sparsevl.serve.assistant import VisionAssistant
from sparsevl.train.run import train

ROOT = Path(__file__).resolve().parents[1]


def chat(argv: list[str], stdin: str, monkeypatch, capsys) -> list[str]:
    """`sparsevl chat ARGS` fed `stdin` from a pipe; returns the answers it printed."""
    from sparsevl.serve.chat import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    return [line.removeprefix("ASSISTANT: ").rstrip() for line in out.splitlines() if line.startswith("ASSISTANT:")]


def test_chat_image_command_switches_the_image_and_forgets(lively_checkpoint, shapes_dir, monkeypatch, capsys):
    first, second = (shapes_dir / "images" / "test" / f"00000{i}.png" for i in (0, 1))
    question = "what colour is the object?"
    answers = chat(["--model", str(lively_checkpoint), "--image", str(first), "--max_new_tokens", "4"],
                   f"{question}\n/image {second}\n{question}\n", monkeypatch, capsys)
    assistant = VisionAssistant.load(lively_checkpoint)
    expected = [assistant.ask(Image.open(path).convert("RGB"), question, max_new_tokens=4).text
                for path in (first, second)]
    assert expected[0] != expected[1], "the two images should get different answers from this model"
    assert answers == expected  # the second answer is about the new image, with no history


def test_chat_sampling_is_reproducible_per_seed_and_differs_from_greedy(lively_checkpoint, shapes_dir,
                                                                          monkeypatch, capsys):
    base = ["--model", str(lively_checkpoint), "--image", str(shapes_dir / "images" / "test" / "000000.png"),
            "--max_new_tokens", "8"]
    questions = "what shape?\n/reset\nwhat shape?\n"
    greedy = chat(base, questions, monkeypatch, capsys)
    seeded = chat(base + ["--temperature", "1.5", "--seed", "3"], questions, monkeypatch, capsys)
    again = chat(base + ["--temperature", "1.5", "--seed", "3"], questions, monkeypatch, capsys)
    other = chat(base + ["--temperature", "1.5", "--seed", "4"], questions, monkeypatch, capsys)
    assert seeded == again  # the same seed gives the same answers
    assert seeded[0] == seeded[1]  # each question restarts the sampler from --seed
    assert seeded[0] != greedy[0] and seeded[0] != other[0]


def llama_parameters(vocab: int, d: int, layers: int, ffn: int, q_dim: int, kv_dim: int, head_dim: int = 0) -> int:
    """Parameters of a LLaMA/Qwen3 decoder by hand: embeddings, per layer attention + gated MLP + 2 norms
    (+ Qwen3's q/k norms of head_dim each), final norm, untied head."""
    attention = d * q_dim + 2 * d * kv_dim + q_dim * d + 2 * head_dim
    return vocab * d + layers * (attention + 3 * d * ffn + 2 * d) + d + vocab * d


@pytest.mark.parametrize("llm, vision, expected_llm, tokens", [
    ("mid-llama", "mid-clip", llama_parameters(100, 512, 8, 1536, 512, 512), (336 // 14) ** 2),
    ("mid-qwen3", "mid-clip64", llama_parameters(100, 1024, 8, 3072, 16 * 64, 8 * 64, head_dim=64), 64),
])
def test_mid_presets_build_with_their_sizes(llm, vision, expected_llm, tokens):
    with torch.device("meta"):  # shapes only
        model = build_model(ModelArguments(model_name_or_path=llm, vision_tower=vision), vocab_size=100,
                            image_token_id=99)
    assert sum(p.numel() for p in model.llm.parameters()) == expected_llm
    assert model.num_image_tokens == tokens and model.vision_tower.hidden_size == 512
    assert model.projector(torch.zeros(1, tokens, 512, device="meta"))[0].shape == (1, tokens, model.llm.config.hidden_size)


def test_local_llm_and_clip_directories_are_loaded_with_their_weights(shapes_dir, shapes_tokenizer, tmp_path):
    torch.manual_seed(3)
    llm = AutoModelForCausalLM.from_config(llm_preset_config("tiny-llama", vocab_size=len(shapes_tokenizer) + 1))
    llm.save_pretrained(tmp_path / "my-llm")
    clip = CLIPVisionModel(CLIPVisionConfig(image_size=64, patch_size=8, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=3, num_attention_heads=4))
    clip.save_pretrained(tmp_path / "my-clip")
    flags = ["--model_name_or_path", str(tmp_path / "my-llm"), "--vision_tower", str(tmp_path / "my-clip"),
             "--tokenizer_name_or_path", shapes_tokenizer.name_or_path, "--data_path", str(shapes_dir / "finetune.json"),
             "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--learning_rate", "0", "--report_to", "none",
             "--per_device_train_batch_size", "2", "--save_steps", "1000"]
    model, _ = load_checkpoint(train(*parse_train_args(flags)))
    for name, tensor in llm.state_dict().items():
        assert torch.equal(model.llm.state_dict()[name], tensor), name
    for name, tensor in clip.state_dict().items():
        assert torch.equal(model.vision_tower.encoder.state_dict()[name], tensor), name
    assert model.num_image_tokens == 64 and model.vision_tower.select_layer == -2


def test_export_verify_catches_a_wrong_export_and_false_skips_it(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from sparsevl.model import llava_hf

    original = llava_hf.to_llava_hf_state_dict

    def off_by_a_little(model, **kwargs):  # a planted export bug: one projector weight nudged
        state = original(model, **kwargs)
        bias = next(name for name in state if name.endswith("multi_modal_projector.linear_2.bias"))
        state[bias] = state[bias] + 0.01
        return state

    argv = ["export", "--to", "llava-hf", "--model", str(tiny_checkpoint)]
    assert sparsevl(argv + ["--out", str(tmp_path / "good")]) == 0
    assert "verified: plain transformers logits match" in capsys.readouterr().out
    monkeypatch.setattr(llava_hf, "to_llava_hf_state_dict", off_by_a_little)
    assert sparsevl(argv + ["--out", str(tmp_path / "bad")]) == 2
    assert f"exported model in {tmp_path / 'bad'} differs from" in capsys.readouterr().err
    assert sparsevl(argv + ["--out", str(tmp_path / "unchecked"), "--verify", "false"]) == 0
    assert "verified" not in capsys.readouterr().out


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reports_the_scores_of_its_answers(tmp_path, capsys):
    out = tmp_path / "demo"
    assert sparsevl(["demo", "--out", str(out), "--num_train", "16", "--num_test", "3", "--num_simple", "8",
                     "--qa_per_image", "1", "--pretrain_steps", "2", "--finetune_steps", "3", "--batch_size", "4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "eval" / "answers.jsonl").read_text().splitlines()]
    questions = json.loads((out / "data" / "test_qa.json").read_text())
    pope = json.loads((out / "data" / "test_pope.json").read_text())
    assert len(rows) == len(questions) + len(pope)
    assert summary["metrics"]["qa"] == exact_match_by_type([r for r in rows if "pope_kind" not in r])
    assert summary["metrics"]["pope"]["overall"]["count"] == len(pope)
    steps = [json.loads((out / stage / "log_history.json").read_text())[-1]["step"] for stage in ("pretrain", "finetune")]
    assert steps == [2, 3]  # --pretrain_steps, --finetune_steps
    assert (out / "training_curve.png").stat().st_size > 1000
    assert f"model: {out / 'finetune'}" in capsys.readouterr().out


@pytest.mark.slow
def test_moe_tuning_script_chains_its_three_stages(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "STEPS": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(["bash", str(ROOT / "scripts" / "moe_tuning.sh"), str(tmp_path / "mt")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "mt"
    stage2, stage3 = (json.loads((out / s / "train_config.json").read_text()) for s in ("stage2", "stage3"))
    assert stage3["ModelArguments"]["model_name_or_path"] == str(out / "stage2")  # each stage starts from the last
    assert stage2["ModelArguments"]["model_name_or_path"] == str(out / "stage1")
    dense, moe = load_file(out / "stage2" / "model.safetensors"), load_file(out / "stage3" / "model.safetensors")
    assert not any("expert" in name for name in dense) and any("expert" in name for name in moe)
    exported = json.loads((out / "qwen3_moe" / "config.json").read_text())
    assert exported["model_type"] == "qwen3_moe"
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["qa"]["overall"]["count"] == len(json.loads((out / "data" / "test_qa.json").read_text()))
    assert any((out / "routing").iterdir())


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(shapes_dir, shapes_tokenizer, tmp_path):
    from test_distributed import assert_same_run, flags, free_port

    one = train(*parse_train_args(flags(shapes_dir, shapes_tokenizer, tmp_path / "one", per_device_train_batch_size=8)))
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(free_port()), "-m", "sparsevl", "train",
              *flags(shapes_dir, shapes_tokenizer, tmp_path / "two", per_device_train_batch_size=4)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("saved model to") == 2  # both ranks ran to the end
    assert_same_run(one, tmp_path / "two")
