"""Architecture and training recipe of the toy models: plain settings, importable without torch
(the Snakefile checks them at start)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


@dataclass
class ToyModelConfig:
    """Architecture of a toy model (both families); defaults are the measured recipe (docs/toy_models.md)."""

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 256
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2  # decoder language models only (grouped-query attention)
    text_intermediate: int = 256
    max_positions: int = 256
    # std 0.02 leaves the models on a long accuracy plateau; 0.06 trains reliably.
    initializer_range: float = 0.06
    seed: int = 0

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def vision_settings(self) -> dict[str, Any]:
        """Hugging Face config arguments of the vision tower, as every toy family names them."""
        return dict(
            hidden_size=self.vision_hidden,
            num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_heads,
            intermediate_size=self.vision_intermediate,
            image_size=self.image_size,
            patch_size=self.patch_size,
            # explicit: a vision config's own default may be 1e-10 (position and class embeddings)
            initializer_range=self.initializer_range,
        )

    def text_settings(self) -> dict[str, Any]:
        """Hugging Face config arguments of the text stream, as every toy family names them."""
        return dict(
            hidden_size=self.text_hidden,
            num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads,
            intermediate_size=self.text_intermediate,
            max_position_embeddings=self.max_positions,
            initializer_range=self.initializer_range,
        )

    def check(self) -> None:
        """Raise ValueError naming the setting when the widths, heads or patches do not fit together."""
        divides = [
            ("patch_size", self.patch_size, "image_size", self.image_size),
            ("vision_heads", self.vision_heads, "vision_hidden", self.vision_hidden),
            ("text_heads", self.text_heads, "text_hidden", self.text_hidden),
            ("text_kv_heads", self.text_kv_heads, "text_heads", self.text_heads),
        ]
        for name, value, of_name, of_value in divides:
            if of_value % value:
                raise ValueError(f"toy model: {name}={value} must divide {of_name}={of_value}")


@dataclass
class TrainConfig:
    """Optimisation recipe (docs/toy_models.md).

    `steps=None` takes the family's measured default (`ToyFamily.default_steps`).
    """

    steps: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.05
    warmup_steps: int = 100
    grad_clip: float = 1.0
    shape_fraction: float = 0.75  # shape is the harder task
    n_train_images: int = 20_000  # rendered once, asked fresh questions at every draw
    n_eval_images: int = 2_000
    log_every: int = 100


# Workflow `train` keys that are not ToyModelConfig / TrainConfig fields (image_size is the dataset's).
WORKFLOW_TRAIN_KEYS = ("family", "dataset")


def configs_from_settings(settings: Mapping[str, Any], image_size: int) -> tuple[ToyModelConfig, TrainConfig]:
    """Architecture and recipe from a workflow `models.<name>.train` section (validated by the schema)."""
    architecture = {f.name for f in fields(ToyModelConfig)} - {"image_size", "seed"}
    recipe = {f.name for f in fields(TrainConfig)}
    unknown = set(settings) - architecture - recipe - {"seed", *WORKFLOW_TRAIN_KEYS}
    if unknown:
        raise ValueError(f"toy model: unknown keys {sorted(unknown)}")
    model_cfg = ToyModelConfig(
        image_size=image_size,
        seed=int(settings.get("seed", 0)),
        **{k: v for k, v in settings.items() if k in architecture},
    )
    model_cfg.check()
    return model_cfg, TrainConfig(**{k: v for k, v in settings.items() if k in recipe})
