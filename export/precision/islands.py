"""The fp32 island policy: op types that stay in float32 inside an fp16 or int8 graph, and why.

Naive fp16 ViT engines lose accuracy here (cosine 0.14 against PyTorch is reported in
TensorRT-LLM's issues; LayerNorm overflow is the usual cause).
"""

from mvt_kernels.names import OP_TYPE as ROPE_OP_TYPE

FP32_ISLANDS: dict[str, str] = {
    "LayerNormalization": "mean/variance of wide activations overflow or lose precision in fp16",
    "Softmax": "exp() of attention logits overflows fp16; sums need fp32",
    ROPE_OP_TYPE: "rotation angles up to ~grid size: fp16 cos/sin tables lose the phase",
    "RotaryEmbedding": "same rotation as the RoPE op, standard op",
    "ReduceMean": "LayerNorm pieces when a runtime decomposes it",
    "Pow": "LayerNorm pieces when a runtime decomposes it",
    "Sqrt": "LayerNorm pieces when a runtime decomposes it",
    # In-graph RoPE tables (--dynamic-resolution): positions x frequencies, then cos/sin.
    "Range": "positions for the RoPE tables",
    "Cos": "RoPE tables",
    "Sin": "RoPE tables",
}

FP16_MAX = 65504.0
# A tensor whose largest |value| on the calibration images exceeds FP16_MAX / HEADROOM keeps its
# producer in fp32: unseen images can push activations a few times past what calibration saw.
HEADROOM = 4.0
