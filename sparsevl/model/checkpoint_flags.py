"""Architecture flags given over a loaded sparsevl checkpoint: each takes effect on the model or stops with an error
naming the flag, the checkpoint's value and the value asked for; none is dropped.

What takes effect: `--mm_projector_type moe|adaptive_moe` over an `mlp2x_gelu` projector upcycles it MoE-LLaVA style
(`--mm_moe_num_experts` copies of the dense projector and a fresh top-`--mm_moe_top_k` router, so the model first
computes what the dense one did); `--mm_vision_select_layer` / `--mm_vision_select_feature` change which features of
the vision tower the projector reads (the projector keeps its weights). Everything else is an error.
"""

from dataclasses import MISSING, fields

from sparsevl.config import ModelArguments
from sparsevl.model.moe import MLPExperts, MoELayer, TopKRouter
from sparsevl.model.projectors import DenseProjector, MoEProjector
from sparsevl.model.vision import SELECT_FEATURES, hidden_state_index

# Flags that fix the architecture a checkpoint was saved with.
ARCHITECTURE_FIELDS = ("vision_tower", "mm_projector_type", "mm_vision_select_layer", "mm_vision_select_feature",
                       "num_query_tokens", "mm_moe_num_experts", "mm_moe_top_k")
# An adaptive checkpoint's classifier fixes these too; a fixed-layer checkpoint may start adaptive training.
ADAPTIVE_ARCHITECTURE_FIELDS = ("use_adaptive_layer_selection", "candidate_layers", "layer_classifier_use_text",
                                "layer_classifier_hidden_size")
MOE_PROJECTORS = ("moe", "adaptive_moe")


def given_flags(args: ModelArguments) -> set[str]:
    """Names of the flags the user gave: recorded by `parse_train_args`, else those that differ from the default."""
    recorded = getattr(args, "given_flags", None)
    if recorded is not None:
        return set(recorded)
    return {f.name for f in fields(args) if f.default is not MISSING and getattr(args, f.name) != f.default}


def apply_checkpoint_flags(model, saved: ModelArguments, current: ModelArguments, *, source) -> ModelArguments:
    """The arguments of this run over checkpoint `source` (saved with `saved`): applies what can change on `model`,
    refuses the rest, and returns the resolved arguments (the checkpoint's architecture plus what was applied)."""
    fixed = ARCHITECTURE_FIELDS + (ADAPTIVE_ARCHITECTURE_FIELDS if saved.use_adaptive_layer_selection else ())
    given = given_flags(current)
    asked = {name: getattr(current, name) for name in fixed
             if name in given and _differs(name, getattr(current, name), getattr(saved, name))}
    resolved = {f.name: getattr(current, f.name) for f in fields(ModelArguments)}
    resolved.update({name: getattr(saved, name) for name in fixed})
    if asked.get("mm_projector_type") in MOE_PROJECTORS:
        _upcycle_projector(model, saved, current, source)
        resolved.update({name: getattr(current, name) for name in ("mm_projector_type", "mm_moe_num_experts",
                                                                     "mm_moe_top_k")})
        asked = {k: v for k, v in asked.items() if k not in ("mm_projector_type", "mm_moe_num_experts",
                                                             "mm_moe_top_k")}
    for name, apply in (("mm_vision_select_layer", _select_layer), ("mm_vision_select_feature", _select_feature)):
        if name in asked and not saved.use_adaptive_layer_selection:
            apply(model, asked.pop(name))
            resolved[name] = getattr(current, name)
            print(f"checkpoint {source}: --{name} {getattr(current, name)} replaces its {getattr(saved, name)} "
                  "(the projector keeps its weights)", flush=True)
    if asked:
        name, value = next(iter(asked.items()))
        raise ValueError(f"--{name} {value} contradicts checkpoint {source}, which was saved with {name} "
                         f"{getattr(saved, name)}; drop the flag (or start from the LLM and vision tower)"
                         + _hint(name, saved))
    return ModelArguments(**resolved)


def _differs(name: str, value, saved_value) -> bool:
    if name == "mm_projector_type" and value in MOE_PROJECTORS and saved_value in MOE_PROJECTORS:
        return False  # adaptive_moe is MoE-LLaVA's name of our moe projector
    return value != saved_value


def _hint(name: str, saved: ModelArguments) -> str:
    if name in ("mm_moe_num_experts", "mm_moe_top_k") and saved.mm_projector_type not in MOE_PROJECTORS:
        return f"; with --mm_projector_type moe its {saved.mm_projector_type} projector is upcycled into experts"
    if name == "mm_projector_type":
        return "; only an mlp2x_gelu projector turns into moe (upcycled)"
    return ""


def _upcycle_projector(model, saved: ModelArguments, current: ModelArguments, source) -> None:
    """The checkpoint's mlp2x_gelu projector -> a MoE projector whose experts all copy it (MoE-LLaVA's upcycling)."""
    if saved.mm_projector_type != "mlp2x_gelu" or not isinstance(model.projector, DenseProjector):
        raise ValueError(f"--mm_projector_type {current.mm_projector_type} contradicts checkpoint {source}, which "
                         f"was saved with mm_projector_type {saved.mm_projector_type}; only an mlp2x_gelu "
                         "projector can be upcycled into a moe projector")
    experts = MLPExperts.from_dense(model.projector.net, current.mm_moe_num_experts)
    router = TopKRouter(dim=experts.up_proj.shape[-1], num_experts=current.mm_moe_num_experts,
                        top_k=current.mm_moe_top_k).to(experts.up_proj)
    model.projector = MoEProjector(MoELayer(router=router, experts=experts))
    print(f"checkpoint {source}: its mlp2x_gelu projector upcycled into {current.mm_moe_num_experts} experts, "
          f"top-{current.mm_moe_top_k} routing (--mm_projector_type {current.mm_projector_type})", flush=True)


def _select_layer(model, layer: int) -> None:
    hidden_state_index(layer, model.vision_tower.config.num_hidden_layers, flag="--mm_vision_select_layer")
    model.vision_tower.select_layer = layer


def _select_feature(model, feature: str) -> None:
    if feature not in SELECT_FEATURES:
        raise ValueError(f"--mm_vision_select_feature must be one of {SELECT_FEATURES}, got {feature!r}")
    model.vision_tower.select_feature = feature
