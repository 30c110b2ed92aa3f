"""PNG figures for the parity ledger, the benchmark and feature maps (matplotlib, Agg backend, imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("PNG plots need matplotlib: pip install matplotlib "
                          "(or mvt-deploy[plots]); pass --no-plots to skip them") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_layers(series: dict[str, list[dict]], path: Path, title: str = "") -> Path:
    """Relative L2 error of each layer's hidden state against PyTorch, one line per stage."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for stage, rows in series.items():
        xs = [r["layer"] for r in rows if r["rel_l2"] is not None]
        ys = [max(r["rel_l2"], 1e-9) for r in rows if r["rel_l2"] is not None]
        if xs:
            ax.plot(xs, ys, marker="o", label=stage)
    ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("depth (0 = embeddings, i = after encoder layer i)")
    ax.set_ylabel("relative L2 error vs PyTorch")
    ax.set_title(title or "Per-layer divergence")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_stages(rows: list[dict], path: Path, title: str = "") -> Path:
    """SQNR (dB) per stage and output, and the pooled embeddings' nearest-neighbour agreement."""
    plt = _pyplot()
    import numpy as np

    stages = list(dict.fromkeys(r["stage"] for r in rows))
    outputs = list(dict.fromkeys(r["output"] for r in rows))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110, gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(1, len(outputs))
    for j, output in enumerate(outputs):
        vals = []
        for s in stages:
            r = next((r for r in rows if r["stage"] == s and r["output"] == output), None)
            v = None if r is None else r["sqnr_db"]
            vals.append(np.nan if v is None else min(v, 150.0))  # inf (identical) drawn at 150 dB
        ax.bar(np.arange(len(stages)) + j * width, vals, width, label=output)
    ax.set_xticks(np.arange(len(stages)) + width * (len(outputs) - 1) / 2)
    ax.set_xticklabels(stages, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("SQNR vs PyTorch (dB, higher is closer)")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    pooled = [r for r in rows if r.get("nn_top1") is not None]
    names = [r["stage"] for r in pooled]
    ax2.bar(np.arange(len(names)) - 0.2, [r["nn_top1"] for r in pooled], 0.4, label="top-1 agreement")
    ax2.bar(np.arange(len(names)) + 0.2, [r["nn_top5"] for r in pooled], 0.4, label="top-5 overlap")
    ax2.set_xticks(np.arange(len(names)))
    ax2.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax2.set_ylim(0, 1.05)
    ax2.set_title("nearest neighbours (pooled)", fontsize=9)
    ax2.legend(fontsize=8, loc="lower left")
    fig.suptitle(title or "Parity ledger")
    return _save(plt, fig, path)


def plot_benchmark(results: list[dict], path: Path, title: str = "") -> Path:
    """Throughput and median latency against batch size, one line per backend."""
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for backend in dict.fromkeys(r["backend"] for r in results):
        rows = sorted((r for r in results if r["backend"] == backend and r.get("median_ms") is not None),
                      key=lambda r: r["batch"])
        if not rows:
            continue
        b = [r["batch"] for r in rows]
        ax.plot(b, [r["images_per_s"] for r in rows], marker="o", label=backend)
        ax2.plot(b, [r["median_ms"] for r in rows], marker="o", label=backend)
    batches = sorted({r["batch"] for r in results})
    for a, label in ((ax, "images / s"), (ax2, "median latency per batch (ms)")):
        a.set_xscale("log", base=2)
        a.set_xticks(batches, [str(b) for b in batches])
        a.set_xlabel("batch size")
        a.set_ylabel(label)
        a.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(title or "Benchmark")
    return _save(plt, fig, path)


def plot_features(panels: Sequence[tuple[str, object]], path: Path, title: str = "") -> Path:
    """Images side by side (H x W x 3 arrays or PIL images), one titled panel each."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.9), dpi=110)
    for ax, (label, image) in zip(list(axes), panels):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def _save(plt, fig, path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
