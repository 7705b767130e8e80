"""An upcycled Qwen3 LLM in transformers' `Qwen3MoeForCausalLM` layout (config + state dict).

Qwen3-MoE routes by softmax over experts and the deterministic top-k, renormalised when norm_topk_prob (top-1
keeps its raw probability otherwise, as MoE-LLaVA's top-1 does), with no bias, no capacity limit, no shared expert
and no residual branch; it has Qwen3's attention (q/k RMSNorm) and chooses its MoE layers by `decoder_sparse_step`
and `mlp_only_layers`, so any set of MoE layers is expressible. A Gumbel-sampled second expert or an eval capacity
that can drop tokens is refused (export.py can switch the former to argmax on request), as is anything else
Qwen3-MoE cannot express, with the reason, before a file is written.
"""

import torch
from torch import Tensor, nn
from transformers import Qwen3MoeConfig
from transformers.activations import SiLUActivation

from sparsevl.model.moe import GatedMLPExperts
from sparsevl.model.upcycle import MoELayout, moe_feed_forwards, moe_layout

# Qwen3Config fields that Qwen3MoeConfig reads the same way.
SHARED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
                 "rms_norm_eps", "rope_parameters", "attention_bias", "attention_dropout", "tie_word_embeddings",
                 "bos_token_id", "eos_token_id", "pad_token_id")


class NotExportable(ValueError):
    """The model uses something Qwen3-MoE cannot express; the message says what."""


def sparse_layer_fields(layout: MoELayout, num_layers: int) -> dict:
    """decoder_sparse_step when the MoE layers are every step-th layer ((i + 1) % step == 0), else step 1 with
    the dense layers listed in mlp_only_layers."""
    for step in range(1, num_layers + 1):
        if layout.layers == [i for i in range(num_layers) if (i + 1) % step == 0]:
            return {"decoder_sparse_step": step, "mlp_only_layers": []}
    return {"decoder_sparse_step": 1, "mlp_only_layers": [i for i in range(num_layers) if i not in layout.layers]}


def qwen3_moe_config(llm: nn.Module, *, router_aux_loss_coef: float = 0.01) -> Qwen3MoeConfig:
    """The Qwen3MoeConfig of an upcycled Qwen3 LLM; NotExportable says why when there is none."""
    config = llm.config
    if config.model_type != "qwen3":
        why = (" (LLaMA attention has no q/k RMSNorm, which Qwen3-MoE always applies)"
               if config.model_type == "llama" else "")
        raise NotExportable(f"cannot export to qwen3-moe: the LLM is {config.model_type!r}{why}; "
                            "only an upcycled Qwen3 LLM has Qwen3-MoE's architecture")
    layout = moe_layout(llm)
    if layout is None:
        raise NotExportable("cannot export to qwen3-moe: the LLM has no MoE layers (train with --stage moe first)")
    if any(kind != "full_attention" for kind in (getattr(config, "layer_types", None) or [])):
        raise NotExportable("cannot export to qwen3-moe: the LLM uses sliding-window layers, which Qwen3-MoE "
                            "applies differently (use_sliding_window for every layer)")
    normalize = _check_routing(llm)
    values = {name: getattr(config, name) for name in SHARED_FIELDS if hasattr(config, name)}
    return Qwen3MoeConfig(**values, num_experts=layout.num_experts, num_experts_per_tok=layout.top_k,
                          moe_intermediate_size=config.intermediate_size, norm_topk_prob=normalize,
                          router_aux_loss_coef=router_aux_loss_coef, output_router_logits=False,
                          **sparse_layer_fields(layout, config.num_hidden_layers))


def _check_routing(llm: nn.Module) -> bool:
    """Refuse routing Qwen3-MoE does not have; returns the common normalize_top_k (norm_topk_prob)."""
    normalize = set()
    for index, ffn in moe_feed_forwards(llm):
        moe, where = ffn.moe, f"decoder layer {index}"
        reasons = [reason for reason, present in (
            ("its router has a bias", moe.router.gate.bias is not None),
            (f"its eval capacity can drop tokens (--eval_capacity_factor {moe.eval_capacity_factor} x top_k "
             f"{moe.router.top_k} < {moe.router.num_experts} experts; Qwen3-MoE drops none: export a model with "
             "--eval_capacity_factor 0 or >= num_experts / top_k)", _eval_can_drop(moe)),
            ("its second expert is Gumbel-sampled (--second_expert_policy sampling; Qwen3-MoE takes the next most "
             "probable: pass `sparsevl export --second_expert_policy argmax` to export that routing)",
             moe.router.second_expert_policy == "sampling" and moe.router.top_k > 1),
            ("it is a Residual MoE (--use_residual; Qwen3-MoE has no dense branch nor mixing coefficient)",
             ffn.residual is not None),
            ("it has shared experts", moe.shared_experts is not None),
            ("its experts are not gated SiLU MLPs", not isinstance(moe.experts, GatedMLPExperts)
             or not isinstance(moe.experts.act_fn, (SiLUActivation, nn.SiLU))),
        ) if present]
        if reasons:
            raise NotExportable(f"cannot export to qwen3-moe: {where}: {'; '.join(reasons)}")
        normalize.add(moe.router.normalize_top_k)
    if len(normalize) > 1:
        raise NotExportable("cannot export to qwen3-moe: MoE layers differ in top-k renormalisation")
    return normalize.pop()


def _eval_can_drop(moe) -> bool:
    """Whether the eval-mode capacity can be below the token count (every expert can take every token otherwise)."""
    factor = moe.eval_capacity_factor
    return factor is not None and factor * moe.router.top_k < moe.router.num_experts


def to_qwen3_moe_state_dict(llm: nn.Module) -> dict[str, Tensor]:
    """Our upcycled LLM's weights under Qwen3MoeForCausalLM's names (gate and up fused per expert)."""
    state = {}
    moe_prefixes = {f"model.layers.{index}.mlp." for index, _ in moe_feed_forwards(llm)}
    for name, tensor in llm.state_dict().items():
        if not any(name.startswith(prefix) for prefix in moe_prefixes):
            state[name] = tensor
    for index, ffn in moe_feed_forwards(llm):
        prefix, experts = f"model.layers.{index}.mlp.", ffn.moe.experts
        state[prefix + "gate.weight"] = ffn.moe.router.gate.weight.detach()
        # (num_experts, 2 * hidden, dim): gate rows then up rows, as Qwen3MoeExperts chunks gate_up_proj
        state[prefix + "experts.gate_up_proj"] = torch.cat([experts.gate_proj.detach(), experts.up_proj.detach()], 1)
        state[prefix + "experts.down_proj"] = experts.down_proj.detach()
    return state

