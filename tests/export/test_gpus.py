"""GPU datasheet peaks by exact product name (export/core/gpus.py): boards of one family differ, and one name
contains another, so nothing matches by substring."""

from __future__ import annotations

import pytest

from export.core.gpus import GPU_PEAKS, gpu_peaks


@pytest.mark.parametrize("name, memory_tbs, fp16_tflops", [
    ("NVIDIA H100 PCIe", 2.0, 756.0),
    ("NVIDIA H100 80GB HBM3", 3.35, 989.4),  # the SXM5 board's name
    ("NVIDIA H100 NVL", 3.9, 835.0),
    ("NVIDIA H200", 4.8, 989.4),
    ("NVIDIA H200 NVL", 4.8, 835.0),
    ("NVIDIA GH200 480GB", 4.0, 989.4),  # 96 GB HBM3, not an H200
    ("NVIDIA GH200 144G HBM3e", 4.9, 989.4),
    ("NVIDIA A100-SXM4-40GB", 1.555, 312.0),
    ("NVIDIA A100-SXM4-80GB", 2.039, 312.0),
    ("NVIDIA A100-PCIE-40GB", 1.555, 312.0),
    ("NVIDIA A100 80GB PCIe", 1.935, 312.0),
    ("NVIDIA L40S", 0.864, 362.0),
    ("NVIDIA L4", 0.3, 121.0),
    ("NVIDIA B200", 8.0, 2250.0),
])
def test_each_board_gets_its_own_datasheet_figures(name, memory_tbs, fp16_tflops):
    peaks = gpu_peaks(name)
    assert peaks is not None, name
    assert (peaks.memory_tbs, peaks.fp16_tflops) == (memory_tbs, fp16_tflops)


def test_the_names_are_matched_whole_not_by_substring():
    # each of these contains a listed name, and none is that board
    for name in ("NVIDIA H100", "NVIDIA GH200", "NVIDIA L40", "NVIDIA A10G", "NVIDIA H100 80GB HBM3 MIG 1g.10gb",
                 "NVIDIA H200 NVL 141GB", "NVIDIA B200A"):
        assert gpu_peaks(name) is None, name
    assert gpu_peaks("NVIDIA GH200 480GB") != gpu_peaks("NVIDIA H200")
    assert gpu_peaks("NVIDIA H100 PCIe") != gpu_peaks("NVIDIA H100 80GB HBM3")


def test_case_spacing_and_the_vendor_prefix_do_not_matter():
    assert gpu_peaks("nvidia  h100   pcie") == gpu_peaks("NVIDIA H100 PCIe") == gpu_peaks("H100 PCIe")
    assert gpu_peaks("Tesla T4") is not None  # the T4 reports no "NVIDIA " prefix
    assert gpu_peaks(None) is None and gpu_peaks("") is None


def test_every_entry_is_plausible():
    for key, peaks in GPU_PEAKS.items():
        assert key == key.lower() and not key.startswith("nvidia "), key
        assert 0.1 < peaks.memory_tbs < 10 and 10 < peaks.fp16_tflops < 5000, key
