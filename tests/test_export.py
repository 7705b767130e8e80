"""`sparsevl export`: our checkpoints load in plain transformers, answer there as `sparsevl eval` does with the
clients' default arguments, use the hub layout that vLLM and SGLang read, and come back unchanged."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import (AutoProcessor, GenerationConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaProcessor, SiglipImageProcessorPil, pipeline)
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import apply_renamings
from tiny import make_model, save_tiny_checkpoint

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


# --- What plain clients see: the hub layout, the special tokens, answers with default arguments --------------------

def hub_layout_names(config: LlavaConfig) -> set[str]:
    """The weight names of a published llava-hf checkpoint for `config`, as transformers itself derives them: its
    own checkpoint conversion mapping for Llava, reversed, applied to a fresh model's in-memory names."""
    hf_model = LlavaForConditionalGeneration(config)
    to_checkpoint = [t.reverse_transform() for t in get_model_conversion_mapping(hf_model, add_legacy=False)[::-1]]
    names = {apply_renamings(name, to_checkpoint) for name in hf_model.state_dict()}
    return names - ({"language_model.lm_head.weight"} if config.tie_word_embeddings else set())


@pytest.mark.parametrize("llm, vision", [("tiny-llama", "tiny-clip"), ("tiny-qwen3", "tiny-siglip")])
def test_export_writes_the_hub_layout_architectures_and_special_tokens(tmp_path, shapes_tokenizer, llm, vision):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", shapes_tokenizer, model_name_or_path=llm, vision_tower=vision)
    assert cli_main(["export", "--to", "llava-hf", "--model", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    config = LlavaConfig.from_pretrained(tmp_path / "hf")
    names = set(load_file(tmp_path / "hf" / "model.safetensors"))
    assert names == hub_layout_names(config)
    assert any(name.startswith("vision_tower.vision_model.") for name in names)
    assert config.architectures == ["LlavaForConditionalGeneration"]
    tokenizer = AutoProcessor.from_pretrained(tmp_path / "hf").tokenizer
    ids = (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert (config.text_config.eos_token_id, config.text_config.pad_token_id) == ids
    generation = GenerationConfig.from_pretrained(tmp_path / "hf")
    assert (generation.eos_token_id, generation.pad_token_id, generation.max_new_tokens) == (*ids, 16)
    assert generation.do_sample is False


@pytest.mark.parametrize("layout", ["hub", "transformers-5-save", "transformers-5-memory"])
def test_import_reads_every_llava_hf_weight_layout(tmp_path, layout):
    """`--to sparsevl` reads the hub layout, what transformers 5's save_pretrained writes, and its in-memory names."""
    from sparsevl.model.llava_hf import from_llava_hf, to_llava_hf, to_llava_hf_state_dict

    ours, _ = make_model("tiny-llama", "tiny-clip")
    hf_model = to_llava_hf(ours)
    hf_model.config.save_pretrained(tmp_path)
    if layout == "hub":
        state = to_llava_hf_state_dict(ours, layout="hub")
    elif layout == "transformers-5-save":
        hf_model.save_pretrained(tmp_path)
        state = load_file(tmp_path / "model.safetensors")
        assert "vision_tower.embeddings.class_embedding" in state  # no `vision_model.`: not the hub layout
    else:
        state = dict(hf_model.state_dict())
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    imported, args = from_llava_hf(str(tmp_path))
    assert (args.mm_vision_select_layer, args.mm_vision_select_feature) == (-2, "patch")
    expected = ours.state_dict()
    assert expected.keys() == imported.state_dict().keys()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in imported.state_dict().items())


def test_round_trip_llava_hf_to_sparsevl_to_llava_hf_is_byte_identical(tmp_path, shapes_tokenizer):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", shapes_tokenizer, model_name_or_path="tiny-qwen3")
    for command in (["--to", "llava-hf", "--model", ckpt, "--out", tmp_path / "hf"],
                    ["--to", "sparsevl", "--model", tmp_path / "hf", "--out", tmp_path / "ours"],
                    ["--to", "llava-hf", "--model", tmp_path / "ours", "--out", tmp_path / "hf2"]):
        assert cli_main(["export", *map(str, command)]) == 0
    first, second = (tmp_path / "hf" / "model.safetensors").read_bytes(), (tmp_path / "hf2" / "model.safetensors")
    assert first == second.read_bytes()


def sparsevl_eval_answers(model_dir, data, out) -> list[str]:
    assert cli_main(["eval", "--model", str(model_dir), "--data", str(data), "--out", str(out)]) == 0
    return [json.loads(line)["prediction"] for line in (out / "answers.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_exported_model_answers_held_out_questions_as_sparsevl_eval_with_default_arguments(
        tmp_path, shapes_dir, trained_checkpoint):
    """Plain `generate(**processor(...))` and `pipeline("image-text-to-text")`, no generation arguments: each
    answer is ours followed by eos and nothing else (special tokens kept in the text, so a client that does not
    stop at eos shows it: after its answer this model repeats eos, which decoding would otherwise hide)."""
    ours = sparsevl_eval_answers(trained_checkpoint, shapes_dir / "test_qa.json", tmp_path / "eval")
    assert len(set(ours)) >= 3 and any(" " in answer for answer in ours)  # varied, some of several tokens
    assert cli_main(["export", "--to", "llava-hf", "--model", str(trained_checkpoint), "--out", str(tmp_path / "hf")]) == 0
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    hf_model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    pipe = pipeline("image-text-to-text", model=str(tmp_path / "hf"))
    plain, piped = [], []
    for record in json.loads((shapes_dir / "test_qa.json").read_text()):
        question = record["conversations"][0]["value"].replace("<image>\n", "")
        image = Image.open(shapes_dir / record["image"]).convert("RGB")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        inputs = processor(images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True),
                           return_tensors="pt")
        with torch.no_grad():
            tokens = hf_model.generate(**inputs)
        plain.append(processor.decode(tokens[0, inputs["input_ids"].shape[1]:], skip_special_tokens=False))
        messages[0]["content"][0]["image"] = image
        piped.append(pipe(text=messages, skip_special_tokens=False)[0]["generated_text"][-1]["content"])
    eos = processor.tokenizer.eos_token
    assert plain == [answer + eos for answer in ours]
    assert piped == [answer + eos for answer in ours]


@pytest.mark.slow
def test_qwen3_moe_export_answers_text_questions_as_sparsevl_eval_with_default_arguments(
        tmp_path, shapes_dir, shapes_tokenizer, trained_checkpoint):
    """MoE-Tuning's result as transformers' Qwen3MoeForCausalLM: `generate()` with no generation arguments stops
    at eos after the answer `sparsevl eval` gives (text-only questions: the export holds the LLM alone)."""
    from tiny import train_flags
    from transformers import AutoTokenizer, Qwen3MoeForCausalLM

    flags = train_flags(shapes_dir, shapes_tokenizer, tmp_path / "moe", model_name_or_path=trained_checkpoint,
                        max_steps=2, save_steps=1000, report_to="none",
                        second_expert_policy="argmax")  # Qwen3-MoE's routing (MoE-LLaVA's default samples)
    assert cli_main(["train", "--stage", "moe", *flags]) == 0
    records = json.loads((shapes_dir / "test_qa.json").read_text())
    for record in records:
        del record["image"]
        record["conversations"][0]["value"] = record["conversations"][0]["value"].replace("<image>\n", "")
    (tmp_path / "text_qa.json").write_text(json.dumps(records))
    ours = sparsevl_eval_answers(tmp_path / "moe", tmp_path / "text_qa.json", tmp_path / "eval")
    assert cli_main(["export", "--to", "qwen3-moe", "--model", str(tmp_path / "moe"), "--out", str(tmp_path / "hf")]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf_model = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "hf").eval()
    theirs = []
    for record in records:
        messages = [{"role": "user", "content": record["conversations"][0]["value"]}]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        with torch.no_grad():
            tokens = hf_model.generate(**inputs)
        theirs.append(tokenizer.decode(tokens[0, inputs["input_ids"].shape[1]:], skip_special_tokens=False))
    stopped = [len(tokenizer(answer, add_special_tokens=False)["input_ids"]) < 16 for answer in ours]
    assert any(stopped)
    assert theirs == [answer + tokenizer.eos_token * stop for answer, stop in zip(ours, stopped)]
