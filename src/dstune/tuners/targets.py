"""LoRA target presets per architecture, so recipes can say `targets: auto`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TargetPreset:
    """Which modules (and fused expert parameters) LoRA adapts for one architecture."""

    modules: list[str]
    # Fused 3-D expert weights, reachable only through peft `target_parameters`.
    expert_parameters: list[str] = field(default_factory=list)
    # IA3 rescales these outputs (and, for the feed-forward ones, inputs) with learned vectors.
    ia3_modules: list[str] = field(default_factory=list)
    ia3_feedforward: list[str] = field(default_factory=list)


_DENSE = TargetPreset(
    modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ia3_modules=["k_proj", "v_proj", "down_proj"], ia3_feedforward=["down_proj"],
)

_MLA_MOE = TargetPreset(
    # MLA projections (q_proj appears instead of q_a/q_b when q_lora_rank is None), then the dense MLPs of the
    # first layers and the shared experts; the routed experts are fused parameters.
    modules=[
        "q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
        "gate_proj", "up_proj", "down_proj",
    ],
    expert_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    # kv_b_proj expands the latent into per-head keys and values: IA3's k/v scaling lands there.
    ia3_modules=["kv_b_proj", "down_proj"], ia3_feedforward=["down_proj"],
)

TARGET_PRESETS: dict[str, TargetPreset] = {
    "llama": _DENSE,
    "mistral": _DENSE,
    "qwen2": _DENSE,
    "qwen3": _DENSE,
    "deepseek_v2": _MLA_MOE,
    "deepseek_v3": _MLA_MOE,
}


def target_preset(model_type: str) -> TargetPreset | None:
    """The preset of an architecture, or None (then peft's `all-linear` applies)."""
    return TARGET_PRESETS.get(model_type)
