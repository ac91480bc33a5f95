"""Student training: SFT and knowledge-distillation recipes, losses, student initialisation, checkpoints.

    from distillgate.train import load_config, run_recipe
    result = run_recipe(load_config("train.yaml", ["epochs=2"]))
"""

from __future__ import annotations

from distillgate.train.config import TrainConfig, load_config, parse_config
from distillgate.train.loop import TrainResult
from distillgate.train.rows import load_rows


def run_recipe(config: TrainConfig) -> TrainResult:
    """Run the recipe the config names (``sft`` or ``kd``) for the student's family."""
    if config.student.family == "encoder":
        from distillgate.train.recipes import encoder

        return encoder.run(config)
    if config.recipe == "sft":
        from distillgate.train.recipes import sft

        return sft.run(config)
    from distillgate.train.recipes import kd

    return kd.run(config)


__all__ = ["TrainConfig", "TrainResult", "load_config", "load_rows", "parse_config", "run_recipe"]
