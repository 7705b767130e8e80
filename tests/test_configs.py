"""Every YAML recipe under configs/ parses and builds (recursively: a recipe in a subfolder counts too)."""

from pathlib import Path

import pytest
import yaml

from sparsevl.config import parse_train_args
from sparsevl.model.build import build_model, configure_trainable

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# Subfolders holding other tools' files (their own tests check them); everything else is a `sparsevl train` recipe.
OTHER_FORMATS = {"classify", "accelerate", "deepspeed"}
TRAIN_RECIPES = sorted(p for p in CONFIGS.rglob("*.yaml")
                       if not OTHER_FORMATS.intersection(p.relative_to(CONFIGS).parts[:-1]))


def test_there_are_recipes():
    assert len(TRAIN_RECIPES) >= 4


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_recipe_parses_and_builds(recipe):
    # The recipes name no checkpoint; the tiny presets stand in for the user's local paths.
    model_args, data_args, training_args = parse_train_args(
        ["--config", str(recipe), "--model_name_or_path", "tiny-qwen3", "--vision_tower", "tiny-clip"])
    model = build_model(model_args, vocab_size=64, image_token_id=63)
    mode = configure_trainable(model, model_args)
    assert any(p.requires_grad for p in model.parameters()), mode
    recipe_values = yaml.safe_load(recipe.read_text())
    if "learning_rate" in recipe_values:  # the YAML value arrives as a float (PyYAML reads 1e-4 as a string)
        assert training_args.learning_rate == float(recipe_values["learning_rate"])
