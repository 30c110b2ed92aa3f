"""The tensors of a model in the repository (TensorSpec, EncoderInterface) and its warm-up request (Warmup).

Plain data: config.py turns it into protobuf, resolve.py and modes.py derive it from the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[int, ...]  # without the batch dimension; -1 = any
    dtype: str = "TYPE_FP32"


@dataclass(frozen=True)
class EncoderInterface:
    """What the encoder takes and gives, from the artifacts' manifest."""

    input: TensorSpec
    outputs: tuple[TensorSpec, ...]
    image_size: tuple[int, int]  # the resolution warm-up and preprocessing produce

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)


@dataclass(frozen=True)
class Warmup:
    """One warm-up request: a file under <model>/warmup/ per input (Triton reads raw bytes)."""

    name: str
    batch_size: int
    inputs: dict[str, tuple[str, tuple[int, ...], str]] = field(default_factory=dict)  # name -> (dtype, dims, file)
