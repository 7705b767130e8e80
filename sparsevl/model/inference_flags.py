"""Flags that change how a loaded checkpoint runs, shared by every command that answers questions: the token
pruning flags and the MoE second-expert policy. Each given flag is applied or refused, never ignored."""

from sparsevl.model.moe import SECOND_EXPERT_POLICIES, TopKRouter
from sparsevl.model.pruning import add_pruning_flags, build_pruning_plan


def add_inference_flags(parser) -> None:
    """The pruning flags plus --second_expert_policy (default: the checkpoint's own)."""
    add_pruning_flags(parser)
    parser.add_argument("--second_expert_policy", choices=SECOND_EXPERT_POLICIES, default=None, help=(
        "MoE models: how each router picks the experts after the first, overriding the checkpoint's setting. "
        "sampling: argmax of logits + Gumbel(0, 1) noise (MoE-LLaVA's code, also at inference, so answers vary "
        "with the seed); argmax: the next most probable (deterministic; Mixtral, Qwen3-MoE). Default: as trained."))


def apply_inference_flags(args, model) -> None:
    """Set `model`'s pruning plan and, when given, its routers' second-expert policy (ValueError on flags that do
    not fit the model)."""
    model.pruning = build_pruning_plan(args, model)
    policy = getattr(args, "second_expert_policy", None)
    if policy is not None:
        set_second_expert_policy(model, policy)


def set_second_expert_policy(model, policy: str) -> None:
    """Switch every top-k > 1 router of `model` to `policy`; ValueError when there is none."""
    if policy not in SECOND_EXPERT_POLICIES:
        raise ValueError(f"--second_expert_policy {policy!r} is unknown; valid: {', '.join(SECOND_EXPERT_POLICIES)}")
    routers = [m for m in model.modules() if isinstance(m, TopKRouter) and m.top_k > 1]
    if not routers:
        raise ValueError("--second_expert_policy applies to MoE models with top-k > 1 routers; this model has none")
    for router in routers:
        router.second_expert_policy = policy
