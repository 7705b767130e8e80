"""Named tiny/mid configurations: real architectures with small numbers, random weights.

A preset name can stand wherever a local checkpoint path is accepted (`--model_name_or_path`,
`--vision_tower`). Tests and the CPU demo use the tiny ones; benchmarks use the mid ones.
"""

from transformers import AutoConfig, CLIPVisionConfig, PretrainedConfig, SiglipVisionConfig

_LLM_PRESETS: dict[str, dict] = {
    "tiny-qwen3": dict(model_type="qwen3", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024),
    "tiny-llama": dict(model_type="llama", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
    "mid-llama": dict(model_type="llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096),
    "mid-qwen3": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096),
    # Qwen3-0.6B's shape (random weights), for benchmarks at LLaVA's 576 visual tokens
    "qwen3-0.6b-shape": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                             num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096),
}

_VISION_PRESETS: dict[str, dict] = {
    "tiny-clip": dict(model_type="clip_vision_model", image_size=64, patch_size=8, hidden_size=128,
                      intermediate_size=384, num_hidden_layers=4, num_attention_heads=4),
    "tiny-clip16": dict(model_type="clip_vision_model", image_size=64, patch_size=16, hidden_size=128,
                        intermediate_size=384, num_hidden_layers=4, num_attention_heads=4),
    "tiny-siglip": dict(model_type="siglip_vision_model", image_size=64, patch_size=8, hidden_size=128, vision_use_head=False,
                        intermediate_size=384, num_hidden_layers=4, num_attention_heads=4),
    "mid-clip64": dict(model_type="clip_vision_model", image_size=64, patch_size=8, hidden_size=512,
                       intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8),
    "mid-clip": dict(model_type="clip_vision_model", image_size=336, patch_size=14, hidden_size=512,
                     intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8),
}


def llm_preset_names() -> list[str]:
    return sorted(_LLM_PRESETS)


def vision_preset_names() -> list[str]:
    return sorted(_VISION_PRESETS)


def is_preset(name: str) -> bool:
    return name in _LLM_PRESETS or name in _VISION_PRESETS


def llm_preset_config(name: str, *, vocab_size: int) -> PretrainedConfig:
    """Config of a named LLM preset with the tokenizer's vocabulary size; untied head, eager-free SDPA."""
    values = dict(_LLM_PRESETS[name])
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, vocab_size=vocab_size, tie_word_embeddings=False, **values)


def vision_preset_config(name: str) -> PretrainedConfig:
    values = dict(_VISION_PRESETS[name])
    config_class = {"clip_vision_model": CLIPVisionConfig, "siglip_vision_model": SiglipVisionConfig}[
        values.pop("model_type")]
    return config_class(**values)
