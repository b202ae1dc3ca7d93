"""Evaluation: measuring models, the gate and the champion, the outputs and the registry.

Measuring: ``measure`` (loading, quality), ``flops``, ``timing`` (and energy, with :mod:`tasks.core.energy`), ``memory``
(a child forked per model from one probe process), ``benchmark`` (every model alike, into ``results``).
Deciding: ``gate`` (within one run), ``challenge`` (the gate's winner against the current
champion). Publishing: ``outputs`` (files), ``plots``, ``report``, ``summary`` (rows for
the shared table renderer), ``runs`` (MLflow). The registry: ``registration`` (the stage's
registry step), ``promotion`` (versions, alias, rollback), ``pyfunc`` and
``champion_model`` (the served model, logged as code), ``signature`` (its input contract).
The stage entry :mod:`tasks.evaluate` strings them together.
"""
