"""Per-request sampling settings and the next-token rule: greedy at temperature 0, else temperature
sampling restricted to the nucleus (top-p), drawn from the request's own seeded generator so that a
request's answer does not depend on which other requests share its batch."""

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    seed: int | None = None  # None: a fresh random seed
    stop: list[str] = field(default_factory=list)  # the answer ends before the first of these strings

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def generator(self) -> torch.Generator | None:
        """The request's random stream (None when greedy)."""
        if self.temperature == 0:
            return None
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """(vocab,) probabilities -> the nucleus renormalised: the most probable tokens until their sum reaches
    top_p (the first always kept), others zero."""
    if top_p >= 1:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    before = sorted_probs.cumsum(0) - sorted_probs  # mass of the more probable tokens
    kept = torch.zeros_like(probs).scatter(0, order, (before < top_p).to(probs.dtype))
    filtered = probs * kept
    return filtered / filtered.sum()


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One row's next token from its (vocab,) logits."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = top_p_filter(torch.softmax(logits.float() / params.temperature, dim=-1), params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))
