"""What to adapt and how: the counterpart of peft's `tuners/lora/config.py`, cut to the fields
this LoRA needs.

Usage:
    from ftnb.lora import LoraConfig
    cfg = LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"])
    cfg.scaling  # 2.0 = alpha / r
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ftnb.lora.layer import lora_scaling

ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class LoraConfig:
    """LoRA settings.

    r                  rank of the update B @ A
    alpha              numerator of the scale: alpha / r (alpha / sqrt(r) with use_rslora)
    dropout            dropout probability on the adapter's input (the base layer sees x unchanged)
    target_modules     "all-linear" (every linear layer except the output layer: lm_head, score,
                       classifier), or names matched against the end of module names, as peft
                       does: "q_proj" matches "model.layers.0.self_attn.q_proj"
    use_rslora         scale by alpha / sqrt(r) (rank-stabilised LoRA) instead of alpha / r
    use_dora           wrap in DoraLinear (magnitude vector + direction) instead of LoraLinear
    trainable_modules  modules trained in full next to the adapters (e.g. a fresh head "score");
                       peft calls them modules_to_save

    Usage: LoraConfig(r=16, alpha=32, target_modules="all-linear", trainable_modules=("score",))
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = ALL_LINEAR
    use_rslora: bool = False
    use_dora: bool = False
    trainable_modules: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig: r must be a positive integer, not {self.r!r}")
        if self.alpha <= 0:
            raise ValueError(f"LoraConfig: alpha must be positive, not {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoraConfig: dropout must be in [0, 1), not {self.dropout!r}")
        # Lists become tuples so that the config is hashable and compares equal after a JSON round trip.
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.trainable_modules, str):
            raise ValueError("LoraConfig: trainable_modules is a list of names, e.g. ('score',), "
                             f"not the string {self.trainable_modules!r}")
        object.__setattr__(self, "trainable_modules", tuple(self.trainable_modules))
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            raise ValueError(f"LoraConfig: target_modules is '{ALL_LINEAR}' or a list of module names, "
                             f"e.g. ['q_proj', 'v_proj'], not the string {self.target_modules!r}")
        if not self.target_modules:
            raise ValueError("LoraConfig: target_modules is empty; name at least one module or use 'all-linear'")

    @property
    def scaling(self) -> float:
        """The factor on B @ A x: alpha / r, or alpha / sqrt(r) with use_rslora."""
        return lora_scaling(self.r, self.alpha, self.use_rslora)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields. Usage: json.dumps(cfg.to_dict())"""
        return asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> LoraConfig:
        """The inverse of to_dict. Usage: LoraConfig.from_dict(json.load(f))"""
        return cls(**fields)
