"""The rows a batch is decoding, with their KV caches: prefill new rows, step all rows one token, drop
finished rows, and append newly prefilled rows to a running batch (continuous batching at token boundaries).

Rows are left-padded: every row's next token sits in the last column, so a step feeds one token per row.
Appending rows of a different length pads the shorter side's caches and masks on the left; with a pruning
plan inside the LLM each layer's cache is padded to its own length (layers after a pruning point hold fewer
tokens), and each segment's key mask with it.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from sparsevl.model.cache_kwarg import cache_kwarg
from sparsevl.model.decoder import LayerwiseCache, decoder_forward
from sparsevl.model.vlm import SparseVLM


@dataclass
class PrefillInfo:
    """Per new row: what the LLM received and kept."""

    prompt_tokens: list[int]  # merged prompt length: text tokens plus the visual tokens entering the LLM
    visual_tokens: list[int]  # visual tokens entering the LLM
    visual_tokens_kept: list[int]  # visual tokens the LLM's last layer attends to (kept + recycled clusters)
    visual_positions: list[list[int]]  # prompt positions (in the row's unpadded prompt) of its visual tokens
    kept_positions: list[list[int]] | None  # prompt positions the last layer kept; None without pruning in the LLM


class DecodeRows:
    """KV caches, key masks and next positions of the rows being decoded; all tensors (rows, ...)."""

    def __init__(self, model: SparseVLM, cache: DynamicCache | LayerwiseCache, mask: torch.Tensor,
                 next_positions: torch.Tensor):
        self.model, self.cache, self.mask, self.next_positions = model, cache, mask, next_positions

    def __len__(self) -> int:
        return len(self.mask)

    @classmethod
    @torch.no_grad()
    def prefill(cls, model: SparseVLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: torch.Tensor | None) -> tuple["DecodeRows", torch.Tensor, PrefillInfo]:
        """Run the prompts (right-padded ids; images in placeholder order): rows, next-token logits (rows, vocab)."""
        inputs, _ = model.prepare_inputs(input_ids, attention_mask, pixel_values, padding_side="left")
        embeds, mask, positions = inputs.inputs_embeds, inputs.attention_mask, inputs.position_ids
        kept_positions = None
        if model.prunes_in_llm:
            context = model.pruning_context(input_ids, attention_mask, inputs).padded_to(embeds.shape[1])
            out = decoder_forward(model.llm, embeds, mask, positions, plan=model.pruning, context=context,
                                  use_cache=True, logits_to_keep=1, padding_side="left")
            logits, cache = out.logits[:, -1], out.past
            # kept visual tokens, and the recycled clusters SparseVLM appends after them (also visual, also attended)
            kept_visual = inputs.image_mask.gather(1, out.kept_index) & out.kept_mask | out.merged_mask  # (rows, kept)
            kept_positions = [_unpadded(index[valid], row_mask) for index, valid, row_mask
                              in zip(out.kept_index, out.kept_mask, mask)]
        else:
            cache = DynamicCache()
            logits = model.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                               logits_to_keep=1, **cache_kwarg(model.llm, cache)).logits[:, -1]
            kept_visual = inputs.image_mask
        info = PrefillInfo(prompt_tokens=mask.sum(1).tolist(), visual_tokens=inputs.image_mask.sum(1).tolist(),
                           visual_tokens_kept=kept_visual.sum(1).tolist(),
                           visual_positions=[_unpadded(row.nonzero().flatten(), row_mask)
                                             for row, row_mask in zip(inputs.image_mask, mask)],
                           kept_positions=kept_positions)
        return cls(model, cache, mask, positions[:, -1:] + 1), logits, info

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (rows,); returns the next-token logits (rows, vocab)."""
        llm = self.model.llm
        embeds = llm.get_input_embeddings()(tokens[:, None])  # (rows, 1, dim)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.mask), 1)], dim=1)
        positions, self.next_positions = self.next_positions, self.next_positions + 1
        if isinstance(self.cache, LayerwiseCache):
            out = decoder_forward(llm, embeds, self.mask, positions, plan=self.model.pruning, past=self.cache,
                                  use_cache=True, logits_to_keep=1, padding_side="left")
            self.cache = out.past
            return out.logits[:, -1]
        return llm(inputs_embeds=embeds, attention_mask=self.mask, position_ids=positions, use_cache=True,
                   **cache_kwarg(llm, self.cache)).logits[:, -1]

    def select(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order)."""
        index = torch.tensor(rows, dtype=torch.long)
        self.mask, self.next_positions = self.mask[index], self.next_positions[index]
        for layer in _dynamic_cache(self.cache).layers:
            layer.keys, layer.values = layer.keys[index], layer.values[index]
        if isinstance(self.cache, LayerwiseCache):
            self.cache.segment_masks = [mask[index] for mask in self.cache.segment_masks]

    def extend(self, other: "DecodeRows") -> None:
        """Append `other`'s rows after ours, left-padding whichever side is shorter."""
        if isinstance(self.cache, LayerwiseCache) and self.cache.segment_starts != other.cache.segment_starts:
            raise ValueError("cannot join rows decoded with different pruning plans")
        self.mask = _cat_left_padded(self.mask, other.mask, dim=1)
        self.next_positions = torch.cat([self.next_positions, other.next_positions])
        for mine, theirs in zip(_dynamic_cache(self.cache).layers, _dynamic_cache(other.cache).layers):
            mine.keys = _cat_left_padded(mine.keys, theirs.keys, dim=2)  # (rows, heads, seq, head_dim)
            mine.values = _cat_left_padded(mine.values, theirs.values, dim=2)
        if isinstance(self.cache, LayerwiseCache):
            self.cache.segment_masks = [_cat_left_padded(a, b, dim=1) for a, b
                                        in zip(self.cache.segment_masks, other.cache.segment_masks)]


def _dynamic_cache(cache: DynamicCache | LayerwiseCache) -> DynamicCache:
    return cache.cache if isinstance(cache, LayerwiseCache) else cache


def _cat_left_padded(a: torch.Tensor, b: torch.Tensor, *, dim: int) -> torch.Tensor:
    """Concatenate along rows (dim 0) after zero-padding the shorter of `a`, `b` on the left of `dim`."""
    length = max(a.shape[dim], b.shape[dim])

    def pad(t: torch.Tensor) -> torch.Tensor:
        widths = [0, 0] * (t.dim() - dim - 1) + [length - t.shape[dim], 0]  # F.pad lists the last dim first
        return F.pad(t, widths)

    return torch.cat([pad(a), pad(b)])


def _unpadded(positions: torch.Tensor, row_mask: torch.Tensor) -> list[int]:
    """Positions in a left-padded row -> positions in the unpadded prompt."""
    offset = int((row_mask == 0).sum())
    return sorted((positions - offset).tolist())
