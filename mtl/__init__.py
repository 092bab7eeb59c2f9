"""Multi-task learning library in plain PyTorch (no Ray, no MLflow): feature inputs,
architectures, task-balancing strategies, metrics and score fusion."""

__version__ = "0.1.0"
