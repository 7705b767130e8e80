"""Original-LLaVA checkpoints: layouts built from the documented keys, logits against the source model (transformers'
Llava holding the same weights), --pretrain_mm_mlp_adapter, and pickled files read with weights_only only."""

import json
import pickle

import pytest
import torch
from tiny import IMAGE_TOKEN_ID, VOCAB_SIZE, make_model, train_flags
from safetensors.torch import save_file

from sparsevl.cli import main as cli_main
from sparsevl.model.build import load_checkpoint
from sparsevl.model.llava_hf import to_llava_hf
from sparsevl.model.llava_original import from_llava_original, load_projector_adapter, read_weights

PROJECTOR_NAMES = {"model.multi_modal_projector.linear_1.": "model.mm_projector.0.",
                   "model.multi_modal_projector.linear_2.": "model.mm_projector.2."}


def write_llava_layout(hf_model, directory, *, tower_inside: bool, weights_format: str = "bin"):
    """transformers' Llava -> LLaVA's own layout: config.json (LLM fields + mm_*), model.* / lm_head / mm_projector
    keys; the CLIP tower in its own directory (LLaVA-1.5) or also inside under model.vision_tower.vision_tower."""
    directory.mkdir(parents=True)
    hf_model.model.vision_tower.save_pretrained(directory / "clip")
    config = hf_model.config.text_config.to_dict()
    config.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"],
                  mm_vision_tower=str(directory / "clip"), mm_hidden_size=hf_model.config.vision_config.hidden_size,
                  mm_projector_type="mlp2x_gelu", mm_vision_select_layer=hf_model.config.vision_feature_layer,
                  mm_vision_select_feature="patch", mm_use_im_start_end=False, mm_use_im_patch_token=False,
                  tie_word_embeddings=hf_model.config.tie_word_embeddings)
    (directory / "config.json").write_text(json.dumps(config))
    state = {}
    for name, tensor in hf_model.state_dict().items():
        for theirs, llava in {**PROJECTOR_NAMES, "model.language_model.": "model.", "lm_head.": "lm_head."}.items():
            if name.startswith(theirs):
                state[llava + name[len(theirs):]] = tensor.clone()
        if tower_inside and name.startswith("model.vision_tower."):
            state["model.vision_tower.vision_tower." + name[len("model.vision_tower."):]] = tensor.clone()
    if weights_format == "bin":
        torch.save(state, directory / "pytorch_model.bin")
    else:
        save_file(state, str(directory / "model.safetensors"))
    return directory


def _source():
    model, _ = make_model("tiny-llama", "tiny-clip", mm_vision_select_layer=-2)
    return to_llava_hf(model).eval(), model.num_image_tokens


def _max_logit_difference(ours, hf_model, num_image_tokens, our_image_id):
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, 64, 64, generator=generator)
    text = torch.randint(2, IMAGE_TOKEN_ID, (7,), generator=generator)
    ours_ids = torch.cat([text[:2], torch.tensor([our_image_id]), text[2:]])[None]
    their_ids = torch.cat([text[:2], torch.full((num_image_tokens,), IMAGE_TOKEN_ID), text[2:]])[None]
    with torch.no_grad():
        mine = ours(ours_ids, torch.ones_like(ours_ids), pixels).logits[..., :VOCAB_SIZE]
        theirs = hf_model(input_ids=their_ids, pixel_values=pixels).logits
    assert mine.shape == theirs.shape
    return float((mine - theirs).abs().max())


@pytest.mark.parametrize("tower_inside, weights_format", [(False, "bin"), (True, "safetensors")])
def test_original_llava_layout_loads_with_the_source_logits(tower_inside, weights_format, tmp_path):
    hf_model, num_image_tokens = _source()
    directory = write_llava_layout(hf_model, tmp_path / "llava", tower_inside=tower_inside,
                                   weights_format=weights_format)
    model, args = from_llava_original(directory, image_token_id=VOCAB_SIZE)  # <image> outside the vocabulary
    assert (args.mm_projector_type, args.mm_vision_select_layer) == ("mlp2x_gelu", -2)
    assert model.llm.get_input_embeddings().num_embeddings == VOCAB_SIZE + 1
    assert _max_logit_difference(model, hf_model, num_image_tokens, VOCAB_SIZE) < 1e-5


