"""Fused 2D-RoPE in OpenAI Triton: the rotation of q (and k) in one pass over memory.

Numerics match mvt_kernels/reference.py: x is read in its dtype (fp32/fp16/bf16), rotated in fp32
with the fp32 half tables, and written back in x's dtype.

Layout (rotate-half, non-interleaved), per head vector of D elements, c/s = cos/sin[token]:

    x = [ x1 (D/2) | x2 (D/2) ]        y = [ x1*c - x2*s | x2*c + x1*s ]
          lanes j    lanes HALF + j          interleaved pairs (x0, x1), (x2, x3) are NOT this

`rope2d_kernel` is the single-tensor form the TensorRT plugin compiles ahead of time (its
arguments are ordered inputs, scalars, outputs: mvt_kernels/launch.py KERNEL_ARGS).
`rope2d_qk_kernel` rotates q and k in the same program, loading each cos/sin tile once.
Tiles and grid: mvt_kernels/launch.py. A non-power-of-two D/2 (bigG: D=104, D/2=52) is masked.

On a CPU the kernels run under TRITON_INTERPRET=1 (set before triton is first imported).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mvt_kernels.launch import block_config, launch_grid, scalar_args


@triton.jit
def _rotate_rows(
    src_ptr,  # *T     input, row `src_rows[i]` starts at element src_rows[i] * D
    dst_ptr,  # *T     output, row `dst_rows[i]` starts at element dst_rows[i] * D
    src_rows,  # (BLOCK_R, 1) int64 input row index (units of D elements)
    dst_rows,  # (BLOCK_R, 1) int64 output row index
    lanes,  # (1, BLOCK_HALF) int32 lane j of the first half
    mask,  # (BLOCK_R, BLOCK_HALF) rows in range and j < HALF
    c,  # (BLOCK_R, BLOCK_HALF) fp32 cos of each row's token
    s,  # (BLOCK_R, BLOCK_HALF) fp32 sin
    HALF: tl.constexpr,
):
    src = src_rows * (2 * HALF) + lanes  # (BLOCK_R, BLOCK_HALF) offsets of x1; x2 at +HALF
    x1 = tl.load(src_ptr + src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src_ptr + src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = dst_rows * (2 * HALF) + lanes
    out_ty = dst_ptr.dtype.element_ty
    tl.store(dst_ptr + dst, (x1 * c - x2 * s).to(out_ty), mask=mask)  # y1 = x1*c - x2*s
    tl.store(dst_ptr + dst + HALF, (x2 * c + x1 * s).to(out_ty), mask=mask)  # y2 = x2*c + x1*s


@triton.jit
def _tile_indices(seq, heads, row_stride_b, row_stride_s, BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  HALF: tl.constexpr):
    """Rows of program (program_id(0), program_id(1) = image b) and their table offsets."""
    b = tl.program_id(1).to(tl.int64)  # image index; int64 so b * stride never overflows
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,) row within the image
    token = r // heads  # (BLOCK_R,) token t of the row
    head = r - token * heads  # (BLOCK_R,) head h of the row
    lanes = tl.arange(0, BLOCK_HALF)[None, :]  # (1, BLOCK_HALF)
    mask = (r < seq * heads)[:, None] & (lanes < HALF)  # (BLOCK_R, BLOCK_HALF)
    src_rows = (b * row_stride_b + token * row_stride_s + head)[:, None]  # (BLOCK_R, 1) strided input
    dst_rows = (b * seq * heads + r)[:, None]  # (BLOCK_R, 1) contiguous output [B, S, H, D]
    table = token[:, None] * HALF + lanes  # (BLOCK_R, BLOCK_HALF) offsets into cos/sin [S, D/2]
    return src_rows, dst_rows, lanes, mask, table


@triton.jit
def rope2d_kernel(
    x_ptr,  # *T    x [B, S, H, D] (T = fp32 | fp16 | bf16); heads and D contiguous, rows strided
    cos_ptr,  # *fp32 cos [S, D/2], contiguous
    sin_ptr,  # *fp32 sin [S, D/2], contiguous
    seq,  # i32 S
    heads,  # i32 H
    row_stride_b,  # i32 stride of x over the batch, in rows of D elements (S*H when contiguous)
    row_stride_s,  # i32 stride of x over tokens, in rows of D elements (H when contiguous)
    y_ptr,  # *T    y [B, S, H, D], contiguous
    HALF: tl.constexpr,  # D/2
    BLOCK_R: tl.constexpr,  # rows (token, head) per program
    BLOCK_HALF: tl.constexpr,  # next power of two >= D/2
):
    src_rows, dst_rows, lanes, mask, table = _tile_indices(seq, heads, row_stride_b, row_stride_s,
                                                           BLOCK_R, BLOCK_HALF, HALF)
    c = tl.load(cos_ptr + table, mask=mask, other=0.0)  # (BLOCK_R, BLOCK_HALF) fp32
    s = tl.load(sin_ptr + table, mask=mask, other=0.0)
    _rotate_rows(x_ptr, y_ptr, src_rows, dst_rows, lanes, mask, c, s, HALF)


@triton.jit
def rope2d_qk_kernel(
    q_ptr,  # *T    q [B, S, H, D]; heads and D contiguous, rows strided
    k_ptr,  # *T    k [B, S, H, D]; same strides as q
    cos_ptr,  # *fp32 cos [S, D/2], contiguous
    sin_ptr,  # *fp32 sin [S, D/2], contiguous
    seq,  # i32 S
    heads,  # i32 H
    row_stride_b,  # i32 stride of q and k over the batch, in rows of D elements
    row_stride_s,  # i32 stride of q and k over tokens, in rows of D elements
    qo_ptr,  # *T    rotated q [B, S, H, D], contiguous
    ko_ptr,  # *T    rotated k [B, S, H, D], contiguous
    HALF: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    src_rows, dst_rows, lanes, mask, table = _tile_indices(seq, heads, row_stride_b, row_stride_s,
                                                           BLOCK_R, BLOCK_HALF, HALF)
    c = tl.load(cos_ptr + table, mask=mask, other=0.0)  # loaded once, used for q and k
    s = tl.load(sin_ptr + table, mask=mask, other=0.0)
    _rotate_rows(q_ptr, qo_ptr, src_rows, dst_rows, lanes, mask, c, s, HALF)
    _rotate_rows(k_ptr, ko_ptr, src_rows, dst_rows, lanes, mask, c, s, HALF)


# ----------------------------------------------------------------------------------------------
# torch launchers


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_device(x: torch.Tensor) -> None:
    if x.device.type == "cpu" and not interpreter_active():
        raise RuntimeError(
            "rope2d(impl='triton') got a CPU tensor: Triton runs on CUDA, or on the CPU only under "
            "TRITON_INTERPRET=1 set before triton is imported; use impl='torch' (or 'auto') on a CPU"
        )


def _row_strides(x: torch.Tensor) -> tuple[int, int] | None:
    """(row_stride_b, row_stride_s) of x [B, S, H, D] in rows, or None if x needs a copy.

    The kernel needs the last two dims packed (stride (D, 1)) and the outer strides to be
    multiples of D: then every row starts at a multiple of D elements, which lets Triton
    vectorise (x1 at row*D, x2 at row*D + D/2). Pointer alignment needs no check here: the JIT
    specialises on it at launch.
    """
    _, _, heads, dim = x.shape
    sb, ss, sh, sd = x.stride()
    if sd != 1 or (sh != dim and heads > 1) or sb % dim or ss % dim:
        return None
    return sb // dim, ss // dim


def _prepare(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    strides = _row_strides(x)
    if strides is None:
        # torch calls a tensor contiguous whatever the strides of its size-1 dims; a fresh copy has
        # the standard ones.
        x = x.clone(memory_format=torch.contiguous_format) if x.is_contiguous() else x.contiguous()
        strides = _row_strides(x)
        assert strides is not None  # standard strides always qualify
    return x, strides


def _tables(cos: torch.Tensor, sin: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    cos = cos.to(device=device, dtype=torch.float32).contiguous()  # (S, D/2)
    sin = sin.to(device=device, dtype=torch.float32).contiguous()
    return cos, sin


def _check_int32(x: torch.Tensor, row_stride_b: int) -> None:
    batch, seq, heads, dim = x.shape
    if max(row_stride_b, seq * heads) * dim >= 2**31 or batch >= 65536:
        raise ValueError(f"rope2d: x {tuple(x.shape)} exceeds the kernel's limits "
                         "(one image's rows * D < 2**31 elements, batch < 65536); split the batch")


def rope2d_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                  block_rows: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Rotate x [B, S, H, D] with the Triton kernel on x's device; returns a new contiguous tensor."""
    _check_device(x)
    batch, seq, heads, dim = x.shape
    x, (rsb, rss) = _prepare(x)
    _check_int32(x, rsb)
    cos, sin = _tables(cos, sin, x.device)
    cfg = block_config(dim, block_rows, num_warps)
    y = torch.empty((batch, seq, heads, dim), dtype=x.dtype, device=x.device)  # (B, S, H, D)
    if y.numel() == 0:
        return y
    grid = launch_grid(batch, seq, heads, cfg.block_rows)
    rope2d_kernel[grid](x, cos, sin, *scalar_args(seq, heads, rsb, rss), y,
                        **cfg.constexprs(), num_warps=cfg.num_warps)
    return y


