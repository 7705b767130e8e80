"""Our loop over a transformers causal LM's decoder layers: embeddings -> layers -> norm -> head.

It calls the model's own decoder layers, rotary embedding and mask builder unchanged; what it adds is
the freedom to drop tokens between layers. Kept tokens keep their original position ids (so their
rotary phases are unchanged), every run of layers between two pruning points (a "segment") gets its
own attention mask, and each layer's KV cache holds only the tokens that layer saw, so decoding after
a pruned prefill attends to each layer's kept keys and values. Tokens a pruner merges (SparseVLM's
recycled clusters) are inserted after each row's last visual token, at that token's position id.
"""

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from sparsevl.model.cache_kwarg import cache_kwarg
from sparsevl.model.pruning import (PRUNER_RULES, KeptTokens, PruningContext, PruningPlan, pack_kept,
                                    prepare_context, score_visual, select_kept)


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
    kept_mask: torch.Tensor  # (batch, kept seq): True where the output position is an input token
    past: LayerwiseCache | None
    tokens_per_layer: list[int] = field(default_factory=list)  # sequence length each layer ran on
    merged_mask: torch.Tensor | None = None  # (batch, kept seq): True at merged tokens (kept_index: their anchor)


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


@dataclass
class _Sequence:
    """The tokens a decoder layer runs on, and where each came from."""

    hidden: torch.Tensor  # (batch, seq, dim)
    positions: torch.Tensor  # (batch, seq) position ids
    kept_index: torch.Tensor  # (batch, seq) index in the input sequence (merged tokens: their anchor's)
    valid: torch.Tensor  # (batch, seq) real tokens
    merged: torch.Tensor  # (batch, seq) merged tokens
    context: PruningContext | None

    def pack(self, keep: KeptTokens, padding_side: str) -> "_Sequence":
        """The kept tokens (and the merged ones after each row's last visual token), packed to the left or right."""
        hidden, mask, seq = keep.hidden, keep.mask, keep.mask.shape[1]
        positions, kept_index, merged, context = self.positions, self.kept_index, self.merged, self.context
        order = torch.arange(seq, device=mask.device).expand_as(mask)
        if keep.appended is not None and keep.appended.shape[1]:
            count = keep.appended.shape[1]
            anchor = ((context.image_mask & self.valid) * torch.arange(1, seq + 1, device=mask.device)).argmax(1)
            anchor = anchor[:, None].expand(-1, count)  # (batch, count): the row's last visual token
            hidden = torch.cat([hidden, keep.appended], 1)
            positions = torch.cat([positions, positions.gather(1, anchor)], 1)
            kept_index = torch.cat([kept_index, kept_index.gather(1, anchor)], 1)
            merged = torch.cat([merged, torch.ones_like(anchor, dtype=torch.bool)], 1)
            context = context.appended(count)
            mask = torch.cat([mask, keep.appended_valid], 1)
            order = torch.cat([order * (count + 1), anchor * (count + 1) + 1 + torch.arange(count)], 1)
        index, valid = pack_kept(mask, padding_side, order)
        hidden = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))  # (batch, kept, dim)
        return _Sequence(hidden, positions.gather(1, index), kept_index.gather(1, index), valid,
                         merged.gather(1, index) & valid, context.gather(index))


def decoder_forward(llm, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, *,
                    plan: PruningPlan | None = None, context: PruningContext | None = None,
                    past: LayerwiseCache | None = None, use_cache: bool = False, logits_to_keep: int = 0,
                    padding_side: str = "right") -> DecoderOutput:
    """Run the LLM on (batch, seq, dim) embeddings, pruning visual tokens as the plan says.

    A step at layer L leaves layers L.. on the kept tokens; its scores come from layer L's attention on its input
    (rule "input") or from layer L-1's, the last layer on all tokens (rule "previous", whose output is pruned).
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
    valid = attention_mask[:, -seq:].bool()
    if steps:
        context = prepare_context(plan, inputs_embeds, context, valid)
    now = _Sequence(inputs_embeds, position_ids, torch.arange(seq, device=inputs_embeds.device).expand(batch, seq),
                    valid, torch.zeros_like(valid), context)
    after = steps and PRUNER_RULES[plan.pruner].scores_at == "previous"
    position_embeddings, causal_mask, tokens_per_layer = None, None, []
    for i, layer in enumerate(decoder.layers):
        scores = None
        if i in steps or (after and i + 1 in steps):
            scores = score_visual(plan, layer=layer, hidden=now.hidden, positions=now.positions, valid=now.valid,
                                  rotary=decoder.rotary_emb, context=now.context)
        if i in steps and not after:
            now = now.pack(select_kept(steps[i], plan, scores, hidden=now.hidden, valid=now.valid,
                                       context=now.context), padding_side)
            if starts[-1] == i:  # pruning before layer 0 replaces the input segment
                starts.pop(), masks.pop()
            starts.append(i)
            masks.append(now.valid.long())
            position_embeddings = None
        if position_embeddings is None:
            position_embeddings = decoder.rotary_emb(now.hidden, position_ids=now.positions)
        if i in starts:  # a new segment: its own mask, sized by this layer's cache
            causal_mask = create_causal_mask(config=decoder.config, inputs_embeds=now.hidden,
                                             attention_mask=masks[starts.index(i)],
                                             **cache_kwarg(create_causal_mask, cache),
                                             position_ids=now.positions, layer_idx=i)
        now.hidden = layer(now.hidden, attention_mask=causal_mask, position_embeddings=position_embeddings,
                           position_ids=now.positions, use_cache=use_cache, **cache_kwarg(layer, cache))
        tokens_per_layer.append(now.hidden.shape[1])
        if after and i + 1 in steps:  # the layer ran on all tokens; its output is pruned
            now = now.pack(select_kept(steps[i + 1], plan, scores, hidden=now.hidden, valid=now.valid,
                                       context=now.context), padding_side)
            starts.append(i + 1)
            masks.append(now.valid.long())
            position_embeddings = None
    hidden = decoder.norm(now.hidden)
    logits = head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
    new_past = LayerwiseCache(cache, starts, masks) if use_cache else None
    return DecoderOutput(logits=logits, last_hidden_state=hidden, kept_index=now.kept_index,
                         kept_mask=now.valid & ~now.merged, past=new_past, tokens_per_layer=tokens_per_layer,
                         merged_mask=now.merged)
