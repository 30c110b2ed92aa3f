"""PyTorch: the unpatched transformers encoder, the parity reference."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from export.core.interface import INPUT_NAME
from export.runners.base import Runner


class TorchRunner(Runner):
    """The unpatched transformers encoder (export.graph.trace.encoder_module), fp32 eval, no grad."""

    def __init__(self, checkpoint, shape=None, output_names: Iterable[str] | None = None):
        from export.graph.trace import ExportShape

        self.checkpoint = checkpoint
        self.shape = shape or ExportShape(*checkpoint.image_size)
        self.module_outputs = checkpoint.family.output_names(self.shape.hidden_layer)  # what the module returns
        super().__init__(f"torch ({checkpoint.source or 'demo'})", output_names or self.module_outputs)
        self._module: Any = None

    def activate_impl(self) -> None:
        from export.graph.trace import encoder_module

        self._module = encoder_module(self.checkpoint, self.shape)

    def infer_impl(self, feed):
        import torch

        x = torch.from_numpy(np.ascontiguousarray(feed[INPUT_NAME], np.float32))  # (B, 3, H, W)
        with torch.no_grad():
            values = self._module(x)
        out = {name: v.numpy() for name, v in zip(self.module_outputs, values)}
        assert self.output_names is not None  # always given: the shape's outputs by default
        return {name: out[name] for name in self.output_names}

    def deactivate_impl(self) -> None:
        self._module = None
