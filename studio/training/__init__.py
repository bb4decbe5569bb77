"""Adapter training from reference folders: datasets, objectives, the trainer loop, batches."""

from studio.training.trainer import TrainConfig, train

__all__ = ["TrainConfig", "train"]
