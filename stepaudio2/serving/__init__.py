"""Serving side of the core: the Triton launcher and helpers shared by the model.py adapters."""
