"""MoE projector, MoE-Tuning stage 3 (upcycling), expert-usage logging, routing analysis, Qwen3-MoE export."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import VOCAB_SIZE, make_model, prompt_with_image, random_pixels, right_padded, train_flags
from transformers import AutoModelForCausalLM, PhiConfig, Qwen3MoeForCausalLM

from sparsevl.cli import main as cli_main
from sparsevl.config import ModelArguments, parse_train_args
from sparsevl.model.build import build_model, configure_trainable, load_checkpoint, save_checkpoint
from sparsevl.model.llava_hf import llava_hf_config
from sparsevl.model.moe import load_balancing_loss, router_z_loss
from sparsevl.model.projectors import MoEProjector, build_projector
from sparsevl.model.qwen3_moe import NotExportable, qwen3_moe_config
from sparsevl.model.upcycle import MoELayout, apply_moe_arguments, moe_feed_forwards, moe_layout, upcycle_llm
from sparsevl.train.expert_usage import ExpertUsageCallback, format_usage_table, max_over_min
from sparsevl.train.run import loss_weights
from sparsevl.train.trainer import weighted_total


def batch(seed: int = 0):
    ids, mask = right_padded([prompt_with_image(9, seed=seed), prompt_with_image(6, seed=seed + 1)])
    return ids, mask, random_pixels(2, seed=seed)


def logits_of(model, ids, mask, pixels):
    with torch.no_grad():
        return model(ids, mask, pixels).logits


def perturb_experts(llm, scale: float = 0.05) -> None:
    """Make the upcycled experts differ, so that which experts a token takes changes the output."""
    with torch.no_grad():
        for _, ffn in moe_feed_forwards(llm):
            for weight in ffn.moe.experts.parameters():
                weight.add_(torch.randn_like(weight) * scale)


# --- MoE projector ---------------------------------------------------------------------------------------------

def test_moe_projector_shapes_losses_and_gradients():
    projector = build_projector("moe", vision_dim=12, llm_dim=20, num_experts=8, top_k=2)
    features = torch.randn(3, 5, 12, requires_grad=True)
    embeds, losses = projector(features)
    assert embeds.shape == (3, 5, 20) and set(losses) == {"balance", "z"}
    assert projector.last_expert_indices.shape == (3, 5, 2)
    routing = projector.moe.router(features.reshape(-1, 12))
    torch.testing.assert_close(losses["balance"], load_balancing_loss(routing.probs, routing.indices, 8))
    torch.testing.assert_close(losses["z"], router_z_loss(routing.logits))
    (embeds.sum() + losses["balance"]).backward()
    moe = projector.moe
    assert features.grad.abs().sum() > 0 and moe.router.gate.weight.grad.abs().sum() > 0
    used = projector.last_expert_indices.unique()
    assert moe.experts.up_proj.grad[used].abs().sum() > 0  # every routed expert gets a gradient


def test_one_expert_moe_projector_equals_mlp2x_gelu():
    dense = build_projector("mlp2x_gelu", vision_dim=12, llm_dim=20)
    moe = build_projector("adaptive_moe", vision_dim=12, llm_dim=20, num_experts=1, top_k=1)
    assert isinstance(moe, MoEProjector)
    experts = moe.moe.experts
    with torch.no_grad():
        experts.up_proj[0].copy_(dense.net[0].weight), experts.up_proj_bias[0].copy_(dense.net[0].bias)
        experts.down_proj[0].copy_(dense.net[2].weight), experts.down_proj_bias[0].copy_(dense.net[2].bias)
    features = torch.randn(2, 7, 12)
    torch.testing.assert_close(moe(features)[0], dense(features)[0])


def test_every_named_loss_is_weighted_by_its_flag():
    model, _ = make_model("tiny-qwen3", projector="moe", moe_enable=True)
    ids, mask, pixels = batch()
    losses = model(ids, mask, pixels, labels=ids).losses
    assert set(losses) == {"lm", "balance", "z", "llm_balance", "llm_z"}
    _, _, training_args = parse_train_args(["--moe_load_balancing_weight", "0.5", "--moe_aux_loss_coef", "0.25",
                                            "--router_z_loss_weight", "0.125", "--report_to", "none"])
    expected = (losses["lm"] + 0.5 * losses["balance"] + 0.25 * losses["llm_balance"]
                + 0.125 * (losses["z"] + losses["llm_z"]))
    torch.testing.assert_close(weighted_total(losses, loss_weights(training_args)), expected)


def test_moe_projector_and_upcycled_llm_checkpoint_round_trip(tmp_path):
    model, args = make_model("tiny-qwen3", projector="moe", mm_moe_num_experts=3, mm_moe_top_k=1,
                             moe_enable=True, moe_layers=[0, 2], num_experts=3, top_k_experts=1)
    perturb_experts(model.llm)
    save_checkpoint(model, tmp_path, model_args=args)
    config = json.loads((tmp_path / "sparsevl_config.json").read_text())
    assert config["llm_moe"] == {"layers": [0, 2], "num_experts": 3, "top_k": 1, "use_residual": False,
                                 "capacity_factor": 1.5, "eval_capacity_factor": 2.0, "min_capacity": 0,
                                 "second_expert_policy": "sampling", "normalize_top_k": False,
                                 "random_token_selection": True, "balance_count": "top1"}
    loaded, loaded_args = load_checkpoint(tmp_path)
    assert (loaded_args.mm_moe_num_experts, loaded_args.mm_moe_top_k) == (3, 1)
    assert loaded.projector.moe.router.num_experts == 3 and moe_layout(loaded.llm) == moe_layout(model.llm)
    ids, mask, pixels = batch()
    torch.manual_seed(1)  # top-1 capacity slots are filled in random order (random token selection)
    expected = logits_of(model, ids, mask, pixels)
    torch.manual_seed(1)
    assert torch.equal(logits_of(loaded.eval(), ids, mask, pixels), expected)


def test_a_checkpoint_saved_before_the_routing_fields_loads_with_its_old_routing(tmp_path):
    model, args = make_model("tiny-qwen3", moe_enable=True, moe_layers=[1, 3])
    save_checkpoint(model, tmp_path, model_args=args)
    config = json.loads((tmp_path / "sparsevl_config.json").read_text())
    config["llm_moe"] = {"layers": [1, 3], "num_experts": 4, "top_k": 2}  # what such checkpoints hold
    (tmp_path / "sparsevl_config.json").write_text(json.dumps(config))
    layout = moe_layout(load_checkpoint(tmp_path)[0].llm)
    assert (layout.capacity_factor, layout.second_expert_policy, layout.balance_count) == (None, "argmax", "top_k")


# --- Upcycling (MoE-Tuning stage 3) -----------------------------------------------------------------------------

@pytest.mark.parametrize("llm", ["tiny-qwen3", "tiny-llama"])
@pytest.mark.parametrize("layers", [None, [0, 2, 3]])
def test_upcycling_preserves_logits(llm, layers):
    dense, _ = make_model(llm)
    # same seed: the same dense weights; eval capacity 2.0 x top-2 = 4 experts: no token can be dropped
    upcycled, _ = make_model(llm, moe_enable=True, moe_layers=layers)
    found = [i for i, _ in moe_feed_forwards(upcycled.llm)]
    assert found == (layers or [0, 2])  # default --moe_mode sparse: layers 0, 2, ... (MoE-LLaVA)
    ids, mask, pixels = batch()
    expected = logits_of(dense, ids, mask, pixels)
    torch.testing.assert_close(logits_of(upcycled, ids, mask, pixels), expected, rtol=0, atol=2e-6)
    routed = torch.cat([ffn.last_expert_indices.flatten() for _, ffn in moe_feed_forwards(upcycled.llm)])
    assert len(routed.unique()) > 2  # tokens really go to different experts, yet the output is the dense one
    perturb_experts(upcycled.llm)  # ...which a broken combine (not renormalised, wrong experts) would not give
    assert (logits_of(upcycled, ids, mask, pixels) - expected).abs().max() > 1e-3


def test_stage3_paper_rule_trains_only_routers_and_experts():
    model, args = make_model("tiny-llama", moe_enable=True, train_modules=["moe_layers"])
    assert configure_trainable(model, args) == "moe_layers"
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    moe_params = {name for name, _ in model.named_parameters() if ".mlp.moe." in name}
    assert trainable == moe_params
    assert {name.split(".mlp.moe.")[1] for name in trainable} == {
        "router.gate.weight", "experts.gate_proj", "experts.up_proj", "experts.down_proj"}
    ids, mask, pixels = batch()
    model(ids, mask, pixels, labels=ids).losses["lm"].backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad <= moe_params and any("router" in n for n in with_grad) and any("experts" in n for n in with_grad)


def test_llm_losses_are_the_sum_over_moe_layers_and_handed_over_once():
    model, _ = make_model("tiny-qwen3", moe_enable=True)
    per_layer = []
    for _, ffn in moe_feed_forwards(model.llm):
        ffn.moe.register_forward_hook(lambda module, inputs, output: per_layer.append(output.losses))
    ids, mask, pixels = batch()
    losses = model(ids, mask, pixels).losses
    assert len(per_layer) == 2
    torch.testing.assert_close(losses["llm_balance"], per_layer[0]["balance"] + per_layer[1]["balance"])
    torch.testing.assert_close(losses["llm_z"], per_layer[0]["z"] + per_layer[1]["z"])
    assert all(ffn.pop_losses() == {} for _, ffn in moe_feed_forwards(model.llm))
    looped = model(ids, mask, pixels, return_hidden_states=True)  # our decoder loop (the pruning path) too
    torch.testing.assert_close(looped.losses["llm_balance"], losses["llm_balance"])
    torch.testing.assert_close(looped.logits, model(ids, mask, pixels).logits)


# --- Bad input --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, flag", [
    (["--num_experts", "4", "--top_k_experts", "5"], "--top_k_experts"),
    (["--num_experts", "0"], "--num_experts"),
    (["--mm_moe_num_experts", "8", "--mm_moe_top_k", "9"], "--mm_moe_top_k"),
    (["--mm_moe_num_experts", "0"], "--mm_moe_num_experts"),
    (["--moe_layers_every", "0"], "--moe_layers_every"),
    (["--moe_layers", "-1"], "--moe_layers"),
    (["--lora_enable", "True"], "--lora_enable"),
])
def test_bad_moe_flags_fail_at_parsing_naming_the_flag(flags, flag):
    with pytest.raises(SystemExit, match=flag):
        parse_train_args(["--stage", "moe", "--report_to", "none", *flags])


def test_moe_layer_beyond_the_model_fails_at_build_naming_the_flag():
    with pytest.raises(ValueError, match=r"--moe_layers \[4, 9\] beyond the LLM's 4 decoder layers"):
        make_model("tiny-qwen3", moe_enable=True, moe_layers=[1, 4, 9])
    with pytest.raises(ValueError, match="--moe_layers_every 5 selects none of the LLM's 4 decoder layers"):
        make_model("tiny-qwen3", moe_enable=True, moe_layers_every=5)


def test_upcycling_an_llm_of_unknown_mlp_shape_fails_naming_the_flag():
    phi = AutoModelForCausalLM.from_config(PhiConfig(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=2, num_attention_heads=2))
    with pytest.raises(ValueError, match=r"--moe_enable: cannot upcycle decoder layer 1's MLP \(PhiMLP\)"):
        upcycle_llm(phi, MoELayout(layers=[1], num_experts=4, top_k=2))


def test_an_upcycled_checkpoint_asked_for_another_layout_is_refused(tmp_path):
    model, args = make_model("tiny-qwen3", moe_enable=True)
    with pytest.raises(ValueError, match="already upcycled"):
        apply_moe_arguments(model.llm, ModelArguments(moe_enable=True, num_experts=8))


# --- Training: stage 3, expert-usage logging, routing analysis --------------------------------------------------

def test_expert_usage_table_and_values():
    table = format_usage_table({"llm.layer1": [0.5, 0.25, 0.25, 0.0]}, step=7)
    assert "step 7" in table and "llm.layer1   0.500   0.250   0.250   0.000      inf" in table
    assert max_over_min([0.3, 0.2, 0.2, 0.3]) == pytest.approx(1.5)
    model, _ = make_model("tiny-qwen3", moe_enable=True, moe_layers=[3])
    ids, mask, pixels = batch()
    model(ids, mask, pixels)
    callback = ExpertUsageCallback()
    values = callback.log_values(model)
    counts = moe_feed_forwards(model.llm)[0][1].moe.expert_token_counts
    assert sum(values[f"expert_load/llm.layer3/e{i}"] for i in range(4)) == pytest.approx(1.0, abs=1e-4)
    assert values["expert_load/llm.layer3/e0"] == pytest.approx(float(counts[0] / counts.sum()), abs=1e-5)
    assert int(counts.sum()) == 2 * (9 - 1 + 64) * 2  # every position of the merged batch (padding too), top-2


def test_stage_moe_trains_the_upstream_set_logs_usage_and_analyzes(tmp_path, shapes_dir, shapes_tokenizer,
                                                                     tiny_checkpoint, capsys):
    out = tmp_path / "stage3"
    readme_flags = ["--num_experts", "4", "--top_k_experts", "2", "--moe_mode", "sparse", "--capacity_factor", "1.5",
                    "--eval_capacity_factor", "2.0", "--min_capacity", "0", "--second_expert_policy", "sampling",
                    "--balance_loss_count", "top1", "--router_aux_loss_coef", "0.01", "--train_modules", "gate_proj",
                    "up_proj", "down_proj", "wg", "--use_residual", "False"]  # the README's command: the defaults
    argv = ["train", "--stage", "moe", *train_flags(shapes_dir, shapes_tokenizer, out, model_name_or_path=tiny_checkpoint,
                                                    max_steps=4, logging_steps=2, per_device_train_batch_size=8,
                                                    report_to="none"), *readme_flags]
    assert cli_main(argv) == 0
    assert "llm.layer0" in capsys.readouterr().out  # the expert-usage table
    history = json.loads((out / "log_history.json").read_text())
    logged = [entry for entry in history if "loss" in entry]
    assert len(logged) == 2 and all("loss_llm_balance" in e and "expert_load/llm.layer2/max_over_min" in e
                                    for e in logged)
    before, after = load_file(tiny_checkpoint / "model.safetensors"), load_file(out / "model.safetensors")
    kept = set(before) & set(after)
    changed = {n for n in kept if not torch.equal(before[n], after[n])}
    # MoE-LLaVA's stage 3: the dense FFNs of the non-MoE layers 1, 3 and the projector train; nothing else
    assert changed == {f"llm.model.layers.{i}.mlp.{p}.weight" for i in (1, 3)
                       for p in ("gate_proj", "up_proj", "down_proj")} | {n for n in kept if n.startswith("projector.")}
    assert {n.split(".mlp.")[0] for n in set(before) - kept} == {"llm.model.layers.0", "llm.model.layers.2"}
    moe_names = set(after) - kept
    assert moe_names and all(".mlp.moe." in n for n in moe_names)
    copied = before["llm.model.layers.0.mlp.down_proj.weight"]
    assert not torch.equal(after["llm.model.layers.0.mlp.moe.experts.down_proj"][0], copied)  # experts trained
    assert json.loads((out / "sparsevl_config.json").read_text())["llm_moe"]["layers"] == [0, 2]

    assert cli_main(["analyze", "routing", "--model", str(out), "--data", str(shapes_dir / "test_qa.json"),
                     "--out", str(tmp_path / "routing"), "--limit", "4"]) == 0
    result = json.loads((tmp_path / "routing" / "routing.json").read_text())
    assert (tmp_path / "routing" / "routing.png").stat().st_size > 1000
    assert set(result["counts"]) == {"llm.layer0", "llm.layer2"}
    for layer in result["counts"].values():
        assert sum(layer["image"]) == 4 * 64 * 2  # 4 conversations x 64 visual tokens x top-2
        assert sum(layer["text"]) > 0
    for shares in result["shares"].values():
        assert sum(shares["text"]) == pytest.approx(1.0) and sum(shares["image"]) == pytest.approx(1.0)


# --- Export to transformers' Qwen3-MoE ---------------------------------------------------------------------------

def upcycled_checkpoint(directory, tokenizer, layers, perturb: float = 0.05, **moe_flags):
    from sparsevl.data.tokenizer import add_image_token
    from sparsevl.model.build import build_image_processor

    torch.manual_seed(0)
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    image_token_id = add_image_token(tokenizer)
    args = ModelArguments(model_name_or_path="tiny-qwen3", moe_enable=True, moe_layers=layers, **moe_flags)
    model = build_model(args, vocab_size=len(tokenizer), image_token_id=image_token_id)
    perturb_experts(model.llm, perturb)
    processor = build_image_processor(args.vision_tower, model.vision_tower.config)
    save_checkpoint(model, directory, model_args=args, tokenizer=tokenizer, image_processor=processor)
    return model


@pytest.mark.parametrize("layers, sparse_step, mlp_only, moe_flags", [
    (None, 1, [1, 3], {}),  # default --moe_mode sparse: layers 0, 2
    ([1, 3], 2, [], {}),
    ([0, 3], 1, [1, 2], {"top_k_experts": 1, "eval_capacity_factor": 4.0}),  # top-1: raw probability
])
def test_export_to_qwen3_moe_loads_in_transformers_with_equal_logits(tmp_path, shapes_tokenizer, layers,
                                                                     sparse_step, mlp_only, moe_flags):
    model = upcycled_checkpoint(tmp_path / "ckpt", shapes_tokenizer, layers, **moe_flags)
    assert cli_main(["export", "--to", "qwen3-moe", "--model", str(tmp_path / "ckpt"),
                     "--out", str(tmp_path / "hf"), "--second_expert_policy", "argmax"]) == 0
    hf_model = Qwen3MoeForCausalLM.from_pretrained(tmp_path / "hf").eval()
    config = hf_model.config
    top_k = moe_flags.get("top_k_experts", 2)
    assert (config.decoder_sparse_step, config.mlp_only_layers) == (sparse_step, mlp_only)
    assert (config.num_experts, config.num_experts_per_tok, config.norm_topk_prob) == (4, top_k, top_k > 1)
    for _, ffn in moe_feed_forwards(model.llm):
        ffn.moe.router.second_expert_policy = "argmax"  # what the export was asked to represent
    ids = torch.randint(0, config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = model.eval().llm(input_ids=ids).logits, hf_model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_export_refuses_what_qwen3_moe_cannot_express(tmp_path, shapes_tokenizer):
    llama, _ = make_model("tiny-llama", moe_enable=True)
    with pytest.raises(NotExportable, match="'llama' .*no q/k RMSNorm"):
        qwen3_moe_config(llama.llm)
    dense, _ = make_model("tiny-qwen3")
    with pytest.raises(NotExportable, match="no MoE layers"):
        qwen3_moe_config(dense.llm)
    sampled, _ = make_model("tiny-qwen3", moe_enable=True)  # the defaults: Gumbel-sampled second expert
    with pytest.raises(NotExportable, match="decoder layer 0: its second expert is Gumbel-sampled"):
        qwen3_moe_config(sampled.llm)
    capped, _ = make_model("tiny-qwen3", moe_enable=True, num_experts=8, second_expert_policy="argmax")
    with pytest.raises(NotExportable, match=r"decoder layer 0: its eval capacity can drop tokens \(--eval_capacity"):
        qwen3_moe_config(capped.llm)  # 2.0 x top-2 < 8 experts
    residual, _ = make_model("tiny-qwen3", moe_enable=True, use_residual=True, second_expert_policy="argmax")
    with pytest.raises(NotExportable, match="decoder layer 0: it is a Residual MoE"):
        qwen3_moe_config(residual.llm)
    upcycled_checkpoint(tmp_path / "ckpt", shapes_tokenizer, None)
    assert cli_main(["export", "--to", "qwen3-moe", "--model", str(tmp_path / "ckpt"),
                     "--out", str(tmp_path / "hf")]) == 2  # sampling, without --second_expert_policy argmax
    assert not (tmp_path / "hf").exists()
    assert cli_main(["export", "--to", "llava-hf", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf"),
                     "--second_expert_policy", "argmax"]) == 2
    assert cli_main(["export", "--to", "qwen3-moe", "--model", str(tmp_path / "nowhere"),
                     "--out", str(tmp_path / "hf")]) == 2
    with pytest.raises(ValueError, match="upcycled MoE layers.*--to qwen3-moe"):
        llava_hf_config(capped)


def test_help_lists_the_moe_flags(capsys):
    assert cli_main(["train", "--help"]) == 0  # argparse %-formats help text: a stray % would raise here
    text = capsys.readouterr().out
    for flag in ("--mm_moe_num_experts", "--num_experts", "--top_k_experts", "--moe_layers_every", "--moe_layers",
                 "--moe_aux_loss_coef", "--router_aux_loss_coef", "--router_z_loss_weight", "--moe_mode",
                 "--capacity_factor", "--eval_capacity_factor", "--min_capacity", "--use_residual",
                 "--second_expert_policy", "--balance_loss_count", "--train_modules"):
        assert flag in text
    with pytest.raises(SystemExit) as exit_info:  # argparse's own --help exits 0
        cli_main(["analyze", "routing", "--help"])
    assert exit_info.value.code == 0 and "--limit" in capsys.readouterr().out


# --- Inference flags ---------------------------------------------------------------------------------------------

def eval_answers(checkpoint, data, out, *flags):
    torch.manual_seed(1)  # the Gumbel draws of a sampling router
    assert cli_main(["eval", "--model", str(checkpoint), "--data", str(data), "--out", str(out), "--limit", "16",
                     "--max_new_tokens", "4", *flags]) == 0
    return [json.loads(line)["prediction"] for line in (out / "answers.jsonl").read_text().splitlines()]


def test_eval_second_expert_policy_flag_routes_as_a_checkpoint_trained_with_it(tmp_path, shapes_dir, shapes_tokenizer):
    upcycled_checkpoint(tmp_path / "sampling", shapes_tokenizer, None, 1.0, second_expert_policy="sampling")
    upcycled_checkpoint(tmp_path / "argmax", shapes_tokenizer, None, 1.0, second_expert_policy="argmax")
    data = shapes_dir / "test_qa.json"
    as_trained = eval_answers(tmp_path / "argmax", data, tmp_path / "a")
    sampled = eval_answers(tmp_path / "sampling", data, tmp_path / "s")
    switched = eval_answers(tmp_path / "sampling", data, tmp_path / "s2", "--second_expert_policy", "argmax")
    assert sampled != as_trained  # the policies answer differently on this model, so the flag is observable
    assert switched == as_trained


def test_second_expert_policy_on_a_model_without_moe_is_refused(tmp_path, shapes_dir, tiny_checkpoint, capsys):
    code = cli_main(["eval", "--model", str(tiny_checkpoint), "--data", str(shapes_dir / "test_qa.json"),
                     "--out", str(tmp_path), "--second_expert_policy", "argmax"])
    assert code == 2
    assert "--second_expert_policy applies to MoE models" in capsys.readouterr().err
    # analyze layers applies the same inference flags (it used to parse the pruning flags and drop them)
    code = cli_main(["analyze", "layers", "--model", str(tiny_checkpoint), "--data", str(shapes_dir / "test_qa.json"),
                     "--out", str(tmp_path / "layers"), "--token_pruner", "fastv", "--fastv_ratio", "1.5"])
    assert code == 2
    assert "--fastv_ratio 1.5 must be in [0, 1)" in capsys.readouterr().err
