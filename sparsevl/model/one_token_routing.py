"""One decode token's top-1/top-2 routing decided in Python on the router's floats: the experts and weights that
`TopKRouter`'s torch ops give, to the last bit, or None where that cannot be guaranteed (the router then runs its
torch ops on the same numbers).

Why: at one token each torch op costs several microseconds (the experts' matmuls have just cycled the caches),
more than its arithmetic on eight floats; decoding one token through an MoE layer ran about twenty of them to
route. Exactness, op by op:
- argmax and comparisons of fp32 values are exact in Python floats; torch.argmax's first-of-equal-maxima rule is
  list.index(max(...)); topk orders equal values as it likes, so ties where topk decides give None;
- a sum or quotient of two fp32 values computed in float64 and rounded once to fp32 is the fp32 result (double
  rounding is harmless when the wider format has at least 2 x 24 + 2 bits);
- the Gumbel noise -log(-log(u)) goes through fp32 logarithms whose last bits Python cannot reproduce, so the
  second choice is taken only where the best noisy logit leads the next by far more than the fp32 error
  (NOISE_MARGIN, relative); closer calls give None.
"""

import array
import math
import struct

FLOAT32_EPS, FLOAT32_TINY = 2.0**-23, 2.0**-126
# torch.distributions.Uniform(tiny, 1 - eps): u = tiny + U x span (in binary64 and fp32 alike, span is 1 - eps)
UNIFORM_SPAN = 1 - FLOAT32_EPS - FLOAT32_TINY
# fp32 logs are within a few ulps (1.2e-7 relative each); a lead under this fraction of the values' size is a
# close call left to torch
NOISE_MARGIN = 1e-5


def float32(value: float) -> float:
    """`value` rounded to the nearest float32."""
    return struct.unpack("f", struct.pack("f", value))[0]


def gumbel_uniform(draws: list[float]) -> array.array:
    """u = tiny + draw x span for U(0, 1) fp32 draws, as torch's fp32 mul_ then add_ give it. The binary64 product
    is exact and adding tiny to it changes it only where it is 0, so one rounding to fp32 (an "f" array's) gives
    torch's two."""
    return array.array("f", [draw * UNIFORM_SPAN + FLOAT32_TINY for draw in draws])


def gumbel_argmax(logits: list[float], uniform: list[float], masked: int) -> int | None:
    """argmax over experts other than `masked` of fp32(logit - fp32 log(-log(u))), u = tiny + uniform x span in
    fp32, as torch computes it; None for a lead within the fp32 error, or for non-finite logits."""
    if not math.isfinite(sum(logits)):
        return None
    scores = [logit - math.log(-math.log(u)) for logit, u in zip(logits, gumbel_uniform(uniform))]
    scores[masked] = -math.inf
    ranked = sorted(scores, reverse=True)  # the masked expert last
    best, runner_up = ranked[0], ranked[1]
    scale = 1 + max(map(abs, logits)) + max(abs(best), abs(ranked[-2]))
    if best - runner_up <= 2 * NOISE_MARGIN * scale:
        return None
    return scores.index(best)


def route_one_token(probs: list[float], logits: list[float] | None, uniform: list[float] | None, *, top_k: int,
                    normalize: bool) -> tuple[list[int], list[float]] | None:
    """(experts, weights) for one token with top_k 1 or 2: the first expert is the most probable; the second
    the next most probable (uniform None) or the Gumbel choice from the drawn `uniform` (logits needed then);
    weights are the probabilities, renormalised over the chosen when `normalize`. None where torch could decide
    otherwise (see the module docstring)."""
    if math.isnan(sum(probs)):  # torch's comparisons treat NaN as largest
        return None
    first = probs.index(max(probs))
    chosen = [first]
    if top_k == 2 and uniform is not None:
        second = gumbel_argmax(logits, uniform, first)
        if second is None:
            return None
        chosen.append(second)
    elif uniform is None:  # topk: the top_k largest, equal values in an order of its own
        ranked = sorted(probs, reverse=True)
        if ranked[top_k - 1] in ranked[top_k:] or ranked.count(ranked[0]) > 1:
            return None
        chosen += [probs.index(value) for value in ranked[1:top_k]]
    weights = [probs[expert] for expert in chosen]
    if normalize:
        total = float32(sum(weights))
        weights = [float32(weight / total) for weight in weights]
    return chosen, weights
