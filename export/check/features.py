"""Token features as RGB (PCA), PyTorch next to a deployed backend, sharing one PCA basis.

As in the MVT project's "Visualize Semantic Features" figure: the patch tokens [N, C] of one image
are projected onto their first three principal components and shown as an RGB map on the patch grid.
The basis (mean, components, and the colour range) is fitted on PyTorch's tokens only and then
applied to both, so equal maps mean equal features, not merely equally structured ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from export.core.metrics import row_cosines

COLOUR_PERCENTILES = (1.0, 99.0)  # the colour range: robust to a few extreme tokens


@dataclass
class PcaBasis:
    mean: np.ndarray  # (C,)
    components: np.ndarray  # (3, C), rows: principal directions, strongest first
    low: np.ndarray  # (3,) colour range per component, from the reference projection
    high: np.ndarray  # (3,)

    def rgb(self, tokens: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        """tokens [N, C] -> float RGB image [gh, gw, 3] in [0, 1]."""
        proj = (tokens.astype(np.float64) - self.mean) @ self.components.T  # (N, 3)
        scaled = (proj - self.low) / np.maximum(self.high - self.low, 1e-12)  # (N, 3)
        return np.clip(scaled, 0.0, 1.0).reshape(grid[0], grid[1], 3)  # (gh, gw, 3)


def fit_pca(tokens: np.ndarray) -> PcaBasis:
    """The first three principal components of `tokens` [N, C] (N >= 3) and their colour range."""
    x = tokens.astype(np.float64)  # (N, C)
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)  # vt: (min(N, C), C)
    components = vt[:3]
    # A component's sign is arbitrary; fix it so that the largest |loading| is positive (reproducible colours).
    signs = np.sign(components[np.arange(len(components)), np.argmax(np.abs(components), axis=1)])
    components = components * signs[:, None]
    proj = (x - mean) @ components.T  # (N, 3)
    low, high = np.percentile(proj, COLOUR_PERCENTILES, axis=0)
    return PcaBasis(mean, components, low, high)


def patch_tokens(hidden: np.ndarray, grid: tuple[int, int], prefix_tokens: int = 1) -> np.ndarray:
    """[S, C] or [1, S, C] with `prefix_tokens` first (1: the class token; UNICOM: none) -> the
    [gh * gw, C] patch tokens."""
    tokens = hidden.reshape(-1, hidden.shape[-1])  # (S, C)
    n = grid[0] * grid[1]
    if tokens.shape[0] != n + prefix_tokens:
        raise ValueError(f"expected {n} patch tokens + {prefix_tokens} prefix tokens for a {grid[0]}x{grid[1]} "
                         f"grid, got {tokens.shape[0]} tokens")
    return tokens[prefix_tokens:]  # (gh * gw, C)


def model_view(pixels: np.ndarray, mean, std) -> np.ndarray:
    """pixel_values [3, H, W] (normalized) -> the RGB image the model saw, [H, W, 3] in [0, 1]."""
    image = pixels.transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)  # (H, W, 3)
    return np.clip(image, 0.0, 1.0)


def upsample(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of a [gh, gw, 3] map to [H, W, 3]: one block per patch."""
    h, w = size
    rows = np.arange(h) * rgb.shape[0] // h
    cols = np.arange(w) * rgb.shape[1] // w
    return rgb[rows][:, cols]  # (H, W, 3)


def feature_figure(reference_tokens: np.ndarray, deployed_tokens: np.ndarray, pixels: np.ndarray,
                   patch: int, processor, out, backend_label: str, title: str = "", prefix_tokens: int = 1) -> dict:
    """Write the PNG: input | PyTorch PCA-RGB | backend PCA-RGB (one basis). Returns the figures shown.

    reference_tokens / deployed_tokens: [S, C] last_hidden_state of the image (`prefix_tokens` first:
    the family's, 1 for a class token); pixels: its pixel_values [3, H, W].
    """
    from export.check.plots import plot_features

    h, w = pixels.shape[-2:]
    grid = (h // patch, w // patch)
    ref, dep = (patch_tokens(t, grid, prefix_tokens) for t in (reference_tokens, deployed_tokens))  # (N, C) each
    basis = fit_pca(ref)
    ref_rgb, dep_rgb = basis.rgb(ref, grid), basis.rgb(dep, grid)  # (gh, gw, 3)
    cos = row_cosines(ref, dep)  # (N,)
    facts = {"grid": list(grid), "image_size": [int(h), int(w)], "tokens_min_cosine": float(cos.min()),
             "tokens_mean_cosine": float(cos.mean()),
             "rgb_max_abs_difference": float(np.abs(ref_rgb - dep_rgb).max())}
    view = model_view(pixels, processor.image_mean, processor.image_std)
    panels = [(f"input ({h}x{w}, as the model sees it)", view),
              ("PyTorch tokens (PCA -> RGB)", upsample(ref_rgb, (h, w))),
              (f"{backend_label} tokens (same PCA basis)", upsample(dep_rgb, (h, w)))]
    subtitle = (f"{title}  —  token cosine min {facts['tokens_min_cosine']:.5f}, "
                f"mean {facts['tokens_mean_cosine']:.5f}; max RGB difference {facts['rgb_max_abs_difference']:.3f}")
    plot_features(panels, out, subtitle.strip(" —"))
    return facts
