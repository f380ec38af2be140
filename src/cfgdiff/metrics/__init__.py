"""Measuring generated images: a feature classifier trained on the real data, and class accuracy."""
