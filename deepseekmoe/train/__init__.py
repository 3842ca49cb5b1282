"""Pretraining and fine-tuning: typed recipes (recipe.py), AdamW + the paper's schedules and cosine /
warmup-stable-decay (optim.py), the pretraining inputs (pretrain.py), metrics and plots (metrics.py),
one step's forward and backward (step.py), the loop (trainer.py), supervised fine-tuning on that loop
(sft.py: full or LoRA, from a base model, on chat records) and the `deepseekmoe train` / `sft`
commands (cli.py). Checkpoints are deepseekmoe.checkpoint.training's."""

from deepseekmoe.train.recipe import TrainConfig, build
from deepseekmoe.train.trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "build", "train"]
