"""Launch geometry of the 2D-RoPE kernel, in plain Python: one place for every launcher.

The torch launcher (mvt_kernels/rope_triton.py), the ahead-of-time PTX launcher of the GPU check (the CUDA
driver, in scripts/gpu_check.py) and the TensorRT plugin (mvt_kernels/trt_plugin.py) all take the tile size,
grid and scalar arguments from here, so the three cannot drift apart. Nothing here imports torch or triton.

Work decomposition, for x [B, S, H, D] viewed as B images of S*H "rows" (one row = one head
vector of D elements, split into halves x1 | x2 of D/2 each):

    program (i, b) rotates rows [i*BLOCK_R, (i+1)*BLOCK_R) of image b:

        image b:  row 0 .. S*H-1  (row r = token r // H, head r % H)
                  +-----------------------------+
        i = 0     | BLOCK_R rows x BLOCK_HALF   |  x1 tile and x2 tile, cos/sin rows of their tokens
        i = 1     | ...                         |
                  +-----------------------------+
    grid = (cdiv(S*H, BLOCK_R), B, 1)

Batch only enters through the grid (axis 1) and the batch stride, so one compiled kernel serves
every batch size and the TensorRT plugin's PTX does not depend on the optimisation profile.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

# Elements of one half tile (BLOCK_R x BLOCK_HALF). 2048 fp32 values per operand keeps registers
# (x1, x2, cos, sin tiles) at 16 per thread with 4 warps. Tuned by scripts/gpu_check.py --sweep.
TILE_ELEMENTS = 2048
NUM_WARPS = 4

# Names of the kernel arguments, in the order TensorRT's AOT plugin passes them:
# inputs, then the extra scalar arguments, then outputs (TensorRT's quickly_deployable_plugins
# sample, oait_kernels.py: "extra scalar args in between input and output tensors").
POINTER_INPUTS = ("x_ptr", "cos_ptr", "sin_ptr")
SCALAR_ARGS = ("seq", "heads", "row_stride_b", "row_stride_s")
POINTER_OUTPUTS = ("y_ptr",)
KERNEL_ARGS = POINTER_INPUTS + SCALAR_ARGS + POINTER_OUTPUTS


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class BlockConfig:
    """Compile-time shape of one program: BLOCK_R rows by BLOCK_HALF half-dim lanes."""

    head_dim: int  # D
    block_rows: int  # BLOCK_R (power of two)
    block_half: int  # BLOCK_HALF = next power of two >= D/2 (masked when D/2 is not one)
    num_warps: int

    @property
    def half(self) -> int:
        return self.head_dim // 2

    def constexprs(self) -> dict[str, int]:
        return {"HALF": self.half, "BLOCK_R": self.block_rows, "BLOCK_HALF": self.block_half}


def block_config(head_dim: int, block_rows: int | None = None, num_warps: int | None = None) -> BlockConfig:
    """The tile for head dim D. `block_rows`/`num_warps` override the defaults (tests, tuning)."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rope2d: head dim D={head_dim} must be a positive even number")
    block_half = next_power_of_2(head_dim // 2)
    if block_rows is None:
        block_rows = max(1, TILE_ELEMENTS // block_half)
    if block_rows & (block_rows - 1):
        raise ValueError(f"rope2d: block_rows={block_rows} must be a power of two (Triton tiles are)")
    return BlockConfig(head_dim, block_rows, block_half, num_warps or NUM_WARPS)


def launch_grid(batch, seq, heads, block_rows: int, ceil_div: Callable = cdiv):
    """(grid_x, grid_y, grid_z) = (cdiv(S*H, BLOCK_R), B, 1).

    Works on ints and on TensorRT's symbolic shape expressions alike: the plugin passes
    `tensorrt.plugin.cdiv` as `ceil_div` and `x.shape_expr[i]` as the sizes.
    """
    return ceil_div(seq * heads, block_rows), batch, 1


def scalar_args(seq, heads, row_stride_b=None, row_stride_s=None):
    """The kernel's scalar arguments (SCALAR_ARGS order) for x [B, S, H, D].

    Strides are in units of rows (D elements): a contiguous x has row_stride_b = S*H and
    row_stride_s = H; a q or k view of a fused qkv tensor [B, S, 3, H, D] has 3*S*H and 3*H.
    Ints or symbolic expressions.
    """
    if row_stride_b is None:
        row_stride_b = seq * heads
    if row_stride_s is None:
        row_stride_s = heads
    return seq, heads, row_stride_b, row_stride_s


def threads_per_block(num_warps: int, warp_size: int = 32) -> int:
    """block_x of the launch: Triton kernels run num_warps warps (the PTX says `.reqntid`)."""
    return num_warps * warp_size


def triton_available() -> bool:
    """OpenAI Triton is installed (found, not imported: importing it is slow and needs a driver)."""
    return importlib.util.find_spec("triton") is not None
