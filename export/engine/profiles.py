"""Optimization-profile geometry: batch, resolution, the native budget, AnyRes."""

from __future__ import annotations

import math

from export.core.errors import OptionError


def batch_profile(max_batch: int) -> tuple[int, int, int]:
    """(min, opt, max) batch: TensorRT tunes kernels for opt, so pick the middle of the range."""
    return 1, max(1, max_batch // 2), max_batch


def resolution_profile(native: tuple[int, int], patch: int) -> dict[str, tuple[int, int]]:
    """H, W ranges for --dynamic-resolution engines: half to 1.5x the native size, patch multiples."""
    def snap(v: float) -> int:
        return max(patch, int(round(v / patch)) * patch)

    h, w = native
    return {"min": (snap(h / 2), snap(w / 2)), "opt": (h, w), "max": (snap(h * 1.5), snap(w * 1.5))}


def profiles(input_name: str, image_size: tuple[int, int], dynamic: bool, patch: int, max_batch: int,
             native: dict | None = None) -> dict | list[dict]:
    """The engine's optimization profiles: the batch range at the traced size (dynamic: 0.5-1.5x it), and for
    dynamic-resolution engines with a `native` budget (native_budget) also every shape --preprocess native
    can send (native_profiles: one image at a time, one profile per band of aspect ratios)."""
    lo, opt, hi = batch_profile(max_batch)
    hw = resolution_profile(image_size, patch) if dynamic else {k: image_size for k in ("min", "opt", "max")}
    batched = {input_name: {"min": [lo, 3, *hw["min"]], "opt": [opt, 3, *hw["opt"]], "max": [hi, 3, *hw["max"]]}}
    if not (dynamic and native):
        return batched
    return [batched, *native_profiles(input_name, native["factor"], native["min_pixels"], native["max_pixels"])]


def profile_max_batch(profiles: dict | list[dict]) -> int | None:
    """The largest batch of the batched profile (Triton's max_batch_size): one profile {input: {min, opt, max}},
    or a list whose first is the batched one and the rest take one image each (export.engine.profiles with a
    native budget: --preprocess native sends one image at a time, and its encoder does not batch); None
    without one."""
    first = (profiles[0] if profiles else {}) if isinstance(profiles, list) else profiles
    maxima = [p["max"][0] for p in first.values() if isinstance(p, dict) and p.get("max")]
    return min(maxima) if maxima else None


def native_budget(patch: int, factor: int | None = None, min_pixels: int | None = None,
                  max_pixels: int | None = None) -> dict:
    """The native mode's resize budget (triton_repo.build --preprocess native): h', w' multiples of `factor`
    (default twice the patch: a 2x2 merge) with min_pixels <= h' * w' <= max_pixels (default
    LLaVA-OneVision-1.5's). Raises OptionError for a budget smart_resize cannot honour."""
    from export.core.preprocessing import NATIVE_MAX_PIXELS, NATIVE_MIN_PIXELS

    factor = 2 * patch if factor is None else factor
    lo = NATIVE_MIN_PIXELS if min_pixels is None else min_pixels
    hi = NATIVE_MAX_PIXELS if max_pixels is None else max_pixels
    if factor < patch or factor % patch:
        raise OptionError(f"--resize-factor {factor} must be a positive multiple of the patch size {patch} "
                          f"(e.g. {2 * patch})")
    if lo < 1 or hi < factor * factor or lo > hi:
        raise OptionError(f"--min-pixels {lo} / --max-pixels {hi}: need 1 <= min <= max and max >= factor^2 "
                          f"({factor * factor})")
    return {"factor": factor, "min_pixels": lo, "max_pixels": hi}


def add_native_budget_arguments(p, scope: str, *, prefix: str = "", max_help: str | None = None) -> None:
    """The CLI flags of native_budget: --resize-factor, --{prefix}min-pixels, --{prefix}max-pixels (dest
    resize_factor, {prefix}min_pixels, ...). `scope` starts each help; max_help replaces the upper end's
    where giving it also turns native mode on (the ledger, visualize_features)."""
    from export.core.preprocessing import NATIVE_MAX_PIXELS, NATIVE_MIN_PIXELS

    p.add_argument("--resize-factor", type=int, metavar="N",
                   help=f"{scope}: sides are multiples of N (default: twice the patch size)")
    p.add_argument(f"--{prefix}min-pixels", type=int, metavar="N",
                   help=f"{scope}: pixel budget, lower end (default: {NATIVE_MIN_PIXELS}, LLaVA-OneVision-1.5's)")
    p.add_argument(f"--{prefix}max-pixels", type=int, metavar="N", help=max_help or (
        f"{scope}: pixel budget, upper end (default: {NATIVE_MAX_PIXELS}, LLaVA-OneVision-1.5's)"))


# Each native-resolution profile spans aspect ratios within this factor: its max shape then holds at most
# sqrt(band) x the pixel budget, where one profile for every aspect ratio would hold (longest side)^2.
NATIVE_ASPECT_BAND = 4.0


def native_side_range(factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(shortest, longest) side smart_resize(h, w, factor, min_pixels, max_pixels) can produce: multiples of
    factor, at least factor. h' * w' <= max_pixels and an aspect ratio of at most MAX_ASPECT_RATIO (smart_resize
    refuses more) bound the longest side by sqrt(MAX_ASPECT_RATIO * max_pixels): smart_resize floors onto the
    factor grid when it shrinks and ceils only up to sqrt(MAX_ASPECT_RATIO * min_pixels) when it grows."""
    from export.core.preprocessing import MAX_ASPECT_RATIO

    budget = max(max_pixels, factor * factor)
    longest = _ceil_to(math.sqrt(MAX_ASPECT_RATIO * budget), factor)
    return factor, max(longest, _ceil_to(math.sqrt(MAX_ASPECT_RATIO * min_pixels), factor))


def native_profiles(input_name: str, factor: int, min_pixels: int, max_pixels: int, max_batch: int = 1,
                    band: float = NATIVE_ASPECT_BAND) -> list[dict]:
    """Optimization profiles covering every (h', w') the native mode produces (--preprocess native).

    Profile k covers aspect ratios (h/w) in [r_k, band * r_k], from 1/MAX_ASPECT_RATIO up to MAX_ASPECT_RATIO;
    its sides run from `factor` to what the pixel budget allows at the band's extreme ratio, so a profile's max
    shape stays near the budget. Triton's TensorRT backend picks, per request, a profile whose range holds it.
    """
    from export.core.preprocessing import MAX_ASPECT_RATIO

    lo_side, hi_side = native_side_range(factor, min_pixels, max_pixels)
    budget = max(max_pixels, lo_side * lo_side)
    out, ratio = [], 1.0 / MAX_ASPECT_RATIO
    while ratio < MAX_ASPECT_RATIO:
        top = min(ratio * band, float(MAX_ASPECT_RATIO))
        # h'/w' = r and h'*w' <= budget -> h' <= sqrt(budget * r), w' <= sqrt(budget / r). smart_resize
        # floors onto the factor grid when it shrinks, so a ceil covers it; the box then holds at most
        # sqrt(band) x the budget (2x for the default band), the least a box over a band of ratios can.
        h_max = min(hi_side, _ceil_to(math.sqrt(budget * top), factor))
        w_max = min(hi_side, _ceil_to(math.sqrt(budget / ratio), factor))
        h_opt = min(h_max, _ceil_to(math.sqrt(budget * math.sqrt(ratio * top)) / 2, factor))
        w_opt = min(w_max, _ceil_to(math.sqrt(budget / math.sqrt(ratio * top)) / 2, factor))
        out.append({input_name: {"min": [1, 3, lo_side, lo_side], "opt": [1, 3, h_opt, w_opt],
                                 "max": [max_batch, 3, h_max, w_max]}})
        ratio = top
    return out


def anyres_profile(input_name: str, tile: int, max_tiles: int, images: int = 1) -> dict:
    """The profile for --preprocess anyres: s x s tiles, batches of up to `images` x (1 + max_tiles) (the whole
    image first, then each tile of the largest grid)."""
    lo, opt, hi = batch_profile(images * (1 + max_tiles))
    return {input_name: {"min": [lo, 3, tile, tile], "opt": [opt, 3, tile, tile], "max": [hi, 3, tile, tile]}}


def profile_covers(profile: dict, shape: tuple[int, ...]) -> bool:
    """Whether one input's {min, opt, max} holds `shape` in every dimension."""
    return (len(shape) == len(profile["min"])
            and all(a <= s <= b for a, s, b in zip(profile["min"], shape, profile["max"])))


def _ceil_to(value: float, multiple: int) -> int:
    return max(multiple, int(math.ceil(value / multiple)) * multiple)


def choose_profile(profiles: list[dict], shapes: dict[str, tuple[int, ...]], current: int | None = None) -> int | None:
    """The optimization profile to run `shapes` ({input: shape}) in, or None when no profile holds them.

    `profiles` is the engine's list of {input: {min, opt, max}} (index = TensorRT's profile index). The active
    profile is kept when it holds the shapes (switching costs a synchronization and, with per-profile
    allocation, a reallocation); otherwise the holding profile with the smallest max volume wins, since its
    context memory is the smallest (ties: the lower index)."""
    def holds(i: int) -> bool:
        return all(name in profiles[i] and profile_covers(profiles[i][name], tuple(shape))
                   for name, shape in shapes.items())

    if current is not None and 0 <= current < len(profiles) and holds(current):
        return current
    fits = [i for i in range(len(profiles)) if holds(i)]
    if not fits:
        return None
    return min(fits, key=lambda i: (sum(math.prod(p["max"]) for p in profiles[i].values()), i))


def describe_profiles(profiles: list[dict], name: str) -> str:
    """One line per profile of input `name`: 'profile 0: min [1, 3, 224, 224] ... max [8, 3, 336, 336]'."""
    return "; ".join(f"profile {i}: min {list(p[name]['min'])}, max {list(p[name]['max'])}"
                     for i, p in enumerate(profiles) if name in p)
