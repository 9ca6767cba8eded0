"""Scaler Wizard: grow trained transformer language models without losing what they know."""

__version__ = "0.1.0"
