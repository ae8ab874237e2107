"""The training engine: ``train(TrainConfig) -> metrics`` and the pieces a run's output folder is made of."""

from heartlora.engine.settings import PROFILES, PROTOCOLS, TrainConfig, default_out, resolve
from heartlora.engine.inference import classify, collect_images, load_trained, read_run_info
from heartlora.engine.training_methods import METHODS, TrainingMethod, get_method, register_method
from heartlora.engine.metrics import accuracy, read_metrics
from heartlora.engine.trainer import train

__all__ = ["METHODS", "PROFILES", "PROTOCOLS", "TrainConfig", "TrainingMethod", "accuracy", "classify",
           "collect_images", "default_out", "get_method", "load_trained", "read_metrics", "read_run_info",
           "register_method", "resolve", "train"]
