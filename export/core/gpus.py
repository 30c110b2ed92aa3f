"""Datasheet peaks of NVIDIA GPUs, looked up by the exact product name the driver reports.

`torch.cuda.get_device_name()` and `nvidia-smi --query-gpu=name` both return cuDeviceGetName's string:
"NVIDIA H100 PCIe", "NVIDIA H100 80GB HBM3" (the SXM5 board), "NVIDIA H100 NVL", "NVIDIA GH200 480GB",
"NVIDIA A100-SXM4-80GB", ... One family name covers boards with different memory (H100 PCIe 2.0 TB/s, SXM
3.35, NVL 3.9) and one name contains another ("GH200" contains "H200", "L40S" contains "L4"), so a name
matches whole (case and repeated spaces aside), never by substring. A name not listed here (a new board, a
MIG slice "... MIG 1g.10gb") has no peak: a check then reports its measurement without a verdict.

Standard library only: scripts/gpu_check.py imports it on a bare GPU machine.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuPeaks:
    memory_tbs: float  # DRAM bandwidth, TB/s (HBM; GDDR6 on L40S/L4/A10/T4/RTX)
    fp16_tflops: float  # dense fp16 tensor-core TFLOPS (without 2:4 sparsity)


# Figures from NVIDIA's datasheets: H100 (SXM 3.35 TB/s, NVL 3.9; the H100 PCIe product brief PB-11133-001_v02:
# 2.0), H200 (SXM and NVL 4.8), GH200 (96 GB HBM3 4.0 TB/s; 144 GB HBM3e 4.9), A100 (...-1758950-r4: 40GB 1,555
# GB/s, 80GB PCIe 1,935, 80GB SXM 2,039), L40S (864 GB/s), L4 (300 GB/s), HGX B200 (8 TB/s per GPU). fp16: the
# sparse figure / 2 (H100 SXM 1,979 -> 989.4; PCIe 1,513 -> 756; NVL and H200 NVL 1,671 -> 835).
# Keys are the names without the "NVIDIA " prefix; lookups normalize the same way (_key).
_PEAKS = {
    "H100 80GB HBM3": GpuPeaks(3.35, 989.4),  # the SXM5 board
    "H100 PCIe": GpuPeaks(2.0, 756.0),
    "H100 NVL": GpuPeaks(3.9, 835.0),
    "H800": GpuPeaks(3.35, 989.4),  # SXM
    "H800 PCIe": GpuPeaks(2.0, 756.0),
    "H20": GpuPeaks(4.0, 148.0),
    "H200": GpuPeaks(4.8, 989.4),  # SXM, 141 GB HBM3e
    "H200 NVL": GpuPeaks(4.8, 835.0),
    "GH200 480GB": GpuPeaks(4.0, 989.4),  # 96 GB HBM3 (480 GB is the Grace CPU's LPDDR5X)
    "GH200 120GB": GpuPeaks(4.0, 989.4),  # 96 GB HBM3, 120 GB LPDDR5X
    "GH200 144G HBM3e": GpuPeaks(4.9, 989.4),
    "A100-SXM4-40GB": GpuPeaks(1.555, 312.0),
    "A100-SXM4-80GB": GpuPeaks(2.039, 312.0),
    "A100-PCIE-40GB": GpuPeaks(1.555, 312.0),
    "A100 80GB PCIe": GpuPeaks(1.935, 312.0),
    "B200": GpuPeaks(8.0, 2250.0),
    "L40S": GpuPeaks(0.864, 362.0),
    "L4": GpuPeaks(0.3, 121.0),
    "A10": GpuPeaks(0.6, 125.0),
    "Tesla T4": GpuPeaks(0.32, 65.0),
    "GeForce RTX 4090": GpuPeaks(1.008, 165.0),
    "RTX 6000 Ada Generation": GpuPeaks(0.96, 364.0),
}


def _key(name: str) -> str:
    key = " ".join(name.split()).lower()
    return key.removeprefix("nvidia ")


GPU_PEAKS: dict[str, GpuPeaks] = {_key(name): peaks for name, peaks in _PEAKS.items()}


def gpu_peaks(name: str | None) -> GpuPeaks | None:
    """The datasheet peaks of the GPU named `name` exactly as the driver reports it; None when unknown."""
    if not name:
        return None
    return GPU_PEAKS.get(_key(name))
