"""Token merging rules of the published pruners: SparseVLM v1.5's recycling and VisionZip's contextual tokens.

Both are pure functions of tensors (no model), so tests can compare them with a slow reference directly.
"""

import torch

RECYCLE_SHARE = 0.3  # SparseVLM v1.5: the best-scored 30% (+1) of a stage's dropped tokens are recycled
TOKENS_PER_CLUSTER = 10  # ... into floor(n / 10) + 1 clusters
DENSITY_TIE = 1e-6  # densities closer than this tie (the official code's noise scale)


def dpc_knn_merge(tokens: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Density-peak clustering with k-nearest neighbours (k = `num_clusters`, as in TCFormer); mean per cluster.

    tokens (n, dim) -> (num_clusters, dim), clusters in the order of their centres' peak score (highest first).
    Distances are Euclidean / sqrt(dim); density = exp(-mean squared distance to the k nearest, self included);
    a token's peak distance is its distance to the nearest denser token (the largest distance if none is denser);
    the `num_clusters` tokens of highest density x peak distance are the centres; every token joins its nearest
    centre. Densities within 1e-6 of each other tie (mutual nearest neighbours always do); the official code
    breaks ties with random 1e-6 noise, here the earlier token (the better-scored one, in pool order) is denser.
    """
    dim = tokens.shape[-1]
    dist = torch.cdist(tokens[None], tokens[None], compute_mode="donot_use_mm_for_euclid_dist")[0] / dim ** 0.5
    nearest = dist.topk(num_clusters, dim=-1, largest=False).values  # (n, k)
    density = (-(nearest ** 2).mean(-1)).exp()  # (n,)
    index = torch.arange(len(tokens), device=tokens.device)
    gap = density[None, :] - density[:, None]  # [i, j]: density of j minus that of i
    denser = (gap > DENSITY_TIE) | ((gap.abs() <= DENSITY_TIE) & (index[None, :] < index[:, None]))  # j over i
    peak = torch.where(denser, dist, dist.max()).min(-1).values  # (n,)
    centres = (peak * density).topk(num_clusters).indices  # (k,)
    assign = dist[:, centres].argmin(-1)
    assign[centres] = torch.arange(num_clusters, device=tokens.device)
    sums = tokens.new_zeros(num_clusters, dim).index_add(0, assign, tokens)
    sizes = torch.bincount(assign, minlength=num_clusters).to(tokens.dtype)
    return sums / sizes[:, None]


def recycled_tokens(hidden: torch.Tensor, scores: torch.Tensor, dropped: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseVLM v1.5 recycling of one stage, per row: of the `dropped` tokens (batch, seq), the top 30% (+1) by
    `scores` are clustered (DPC-kNN) into floor(n / 10) + 1 averaged tokens of `hidden` (the layer's output).

    Returns (batch, most clusters, dim) cluster tokens and their (batch, most clusters) validity.
    """
    rows = []
    for row in range(len(hidden)):
        index = dropped[row].nonzero().flatten()
        if len(index) == 0:
            rows.append(hidden.new_zeros(0, hidden.shape[-1]))
            continue
        pool_size = int(len(index) * RECYCLE_SHARE) + 1
        pool = index[scores[row, index].topk(pool_size).indices]
        rows.append(dpc_knn_merge(hidden[row, pool], pool_size // TOKENS_PER_CLUSTER + 1))
    width = max(len(r) for r in rows)
    out = hidden.new_zeros(len(hidden), width, hidden.shape[-1])
    valid = torch.zeros(len(hidden), width, dtype=torch.bool, device=hidden.device)
    for row, clusters in enumerate(rows):
        out[row, :len(clusters)], valid[row, :len(clusters)] = clusters, True
    return out, valid


def visionzip_merge(hidden: torch.Tensor, cls_attention: torch.Tensor, keys: torch.Tensor, *, dominant: int,
                    contextual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip: [CLS] + the `dominant` patches of highest [CLS] attention, then `contextual` merged tokens.

    hidden (images, 1 + patches, dim) are the vision layer's outputs, cls_attention (images, patches) its [CLS]
    row summed over heads, keys (images, 1 + patches, head_dim) its keys averaged over heads. The remaining tokens
    (original order) are compared by cosine similarity of their keys; targets are every ⌊n / contextual⌋-th of
    them; each other token joins its most similar target; a contextual token = target + mean of its members.
    Returns (images, 1 + dominant + contextual, dim) and the dominant patch indices (images, dominant), sorted.
    """
    images, tokens, dim = hidden.shape
    top = cls_attention.topk(dominant, dim=-1).indices.sort(-1).values  # (images, dominant) patch indices
    is_dominant = torch.zeros(images, tokens, dtype=torch.bool, device=hidden.device)
    is_dominant[:, 0] = True
    is_dominant.scatter_(1, top + 1, True)
    dominant_tokens = hidden[is_dominant].view(images, dominant + 1, dim)
    remaining = tokens - dominant - 1
    rest = hidden[~is_dominant].view(images, remaining, dim)
    rest_keys = torch.nn.functional.normalize(keys[~is_dominant].view(images, remaining, -1), dim=-1)
    step = max(1, remaining // contextual)
    is_target = torch.zeros(remaining, dtype=torch.bool, device=hidden.device)
    is_target[torch.arange(0, remaining, step, device=hidden.device)[:contextual]] = True
    similarity = rest_keys[:, ~is_target] @ rest_keys[:, is_target].transpose(1, 2)  # (images, members, targets)
    assign = torch.nn.functional.one_hot(similarity.argmax(-1), contextual).to(hidden.dtype)
    sizes = assign.sum(1).clamp(min=1)[..., None]  # (images, targets, 1)
    merged = rest[:, is_target] + assign.transpose(1, 2) @ rest[:, ~is_target] / sizes
    return torch.cat([dominant_tokens, merged], dim=1), top
