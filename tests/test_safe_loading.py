"""Nothing we load is unpickled unsafely: a malicious pickle given as any checkpoint file is refused, never run."""

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
from tiny import train_flags

from sparsevl.config import parse_train_args
from sparsevl.model.build import load_checkpoint
from sparsevl.train.run import train

PACKAGE = Path(__file__).resolve().parents[1] / "sparsevl"


class Payload:
    """Unpickling this runs code that writes a file: proof of execution if the file ever appears."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('executed')",)


def write_malicious(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"state": Payload(marker)}))


@pytest.fixture(scope="module")
def checkpoint(shapes_dir, shapes_tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safe") / "run"
    train(*parse_train_args(train_flags(shapes_dir, shapes_tokenizer, out, max_steps=2, save_steps=2,
                                        per_device_train_batch_size=4, report_to="none")))
    return out / "checkpoint-2"


def test_the_payload_really_executes_when_unpickled(tmp_path):
    marker = tmp_path / "marker"
    write_malicious(tmp_path / "evil.pt", marker)
    pickle.loads((tmp_path / "evil.pt").read_bytes())  # noqa: S301 - the point: it runs code
    assert marker.read_text() == "executed"


@pytest.mark.parametrize("file_name", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_resume_refuses_a_malicious_trainer_state_file(checkpoint, shapes_dir, shapes_tokenizer, tmp_path, file_name):
    out = tmp_path / "run"
    shutil.copytree(checkpoint, out / "checkpoint-2")
    marker = tmp_path / "marker"
    write_malicious(out / "checkpoint-2" / file_name, marker)
    args = parse_train_args(train_flags(shapes_dir, shapes_tokenizer, out, max_steps=4, save_steps=2,
                                        per_device_train_batch_size=4, report_to="none",
                                        resume_from_checkpoint="latest"))
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint-2: refused to unpickle .*[Ww]eights only"):
        train(*args)
    assert not marker.exists()


def test_a_pickle_posing_as_model_safetensors_is_refused(checkpoint, tmp_path):
    target = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, target)
    marker = tmp_path / "marker"
    write_malicious(target / "model.safetensors", marker)
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        load_checkpoint(target)
    assert not marker.exists()


def test_a_pickled_bin_llm_is_refused(shapes_dir, shapes_tokenizer, tmp_path):
    llm_dir = tmp_path / "llm"
    llm_dir.mkdir()
    config = {"model_type": "qwen3", "vocab_size": 400, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}
    (llm_dir / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "marker"
    write_malicious(llm_dir / "pytorch_model.bin", marker)
    args = parse_train_args(train_flags(shapes_dir, shapes_tokenizer, tmp_path / "run", model_name_or_path=llm_dir,
                                        max_steps=1, report_to="none"))
    with pytest.raises(ValueError, match=r"llm: refused to unpickle its \.bin weights"):
        train(*args)
    assert not marker.exists()


def test_a_bin_llm_of_plain_tensors_loads(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from sparsevl.model import presets
    from sparsevl.model.build import build_llm

    source = AutoModelForCausalLM.from_config(presets.llm_preset_config("tiny-llama", vocab_size=64))
    source.config.save_pretrained(tmp_path / "llm")
    torch.save(source.state_dict(), tmp_path / "llm" / "pytorch_model.bin")  # the older transformers layout
    loaded = build_llm(str(tmp_path / "llm"), vocab_size=64)
    for (name, mine), theirs in zip(loaded.state_dict().items(), source.state_dict().values()):
        assert torch.equal(mine, theirs), name


def test_every_torch_load_in_the_package_is_weights_only():
    calls = [(path.name, line) for path in PACKAGE.rglob("*.py") for line in path.read_text().splitlines()
             if re.search(r"\btorch\.load\(|\bpickle\.loads?\(", line)]
    assert all("weights_only=True" in line for _, line in calls), calls
