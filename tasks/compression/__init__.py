"""Model compression: pruning, quantization, distillation and their combinations.

``recipes`` checks the recipes in ``params.yaml`` (no torch import); the other modules do
the work, each with the library made for it: ``pruning`` (torch.nn.utils.prune,
torch-pruning), ``quantization`` (ONNX Runtime, torch.ao), ``distillation`` (the Horovod
training loop with a teacher), and ``formats`` (the files variants ship as, and their
loaders). ``tasks/compress.py`` is the stage that runs them.
"""
