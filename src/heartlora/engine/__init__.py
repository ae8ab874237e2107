"""The training engine: ``train(TrainConfig) -> metrics`` and the pieces a run's output folder is made of."""

from heartlora.engine.inference import classify, collect_images, load_trained, read_run_info
from heartlora.engine.metrics import accuracy, read_metrics
from heartlora.engine.trainer import METHODS, PROFILES, PROTOCOLS, TrainConfig, default_out, resolve, train

__all__ = ["METHODS", "PROFILES", "PROTOCOLS", "TrainConfig", "accuracy", "classify", "collect_images",
           "default_out", "load_trained", "read_metrics", "read_run_info", "resolve", "train"]
