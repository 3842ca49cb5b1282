"""Pretraining: typed recipes (recipe.py), AdamW + the paper's schedules (optim.py), atomic
resumable checkpoints (checkpoint.py), metrics and plots (metrics.py), the loop (trainer.py) and
the `deepseekmoe train` command (cli.py)."""

from deepseekmoe.train.recipe import TrainConfig, build
from deepseekmoe.train.trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "build", "train"]