def test_export_from_llava_writes_a_sparsevl_checkpoint(shapes_tokenizer, tmp_path):
    hf_model, num_image_tokens = _source()
    directory = write_llava_layout(hf_model, tmp_path / "llava", tower_inside=False)
    tokenizer = type(shapes_tokenizer).from_pretrained(shapes_tokenizer.name_or_path)
    tokenizer.save_pretrained(directory)
    clip = directory / "clip"
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "mm_vision_tower": "openai/clip-vit-large"}))
    assert cli_main(["export", "--to", "sparsevl", "--from", "llava", "--model", str(directory),
                     "--out", str(tmp_path / "out")]) == 2  # a hub name: the CLIP directory must be given
    assert cli_main(["export", "--to", "sparsevl", "--from", "llava", "--model", str(directory),
                     "--out", str(tmp_path / "out"), "--vision_tower", str(clip)]) == 0
    model, _ = load_checkpoint(tmp_path / "out")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert model.image_token_id == image_id
    assert _max_logit_difference(model.eval(), hf_model, num_image_tokens, image_id) < 1e-5


def test_export_refuses_from_with_another_target(tmp_path, capsys):
    assert cli_main(["export", "--to", "llava-hf", "--from", "llava", "--model", "x", "--out", "y"]) == 2
    assert "--from applies to --to sparsevl" in capsys.readouterr().err


def test_pretrain_mm_mlp_adapter_loads_llava_projector_keys(tmp_path):
    source, _ = make_model(seed=3)
    adapter = tmp_path / "mm_projector.bin"
    torch.save({f"model.mm_projector.{k[len('net.'):]}": v for k, v in source.projector.state_dict().items()},
               adapter)
    model, _ = make_model(seed=4)
    load_projector_adapter(model, adapter)
    for name, tensor in source.projector.state_dict().items():
        assert torch.equal(model.projector.state_dict()[name], tensor), name
    linear, _ = make_model(projector="linear")
    with pytest.raises(ValueError, match="--pretrain_mm_mlp_adapter .*mm_projector.bin does not fit"):
        load_projector_adapter(linear, adapter)


def test_training_starts_from_the_adapter(shapes_dir, shapes_tokenizer, tmp_path, capsys):
    from sparsevl.config import parse_train_args
    from sparsevl.train.run import load_model_and_processors

    first, _, _, _ = load_model_and_processors(parse_train_args(train_flags(shapes_dir, shapes_tokenizer, tmp_path))[0])
    adapter = tmp_path / "mm_projector.safetensors"
    save_file({f"model.mm_projector.{k[len('net.'):]}": v.clone() + 1 for k, v in first.projector.state_dict().items()},
              str(adapter))
    flags = train_flags(shapes_dir, shapes_tokenizer, tmp_path, pretrain_mm_mlp_adapter=adapter)
    model, _, _, _ = load_model_and_processors(parse_train_args(flags)[0])
    assert torch.equal(model.projector.net[0].weight, first.projector.net[0].weight + 1)
    assert f"projector weights from {adapter}" in capsys.readouterr().out


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # would create the marker file if unpickled


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker, evil = tmp_path / "pwned", tmp_path / "mm_projector.bin"
    evil.write_bytes(pickle.dumps({"model.mm_projector.0.weight": _Exploit(marker)}))
    with pytest.raises(ValueError, match="refused to unpickle"):
        read_weights(evil)
    model, _ = make_model()
    with pytest.raises(ValueError, match="refused to unpickle"):
        load_projector_adapter(model, evil)
    assert not marker.exists()
    torch.save([1, 2], tmp_path / "not_weights.bin")
    with pytest.raises(ValueError, match="does not hold a mapping of names to tensors"):
        read_weights(tmp_path / "not_weights.bin")
