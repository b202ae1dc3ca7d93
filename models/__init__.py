"""PyTorch architectures and the factory that builds them.

Nothing here does I/O or knows about Prefect, MLflow, DVC or Horovod: a model is a
pure function of its settings (:class:`models.spec.ModelSpec`), the input shape and the
number of classes (:func:`models.factory.build_model`). ``models.spec`` imports no
torch, so the params loader uses it; this package imports nothing itself, so code that
needs only the settings does not depend on the architectures.
"""
