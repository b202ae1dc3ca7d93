"""Evaluation: measuring models, the gate and the champion, the outputs and the registry.

Measuring: ``measure`` (loading, quality), ``flops``, ``timing``, ``energy``, ``memory``
(a fresh process per model), ``benchmark`` (every model alike, into ``results``).
Deciding: ``gate``. Publishing: ``outputs`` (files), ``plots``, ``report``, ``summary``
(rows for the shared table renderer), ``runs`` (MLflow), ``promotion`` and ``pyfunc``
(the model registry). The stage entry :mod:`tasks.evaluate` strings them together.
"""
