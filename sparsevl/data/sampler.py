"""LLaVA's `--group_by_modality_length` order: batches of image records only or text-only records only, each of
similar length; the last, mixed batch collects the remainders.

Lengths follow LLaVA: a record's word count, positive with an image, negative without. The rule, as LLaVA's
LengthGroupedSampler: shuffle each modality, cut it into megabatches of world_size x batch_size, sort each
megabatch by length (longest first) and split it into world_size chunks of similar total length; shuffle the
megabatches of both modalities together and append the two modalities' last, incomplete megabatches as one.
"""

import torch
from torch.utils.data import Sampler


def _even_chunks(indices: list[int], lengths: list[int], num_chunks: int) -> list[list[int]]:
    """Split indices into num_chunks of equal count, each next index to the chunk with the smallest total length."""
    if len(indices) % num_chunks:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks, totals = [[] for _ in range(num_chunks)], [0] * num_chunks
    for index in indices:
        open_chunks = [c for c in range(num_chunks) if len(chunks[c]) < per_chunk]
        target = min(open_chunks, key=lambda c: totals[c])
        chunks[target].append(index)
        totals[target] += lengths[index]
    return chunks


def length_grouped_indices(lengths: list[int], batch_size: int, world_size: int,
                           generator: torch.Generator | None) -> list[int]:
    """A random order in which every megabatch is sorted by length and split evenly over the processes."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    megabatch = world_size * batch_size
    out = []
    for start in range(0, len(order), megabatch):
        group = sorted(order[start:start + megabatch], key=lambda i: lengths[i], reverse=True)
        out += [i for chunk in _even_chunks(group, lengths, world_size) for i in chunk]
    return out


def modality_grouped_indices(lengths: list[int], batch_size: int, world_size: int,
                             generator: torch.Generator | None) -> list[int]:
    """LLaVA's modality-grouped order of `lengths` (nonzero; negative marks a text-only record)."""
    if any(length == 0 for length in lengths):
        raise ValueError("--group_by_modality_length: a record has no words (length 0)")
    if all(length > 0 for length in lengths) or all(length < 0 for length in lengths):
        return length_grouped_indices([abs(n) for n in lengths], batch_size, world_size, generator)
    megabatch = world_size * batch_size
    groups = []
    for sign in (1, -1):
        indices = [i for i, n in enumerate(lengths) if n * sign > 0]
        grouped = length_grouped_indices([abs(lengths[i]) for i in indices], batch_size, world_size, generator)
        order = [indices[i] for i in grouped]
        groups.append([order[i:i + megabatch] for i in range(0, len(order), megabatch)])
    (image_batches, text_batches) = groups
    leftover = image_batches[-1] + text_batches[-1]
    full = image_batches[:-1] + text_batches[:-1]
    full = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    if leftover:
        full.append(sorted(leftover))
    return [i for batch in full for i in batch]


class ModalityLengthGroupedSampler(Sampler):
    """Yields `modality_grouped_indices` anew each epoch (the epoch seeds the shuffle)."""

    def __init__(self, lengths, *, batch_size: int, world_size: int, seed: int):
        self.lengths = [int(n) for n in lengths]
        self.batch_size, self.world_size, self.seed = batch_size, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(modality_grouped_indices(self.lengths, self.batch_size, self.world_size, generator))
