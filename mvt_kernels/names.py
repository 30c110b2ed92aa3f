"""Who the 2D-RoPE op is, in every runtime: the one place its names are spelled.

    torch        torch.ops.mvt.rope2d          TORCH_NAMESPACE::TORCH_NAME  (mvt_kernels/torch_op.py)
    ONNX         node domain "mvt", op_type "RoPE2D", version 1 (+ model-local function body)
    TensorRT     plugin "mvt::RoPE2D": the ONNX op type is the plugin name and the node carries
                 plugin_namespace="mvt" (TensorRT's parser looks the plugin up by both)

The exporter (export/graph/rope_node.py), the lowerings (export/graph/lowering.py), the torch op and the
TensorRT plugin (mvt_kernels/) import these names. Plain strings only: mvt_kernels/ and the CLIs import
this module without torch, onnx or TensorRT.
"""

from __future__ import annotations

# ONNX node and its model-local function: mvt.RoPE2D, opset version 1
DOMAIN = "mvt"
OP_TYPE = "RoPE2D"
VERSION = 1

# torch custom op: torch.ops.mvt.rope2d
TORCH_NAMESPACE = "mvt"
TORCH_NAME = "rope2d"
TORCH_OP = f"{TORCH_NAMESPACE}::{TORCH_NAME}"

# TensorRT plugin: registered as mvt::RoPE2D; the plugin lowering's node has op_type = PLUGIN_NAME
# and the attribute plugin_namespace = PLUGIN_NAMESPACE.
PLUGIN_NAME = OP_TYPE
PLUGIN_NAMESPACE = DOMAIN
PLUGIN_VERSION = "1"  # tensorrt.plugin registers quickly-deployable plugins as version "1"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
