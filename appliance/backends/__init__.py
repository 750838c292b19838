"""Inference backends behind the `InferenceBackend` protocol (see base.py)."""
