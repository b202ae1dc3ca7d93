"""What every stage shares: the params (``config``), where files live (``paths``), the
run context a flow hands its stages (``run_context``), MLflow (``tracking``), DVC
(``dvc``), the pipeline lock (``lock``), the processes a run owns (``processes``), what a
dead run left (``recovery``), saved model files (``model_files``), stage entry helpers
(``stage_cli``, ``errors``) and the results table (``tables``). Nothing here imports a stage or a
concern package above it (the import contract in ``.importlinter`` enforces it)."""
