"""`sparsevl export`: our checkpoints load in plain transformers with equal logits, and come back unchanged."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (AutoProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                          SiglipImageProcessorPil)
from tiny import save_tiny_checkpoint

from sparsevl.cli import main as cli_main
from sparsevl.data.conversation import IMAGE_TOKEN, prompt_ids
from sparsevl.data.tokenizer import add_image_token
from sparsevl.eval.run import load_for_inference
from sparsevl.export import export_llava_hf

QUESTION = f"{IMAGE_TOKEN}\nWhat color is the circle?"


def our_logits(model_dir, image, question=QUESTION):
    model, tokenizer, image_processor = load_for_inference(model_dir)
    ids = torch.tensor([prompt_ids(question, tokenizer)])
    pixels = image_processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(ids, torch.ones_like(ids), pixels).logits[0], ids[0], model.num_image_tokens


@pytest.mark.parametrize("llm, vision", [("tiny-llama", "tiny-clip"), ("tiny-qwen3", "tiny-siglip")])
def test_export_loads_in_plain_transformers_with_equal_logits(tmp_path, shapes_dir, shapes_tokenizer, llm, vision):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", shapes_tokenizer, model_name_or_path=llm, vision_tower=vision)
    assert cli_main(["export", "--to", "llava-hf", "--model", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    image = Image.open(sorted((shapes_dir / "images").rglob("*.png"))[0]).convert("RGB")
    ours, our_ids, num_image_tokens = our_logits(ckpt, image)

    hf_model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the circle?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt")
    image_id = hf_model.config.image_token_id
    assert int((inputs["input_ids"] == image_id).sum()) == num_image_tokens == hf_model.config.image_seq_length
    collapsed = [t for i, t in enumerate(inputs["input_ids"][0].tolist())
                 if t != image_id or inputs["input_ids"][0][i - 1] != image_id]
    assert collapsed == our_ids.tolist()  # the processor's prompt is the one sparsevl builds
    with torch.no_grad():
        theirs = hf_model(**inputs).logits[0]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_import_round_trip_gives_identical_weights_and_logits(tmp_path, shapes_dir, shapes_tokenizer):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", shapes_tokenizer, mm_vision_select_layer=-1)
    export_llava_hf(ckpt, tmp_path / "hf")
    assert cli_main(["export", "--to", "sparsevl", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    before, after = load_file(ckpt / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    saved = json.loads((tmp_path / "back" / "sparsevl_config.json").read_text())["model_args"]
    assert (saved["mm_vision_select_layer"], saved["mm_projector_type"]) == (-1, "mlp2x_gelu")
    image = Image.open(sorted((shapes_dir / "images").rglob("*.png"))[1]).convert("RGB")
    torch.testing.assert_close(our_logits(tmp_path / "back", image)[0], our_logits(ckpt, image)[0], atol=0, rtol=0)


def test_import_of_a_transformers_made_llava_matches_its_logits(tmp_path, shapes_tokenizer):
    """A Llava built and saved by transformers itself (SigLIP, strategy "full", tied head) imports exactly."""
    tokenizer = type(shapes_tokenizer).from_pretrained(shapes_tokenizer.name_or_path)
    image_token_id = add_image_token(tokenizer)
    vision = dict(model_type="siglip_vision_model", image_size=32, patch_size=8, hidden_size=64,
                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, vision_use_head=False)
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                         vision_feature_select_strategy="full", vision_feature_layer=-1, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf_model = LlavaForConditionalGeneration(config).eval()
    hf_model.save_pretrained(tmp_path / "hf")
    LlavaProcessor(image_processor=SiglipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer,
                   patch_size=8, vision_feature_select_strategy="full").save_pretrained(tmp_path / "hf")

    assert cli_main(["export", "--to", "sparsevl", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")]) == 0
    model, _, image_processor = load_for_inference(tmp_path / "ours")
    assert model.num_image_tokens == 16 and model.llm.config.tie_word_embeddings
    ids = prompt_ids(QUESTION, tokenizer)
    at = ids.index(image_token_id)
    expanded = torch.tensor([ids[:at] + [image_token_id] * 16 + ids[at + 1:]])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), pixels).logits[0]
        theirs = hf_model(input_ids=expanded, pixel_values=pixels).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_models_llava_cannot_express_are_refused_with_clear_errors(tmp_path, shapes_tokenizer, capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", shapes_tokenizer, mm_projector_type="linear")
    assert cli_main(["export", "--to", "llava-hf", "--model", str(ckpt), "--out", str(tmp_path / "hf")]) == 2
    assert "linear projector has no Llava layout" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()  # refused before anything is written

    config = LlavaConfig(vision_config={"model_type": "siglip_vision_model"}, text_config={"model_type": "llama"},
                         vision_feature_select_strategy="default")
    config.save_pretrained(tmp_path / "siglip_default")
    assert cli_main(["export", "--to", "sparsevl", "--model", str(tmp_path / "siglip_default"),
                     "--out", str(tmp_path / "x")]) == 2
    assert "drops the first SigLIP patch token" in capsys.readouterr().err
    config = LlavaConfig(vision_config={"model_type": "clip_vision_model"}, text_config={"model_type": "llama"},
                         vision_feature_layer=[-2, -1])
    config.save_pretrained(tmp_path / "multi_layer")
    assert cli_main(["export", "--to", "sparsevl", "--model", str(tmp_path / "multi_layer"),
                     "--out", str(tmp_path / "x")]) == 2
    assert "concatenates several layers" in capsys.readouterr().err


def test_import_reads_the_hub_llava_1_5_weight_names(tmp_path):
    """llava-hf checkpoints on the Hub use older names (language_model.model.*); transformers maps them."""
    from safetensors.torch import save_file
    from tiny import make_model

    from sparsevl.model.llava_hf import from_llava_hf, to_llava_hf

    ours, _ = make_model("tiny-llama", "tiny-clip")
    hf_model = to_llava_hf(ours)
    hf_model.config.save_pretrained(tmp_path)
    renames = [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
               ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector.")]
    legacy = {}
    for name, tensor in hf_model.state_dict().items():
        for new, old in renames:
            if name.startswith(new):
                name = old + name[len(new):]
                break
        legacy[name] = tensor.contiguous()
    assert "language_model.model.embed_tokens.weight" in legacy
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})
    imported, args = from_llava_hf(str(tmp_path))
    assert (args.mm_vision_select_layer, args.mm_vision_select_feature) == (-2, "patch")
    expected = ours.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in imported.state_dict().items())
