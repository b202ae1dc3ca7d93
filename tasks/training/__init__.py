"""Training on the Horovod loop: the fit job and loop (rank-aware), checkpoints and resume,
and the launcher that starts the workers (``horovodrun``). The train stage and the
compression methods that train (distillation) use it."""
