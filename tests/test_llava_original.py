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


def write_moe_llava_layout(directory, *, sparse: bool):
    """MoE-LLaVA's layout (moe_llava_llama config, DeepSpeed MoE keys, image_spatial_proj projector, tower inside)
    from transformers' Mixtral: Llama attention with every FFN a softmax-top-2-renormalised MoE, i.e. DeepSpeed's
    top-2 gate without capacity limit or second-expert noise. Returns the Mixtral (the source of the LLM logits)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    mixtral = MixtralForCausalLM(MixtralConfig(vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=96,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               num_local_experts=4, num_experts_per_tok=2)).eval()
    vision, _ = make_model("tiny-llama", "tiny-clip")
    directory.mkdir(parents=True)
    vision.vision_tower.encoder.save_pretrained(directory / "clip")
    config = {k: v for k, v in mixtral.config.to_dict().items()
              if k not in ("num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "output_router_logits",
                           "router_jitter_noise", "sliding_window", "model_type", "architectures")}
    moe_layers = [0] if sparse else [0, 1]
    config.update(model_type="moe_llava_llama", architectures=["MoELLaVALlamaForCausalLM"],
                  mm_image_tower=str(directory / "clip"), image_projector_type="mlp2x_gelu", mm_hidden_size=128,
                  mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                  moe={"moe_enable": True, "moe_mode": "custom", "moe_layers_idx": moe_layers, "num_experts": [4] *
                       len(moe_layers), "top_k_experts": 2, "use_residual": False, "capacity_factor": 1.5,
                       "eval_capacity_factor": 2.0, "min_capacity": 0, "router_aux_loss_coef": 0.01, "ep_size": 1})
    (directory / "config.json").write_text(json.dumps(config))
    state = {f"model.mm_projector.image_spatial_proj.{k[len('net.'):]}": v
             for k, v in vision.projector.state_dict().items()}
    state.update({f"model.image_tower.image_tower.{k}": v for k, v in vision.vision_tower.encoder.state_dict().items()})
    for name, tensor in mixtral.state_dict().items():
        parts = name.split(".")
        if ".mlp." not in name:
            state[name] = tensor.clone()
            continue
        layer, ffn = int(parts[2]), f"model.layers.{parts[2]}.mlp."
        if layer not in moe_layers:  # a dense FFN: expert 0 as the layer's LlamaMLP
            if name.endswith("experts.gate_up_proj"):
                gate, up = tensor[0].chunk(2, dim=0)
                state.update({ffn + "gate_proj.weight": gate.clone(), ffn + "up_proj.weight": up.clone()})
            elif name.endswith("experts.down_proj"):
                state[ffn + "down_proj.weight"] = tensor[0].clone()
            continue
        experts = ffn + "deepspeed_moe.experts.deepspeed_experts."
        if name.endswith("mlp.gate.weight"):
            state[ffn + "deepspeed_moe.gate.wg.weight"] = tensor.clone()
        for e in range(4):
            if name.endswith("experts.gate_up_proj"):
                gate, up = tensor[e].chunk(2, dim=0)
                state.update({f"{experts}{e}.gate_proj.weight": gate.clone(), f"{experts}{e}.up_proj.weight": up.clone()})
            elif name.endswith("experts.down_proj"):
                state[f"{experts}{e}.down_proj.weight"] = tensor[e].clone()
    torch.save(state, directory / "pytorch_model.bin")
    return mixtral, vision


def test_moe_llava_layout_loads_with_the_source_llm_logits(tmp_path):
    from sparsevl.model.llava_original import from_moe_llava
    from sparsevl.model.upcycle import moe_layout

    mixtral, vision = write_moe_llava_layout(tmp_path / "moe", sparse=False)
    model, args = from_moe_llava(tmp_path / "moe", image_token_id=VOCAB_SIZE)
    assert moe_layout(model.llm).architecture() == {"layers": [0, 1], "num_experts": 4, "top_k": 2,
                                                     "use_residual": False}
    embeds = torch.randn(2, 9, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.llm(inputs_embeds=embeds).logits[..., :VOCAB_SIZE]
        theirs = mixtral(inputs_embeds=embeds).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for name, tensor in vision.projector.state_dict().items():
        assert torch.equal(model.projector.state_dict()[name], tensor)
    for name, tensor in vision.vision_tower.encoder.state_dict().items():
        assert torch.equal(model.vision_tower.encoder.state_dict()[name], tensor)


def test_moe_llava_sparse_layout_keeps_dense_layers_dense(shapes_tokenizer, tmp_path):
    from sparsevl.model.upcycle import moe_layout

    mixtral, _ = write_moe_llava_layout(tmp_path / "moe", sparse=True)
    type(shapes_tokenizer).from_pretrained(shapes_tokenizer.name_or_path).save_pretrained(tmp_path / "moe")
    assert cli_main(["export", "--to", "sparsevl", "--from", "moe-llava", "--model", str(tmp_path / "moe"),
                     "--out", str(tmp_path / "out")]) == 0
    model, _ = load_checkpoint(tmp_path / "out")
    assert moe_layout(model.llm).architecture() == {"layers": [0], "num_experts": 4, "top_k": 2,
                                                     "use_residual": False}
    gate, up = mixtral.model.layers[1].mlp.experts.gate_up_proj[0].chunk(2, dim=0)
    assert torch.equal(model.llm.model.layers[1].mlp.gate_proj.weight, gate)
    assert torch.equal(model.llm.model.layers[1].mlp.up_proj.weight, up)
