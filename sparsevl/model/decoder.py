"""Our loop over a transformers causal LM's decoder layers: embeddings -> layers -> norm -> head.

It calls the model's own decoder layers, rotary embedding and mask builder unchanged; what it adds is
the freedom to drop tokens between layers. Kept tokens keep their original position ids (so their
rotary phases are unchanged), every run of layers between two pruning points (a "segment") gets its
own attention mask, and each layer's KV cache holds only the tokens that layer saw, so decoding after
a pruned prefill attends to each layer's kept keys and values.
"""

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from sparsevl.model.cache_kwarg import cache_kwarg
from sparsevl.model.pruning import PruningContext, PruningPlan, pack_kept, prune_step


@dataclass
class LayerwiseCache:
    """KV cache whose layers may hold different numbers of tokens, plus one 2D key mask per segment."""

    cache: DynamicCache
    segment_starts: list[int]  # first decoder layer of each segment
    segment_masks: list[torch.Tensor]  # (batch, cached tokens of that segment), 1 = real token


@dataclass
class DecoderOutput:
    logits: torch.Tensor  # (batch, kept seq or logits_to_keep, vocab)
    last_hidden_state: torch.Tensor  # (batch, kept seq, dim), after the final norm
    kept_index: torch.Tensor  # (batch, kept seq): index of each output position in the input sequence
    kept_mask: torch.Tensor  # (batch, kept seq): True where the output position is a real token
    past: LayerwiseCache | None
    tokens_per_layer: list[int] = field(default_factory=list)  # sequence length each layer ran on


def causal_lm_parts(llm):
    """(base decoder model, output head) of a transformers causal LM, seen through a PEFT wrapper if any."""
    causal_lm = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    decoder = causal_lm.get_decoder()
    for name in ("layers", "norm", "rotary_emb"):
        if not hasattr(decoder, name):
            raise ValueError(f"{type(causal_lm).__name__}: the decoder loop needs `model.{name}` (LLaMA/Qwen layout)")
    layer_types = getattr(decoder.config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        raise ValueError(f"{type(causal_lm).__name__} has non-full-attention layers ({sorted(set(layer_types))}); "
                         "the decoder loop supports full attention only")
    return decoder, causal_lm.get_output_embeddings()


def decoder_forward(llm, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *,
                    plan: PruningPlan | None = None, context: PruningContext | None = None,
                    past: LayerwiseCache | None = None, use_cache: bool = False, logits_to_keep: int = 0,
                    padding_side: str = "right") -> DecoderOutput:
    """Run the LLM on (batch, seq, dim) embeddings, pruning visual tokens before the plan's layers.

    With `past`, the inputs are new tokens after a cached prefill; pruning happens in prefill only.
    `attention_mask` covers the cached and new tokens in the original (unpruned) coordinates.
    """
    decoder, head = causal_lm_parts(llm)
    batch, seq = inputs_embeds.shape[:2]
    steps = {} if plan is None or past is not None else {step.layer: step for step in plan.steps}
    if steps and context is None:
        raise ValueError("pruning needs a PruningContext (which tokens are visual and which may rate them)")
    if past is not None:
        cache, new_mask = past.cache, attention_mask[:, -seq:]
        starts = list(past.segment_starts)
        masks = [torch.cat([m, new_mask], dim=1) for m in past.segment_masks]
    else:
        cache = DynamicCache() if use_cache else None
        starts, masks = [0], [attention_mask]
    hidden, positions = inputs_embeds, position_ids
    kept_index = torch.arange(seq, device=hidden.device).expand(batch, seq)
    kept_mask = attention_mask[:, -seq:].bool()
    position_embeddings, causal_mask, tokens_per_layer = None, None, []
    for i, layer in enumerate(decoder.layers):
        if i in steps:
            keep = prune_step(steps[i], layer=layer, hidden=hidden, positions=positions, valid=kept_mask,
                              rotary=decoder.rotary_emb, context=context, plan=plan)
            hidden, keep_mask = keep.hidden, keep.mask
            index, valid = pack_kept(keep_mask, padding_side)
            hidden = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))  # (batch, kept, dim)
            positions, kept_index = positions.gather(1, index), kept_index.gather(1, index)
            context = context.gather(index)
            kept_mask = valid
            if starts[-1] == i:  # pruning before layer 0 replaces the input segment
                starts.pop(), masks.pop()
            starts.append(i)
            masks.append(valid.long())
            position_embeddings = causal_mask = None
        if position_embeddings is None:
            position_embeddings = decoder.rotary_emb(hidden, position_ids=positions)
        if i in starts:  # a new segment: its own mask, sized by this layer's cache
            causal_mask = create_causal_mask(config=decoder.config, inputs_embeds=hidden,
                                             attention_mask=masks[starts.index(i)],
                                             **cache_kwarg(create_causal_mask, cache),
                                             position_ids=positions, layer_idx=i)
        hidden = layer(hidden, attention_mask=causal_mask, position_embeddings=position_embeddings,
                       position_ids=positions, use_cache=use_cache, **cache_kwarg(layer, cache))
        tokens_per_layer.append(hidden.shape[1])
    hidden = decoder.norm(hidden)
    logits = head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
    new_past = LayerwiseCache(cache, starts, masks) if use_cache else None
    return DecoderOutput(logits=logits, last_hidden_state=hidden, kept_index=kept_index, kept_mask=kept_mask,
                         past=new_past, tokens_per_layer=tokens_per_layer)
