"""Evaluation: measuring models (accuracy, size, latency, memory, energy), the gate and
the champion, the outputs (metrics, plots, report) and the MLflow registry."""
