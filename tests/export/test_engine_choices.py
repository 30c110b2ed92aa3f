"""Engine-step decisions that run on a CPU: the optimization profile for an input, the TensorRT-RTX
targets, the timing cache's folder, the TF32 flag."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from export import engine as engines
from export.core.errors import OptionError, ShapeOutsideProfilesError
from export.runners.trt import TensorRTRunner

NAME = "pixel_values"


def _profile(lo, hi, opt=None):
    return {NAME: {"min": list(lo), "opt": list(opt or lo), "max": list(hi)}}


def test_choose_profile_keeps_the_active_one_and_else_takes_the_smallest_that_holds():
    batched = _profile([1, 3, 112, 112], [8, 3, 336, 336])
    wide = _profile([1, 3, 28, 28], [1, 3, 448, 1792])
    square = _profile([1, 3, 28, 28], [1, 3, 896, 896])
    profiles = [batched, wide, square]
    assert engines.choose_profile(profiles, {NAME: (4, 3, 224, 224)}) == 0
    # one image at 224x224 fits all three: the smallest max volume wins (wide and square tie: lower index)
    assert engines.choose_profile(profiles, {NAME: (1, 3, 224, 224)}) == 1
    assert engines.choose_profile(profiles, {NAME: (1, 3, 224, 224)}, current=2) == 2  # active and fits: kept
    assert engines.choose_profile(profiles, {NAME: (1, 3, 448, 1400)}, current=0) == 1
    assert engines.choose_profile(profiles, {NAME: (1, 3, 840, 700)}) == 2
    assert engines.choose_profile(profiles, {NAME: (2, 3, 840, 700)}) is None  # a batch fits no native profile
    assert engines.choose_profile(profiles, {"other": (1, 3, 224, 224)}) is None


@pytest.mark.parametrize("max_pixels", [1_003_520, 3_240_000])
def test_native_profiles_hold_every_size_the_native_mode_sends_within_twice_the_budget(max_pixels):
    from export.core.preprocessing import MAX_ASPECT_RATIO, smart_resize

    budget = engines.native_budget(14, max_pixels=max_pixels)
    profiles = engines.profiles(NAME, (336, 336), True, 14, 8, budget)
    native = profiles[1:]
    f = budget["factor"]
    for p in native:  # each box: at most sqrt(NATIVE_ASPECT_BAND) x the budget, up to the factor grid
        _, _, h, w = p[NAME]["max"]
        assert (h - f) * (w - f) <= engines.NATIVE_ASPECT_BAND ** 0.5 * max_pixels, (h, w)
    rng = np.random.default_rng(0)
    sizes = [(28, 28), (1, MAX_ASPECT_RATIO), (MAX_ASPECT_RATIO, 1), (4000, 4000), (10, 1999), (1999, 10)]
    for _ in range(2000):  # log-uniform sides: every aspect ratio band, tiny to huge images
        h, w = (int(v) for v in np.exp(rng.uniform(np.log(8), np.log(20000), size=2)))
        sizes.append((h, w))
    for h, w in sizes:
        if max(h, w) / min(h, w) > MAX_ASPECT_RATIO:
            continue
        rh, rw = smart_resize(h, w, budget["factor"], budget["min_pixels"], budget["max_pixels"])
        assert engines.choose_profile(native, {NAME: (1, 3, rh, rw)}) is not None, (h, w, rh, rw)


class _FakePolygraphyRunner:
    def __init__(self):
        self.set_calls: list[int] = []

    def set_profile(self, index):
        self.set_calls.append(index)


def test_the_tensorrt_runner_switches_profiles_and_names_the_ranges_when_none_holds(tmp_path):
    runner = TensorRTRunner(tmp_path / "model.plan", "tensorrt")
    fake = _FakePolygraphyRunner()
    runner._runner, runner.profile = fake, 0
    runner.profiles = [_profile([1, 3, 112, 112], [8, 3, 336, 336]), _profile([1, 3, 28, 28], [1, 3, 896, 896])]
    assert runner.trt_runner is fake
    assert runner.select_profile({NAME: (8, 3, 336, 336)}) == 0 and fake.set_calls == []
    assert runner.select_profile({NAME: (1, 3, 840, 420)}) == 1 and fake.set_calls == [1]
    assert runner.select_profile({NAME: (1, 3, 840, 420)}) == 1 and fake.set_calls == [1]  # no needless switch
    with pytest.raises(ShapeOutsideProfilesError, match=r"\[2, 3, 840, 420\].*profile 0: min \[1, 3, 112, 112\]"):
        runner.select_profile({NAME: (2, 3, 840, 420)})


def test_tensorrt_rtx_refuses_an_h100_and_unsupported_targets_up_front():
    h100 = engines.EngineTarget("tensorrt-rtx", "1.7", None, {"name": "NVIDIA H100 80GB HBM3",
                                                              "compute_capability": "9.0"})
    with pytest.raises(OptionError, match=r"H100.*9\.0.*does not support .*7\.5.*--runtime tensorrt"):
        engines.check_rtx_targets(h100, None)
    engines.check_rtx_targets(h100, [(8, 9)])  # explicit RTX targets build anywhere
    with pytest.raises(OptionError, match=r"cannot target compute capability 9\.0, 10\.0"):
        engines.check_rtx_targets(h100, [(9, 0), (10, 0), (8, 6)])
    ada = engines.EngineTarget("tensorrt-rtx", "1.7", None, {"name": "RTX 4090", "compute_capability": "8.9"})
    engines.check_rtx_targets(ada, None)
    assert (12, 0) in engines.rtx_supported_ccs() and (9, 0) not in engines.rtx_supported_ccs()


def test_the_cli_refuses_an_rtx_target_before_loading_anything(tmp_path, capsys):
    from export.build_engine import main

    out = tmp_path / "out"
    assert main(["--model", str(tmp_path / "nowhere"), "--out", str(out), "--runtime", "tensorrt-rtx",
                 "--compute-capability", "9.0"]) == 2
    assert "cannot target compute capability 9.0" in capsys.readouterr().err
    assert not out.exists()


def test_timing_cache_folder_is_created_and_a_folder_path_refused(tmp_path):
    path = engines.prepare_timing_cache(tmp_path / "new" / "deeper" / "timing.cache")
    assert path is not None and path.parent.is_dir() and not path.exists()
    with pytest.raises(OptionError, match="is a folder"):
        engines.prepare_timing_cache(tmp_path)
    assert engines.prepare_timing_cache(None) is None


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None, reason="tensorrt-rtx not installed")
@pytest.mark.parametrize("enabled", [False, True])
def test_tf32_flag_is_set_as_asked_on_a_real_builder_config(enabled):
    import subprocess
    import sys

    # A process of its own: Polygraphy binds one TensorRT flavour per process.
    code = ("import os; os.environ['POLYGRAPHY_USE_TENSORRT_RTX'] = '1'\n"
            "from export.engine.build import _set_tf32\n"
            "from polygraphy.backend.trt.util import trt\n"
            "cfg = trt.Builder(trt.Logger(trt.Logger.ERROR)).create_builder_config()\n"
            f"_set_tf32(cfg, {enabled})\n"
            "print(cfg.get_flag(trt.BuilderFlag.TF32))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == str(enabled)
