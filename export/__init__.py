"""mvt-deploy export stage: MLCD/RICE checkpoints to ONNX (custom 2D-RoPE op), lowerings, parity.

Importing this package loads nothing heavy; torch, onnx and TensorRT are imported on use.
"""

__version__ = "0.1.0"