def rope2d_qk_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                     block_rows: int | None = None, num_warps: int | None = None):
    """Rotate q and k [B, S, H, D] in one launch; returns (q_rot, k_rot), new contiguous tensors."""
    _check_device(q)
    if q.shape != k.shape or q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"rope2d_qk: q and k must match in shape, dtype and device; got "
                         f"{tuple(q.shape)} {q.dtype} {q.device} and {tuple(k.shape)} {k.dtype} {k.device}")
    batch, seq, heads, dim = q.shape
    q, q_strides = _prepare(q)
    k, k_strides = _prepare(k)
    if q_strides != k_strides:  # one stride pair is passed for both: make both contiguous
        q, q_strides = _prepare(q.contiguous())
        k, k_strides = _prepare(k.contiguous())
    rsb, rss = q_strides
    _check_int32(q, rsb)
    cos, sin = _tables(cos, sin, q.device)
    cfg = block_config(dim, block_rows, num_warps)
    qo = torch.empty((batch, seq, heads, dim), dtype=q.dtype, device=q.device)  # (B, S, H, D)
    ko = torch.empty_like(qo)
    if qo.numel() == 0:
        return qo, ko
    grid = launch_grid(batch, seq, heads, cfg.block_rows)
    rope2d_qk_kernel[grid](q, k, cos, sin, *scalar_args(seq, heads, rsb, rss), qo, ko,
                           **cfg.constexprs(), num_warps=cfg.num_warps)
    return qo, ko
