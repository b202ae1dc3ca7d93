"""Model compression: pruning, quantization, distillation and their combinations.

Imports go one way, top to bottom (no module imports one above it):

    variants.py      every variant of compress.variants: made, written, checked, tracked, summarized
    build.py         one variant's steps applied in order to its parent
    searched.py      the steps with an ``auto`` knob: trials, decided by search.py, recorded
    work.py          what every variant's steps share (data, settings, exports, curves, trials)
    recipes.py       full recipes and the model-family rules; check_pipeline (no torch)
    loading.py       load_model_dir: any model folder, baseline or variant
    formats.py       the files variants ship as: writers (Artifact) and loaders
    distillation.py  a student trained from a teacher on the Horovod loop
    pruning.py       torch.nn.utils.prune, torch-pruning (the masks fine-tuning holds)
    quantization.py  ONNX Runtime and torch.ao int8 (QAT: converts what the loop trained)
    fine_tuning.py   a variant's training steps as Horovod fit jobs (tasks.training): folders, resume
    onnx.py          the fp32 ONNX export and the one ONNX Runtime session builder
    candidate.py     the eager model between steps, the shared training data
    weights.py       helpers on weights (prunable weights, sparsity, state-dict mapping, counts)

``tasks/compress.py`` is the stage that runs them; the per-method settings are typed in
:mod:`tasks.core.compress_params`.
"""
