"""Numeric parity against the PyTorch reference (transformers MLCDVisionModel / CLIPVisionModel).

`python -m pytest parity_tests` runs the suite; tiny_models.py builds the tiny checkpoints it uses.
"""
