"""PyTorch architectures and the registry that builds them.

Nothing here does I/O or knows about Prefect, MLflow, DVC or Horovod: a model is a
pure function of its :class:`ModelSpec`, the input shape and the number of classes.
"""

from models.registry import MODEL_FAMILIES, ModelSpec, build_model, count_parameters

__all__ = ["MODEL_FAMILIES", "ModelSpec", "build_model", "count_parameters"]
