import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed_and_fp32():
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float32)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder that `build(folder)` fills, once per session; with SPARSEVL_TEST_CACHE set (mutation runs start a
    test session per mutant) once per cache folder, since these fixtures are deterministic."""
    cache = os.environ.get("SPARSEVL_TEST_CACHE")
    if not cache:
        out = tmp_path_factory.mktemp(name)
        build(out)
        return out
    out = Path(cache) / name
    if not (out / ".complete").is_file():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        build(out)
        (out / ".complete").touch()
    return out


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """A small built-in benchmark data set, generated once per test session."""
    from sparsevl.data.shapes import generate_shapes_dataset

    return built_once(tmp_path_factory, "shapes", lambda out: generate_shapes_dataset(
        out, num_train=64, num_test=16, image_size=64, grid=4, min_objects=1, max_objects=6, qa_per_image=3, seed=0))


@pytest.fixture(scope="session")
def shapes_tokenizer(shapes_dir, tmp_path_factory):
    """A tokenizer trained on the small data set, saved to disk (its directory is `tokenizer.name_or_path`)."""
    from sparsevl.data.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer, texts_from_llava_json

    def build(directory):
        texts = texts_from_llava_json([shapes_dir / "captions.json", shapes_dir / "finetune.json"])
        save_tokenizer(build_tokenizer(texts), directory)

    return load_tokenizer(built_once(tmp_path_factory, "tokenizer", build))


@pytest.fixture(scope="session")
def tiny_checkpoint(shapes_tokenizer, tmp_path_factory):
    """A random-weight tiny-llama + tiny-clip checkpoint with the shapes tokenizer, saved once per session."""
    from sparsevl.config import ModelArguments
    from sparsevl.model.build import build_image_processor, build_model, save_checkpoint

    def build(directory):
        torch.manual_seed(0)
        args = ModelArguments(model_name_or_path="tiny-llama", vision_tower="tiny-clip")
        model = build_model(args, vocab_size=len(shapes_tokenizer),
                            image_token_id=shapes_tokenizer.convert_tokens_to_ids("<image>"))
        processor = build_image_processor(args.vision_tower, model.vision_tower.config)
        save_checkpoint(model, directory, model_args=args, tokenizer=shapes_tokenizer, image_processor=processor)

    return built_once(tmp_path_factory, "tiny_checkpoint", build)


@pytest.fixture(scope="session")
def lively_checkpoint(shapes_tokenizer, tmp_path_factory):
    """A tiny checkpoint whose greedy answers vary with prompt and image (see tiny.save_lively_checkpoint)."""
    from tiny import save_lively_checkpoint

    return built_once(tmp_path_factory, "lively",
                      lambda out: save_lively_checkpoint(out / "lively-model", shapes_tokenizer)) / "lively-model"


@pytest.fixture
def single_thread():
    """One torch thread: tiny tensors gain nothing from two, and OpenMP stalls when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def trained_checkpoint(shapes_dir, shapes_tokenizer, tmp_path_factory):
    """tiny-qwen3 + tiny-clip trained 150 steps on the shapes fixture: its answers differ by question type, span
    one or two words and end with eos, so a client that never stops or reads the wrong position is caught."""
    from tiny import train_flags

    from sparsevl.cli import main as cli_main

    out = tmp_path_factory.mktemp("trained_checkpoint")
    flags = train_flags(shapes_dir, shapes_tokenizer, out, max_steps=150, save_steps=1000, report_to="none")
    assert cli_main(["train", *flags]) == 0
    return out
