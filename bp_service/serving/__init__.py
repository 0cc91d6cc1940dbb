"""Serving a trained model: ``bp-predict`` over CSV files and the MLflow pyfunc model (no Lightning, no Hydra)."""
