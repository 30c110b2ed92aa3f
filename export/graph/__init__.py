"""ONNX graph work: tracing, the RoPE2D node and its lowerings."""
