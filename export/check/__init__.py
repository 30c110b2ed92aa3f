"""Measuring: parity against PyTorch, feature maps, plots."""
