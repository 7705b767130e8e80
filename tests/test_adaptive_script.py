"""scripts/finetune_adaptive.sh end to end: data, the adaptive finetune with the seed's flags, the layer analysis."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "finetune_adaptive.sh"
STEPS, BATCH = 4, 16  # BATCH: per_device_train_batch_size in configs/finetune_adaptive.yaml


def test_finetune_adaptive_script_trains_and_analyses(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(["bash", str(SCRIPT), str(out), "--max_steps", str(STEPS), "--save_steps", str(STEPS)],
                            env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]

    model_args = json.loads((out / "model" / "sparsevl_config.json").read_text())["model_args"]
    assert model_args["use_adaptive_layer_selection"] and model_args["top_k_layers"] == 3
    train_config = json.loads((out / "model" / "train_config.json").read_text())
    assert train_config["SparseVLTrainingArguments"]["layer_classifier_loss_weight"] == 0.1
    assert (out / "model" / "model.safetensors").is_file()

    trained = json.loads((out / "model" / "layer_selection_stats.json").read_text())
    assert sum(trained["total"].values()) == STEPS * BATCH
    assert f"total: {STEPS * BATCH}" in result.stdout and "=== Layer selection stats ===" in result.stdout

    analysis = json.loads((out / "layer_analysis" / "layer_analysis.json").read_text())["overall"]
    num_questions = len(json.loads((out / "data" / "test_qa.json").read_text()))
    assert analysis["count"] == num_questions == sum(analysis["layers"].values())
    assert set(analysis["forced"]) == set(analysis["layers"])
    assert (out / "model" / "layer_selection_stats.png").stat().st_size > 0
    assert (out / "layer_analysis" / "layer_selection.png").stat().st_size > 0
