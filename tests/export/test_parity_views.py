"""The held-out view set, the view count per model, retrieval metrics and the calibration-target row."""

from __future__ import annotations

import numpy as np
import pytest

from export.check.parity import MIN_VIEWS, calibration_target_check, default_view_count
from export.core.images import HELD_OUT_PHOTOS, VIEWS, held_out_photos
from export.core.metrics import nn_agreement, recall_at_1, worst_and_p5


def test_view_set_is_held_out_deterministic_and_covers_every_photo_in_any_prefix():
    from export.precision.calibration import SKIMAGE_CALIBRATION

    assert not set(HELD_OUT_PHOTOS) & set(SKIMAGE_CALIBRATION)
    views = held_out_photos()
    assert len(views) == len(HELD_OUT_PHOTOS) * len(VIEWS) >= 48
    assert len({v.name for v in views}) == len(views)
    assert {v.name.split("/")[1] for v in views} == set(VIEWS)
    prefix = views[:MIN_VIEWS]  # what the largest models are judged on
    assert {v.identity for v in prefix} == set(HELD_OUT_PHOTOS)
    again = held_out_photos(MIN_VIEWS)
    for a, b in zip(prefix, again):  # the JPEG round trip and the rescale included
        assert a.name == b.name and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    by_name = {v.name: np.asarray(v.image) for v in views}
    full, jpeg = by_name["coffee/full"], by_name["coffee/jpeg"]
    assert full.shape == jpeg.shape and not np.array_equal(full, jpeg)  # a real round trip
    assert by_name["coffee/wide"].shape[1] == 2 * by_name["coffee/wide"].shape[0]  # 2:1
    assert by_name["coffee/tall"].shape[0] == 2 * by_name["coffee/tall"].shape[1]  # 1:2


@pytest.mark.parametrize("alias, size, at_least, at_most", [
    ("mlcd-b-32", (224, 224), 48, 49), ("mlcd-l-336", (336, 336), 48, 49),
    ("rice-l-560", (560, 560), MIN_VIEWS, 47), ("mlcd-bigg-448", (448, 448), MIN_VIEWS, MIN_VIEWS)])
def test_view_count_follows_the_model_cost(alias, size, at_least, at_most):
    from transformers import CLIPVisionConfig, MLCDVisionConfig

    from export.models.zoo import zoo_entry

    entry = zoo_entry(alias)
    assert entry is not None
    config_class = CLIPVisionConfig if entry.model_type == "clip_vision_model" else MLCDVisionConfig
    assert at_least <= default_view_count(config_class(**entry.config), size) <= at_most


def test_recall_at_1_counts_views_of_one_photo_as_one_identity():
    rng = np.random.default_rng(0)
    photos = rng.normal(size=(4, 32))  # (identities, C)
    gallery = np.repeat(photos, 3, axis=0) + 0.05 * rng.normal(size=(12, 32))  # 3 views each
    identities = [i for i in "abcd" for _ in range(3)]
    assert recall_at_1(gallery, gallery, identities) == 1.0
    # a query nearer another view of its own photo than its own view still counts
    swapped = gallery[[1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    assert recall_at_1(gallery, swapped, identities) == 1.0
    # queries that moved to another photograph do not
    moved = gallery.copy()
    moved[0], moved[3] = gallery[3], gallery[0]
    assert recall_at_1(gallery, moved, identities) == pytest.approx(10 / 12)


def test_nn_agreement_treats_reference_ties_as_ties_and_still_fails_real_swaps():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(6, 16))
    # image 0 has two neighbours the reference cannot tell apart (1e-6 in cosine): their order is noise
    twins = np.stack([base[0], base[1], base[1] + 1e-7 * rng.normal(size=16)] + list(base[2:5]))
    flipped = twins.copy()
    flipped[1], flipped[2] = twins[2], twins[1]
    assert nn_agreement(twins, flipped)["nn_top1"] == 1.0
    assert nn_agreement(twins, flipped, tie=0.0)["nn_top1"] < 1.0  # without the tie rule it would count
    shuffled = twins[rng.permutation(len(twins))]
    assert nn_agreement(twins, shuffled)["nn_top1"] < 1.0


def test_worst_and_5th_percentile_follow_each_metric_direction():
    cosines = np.linspace(0.9, 1.0, 101)
    worst, p5, at = worst_and_p5("min_cosine", cosines)
    assert (worst, at) == (0.9, 0) and p5 == pytest.approx(0.905)
    errors = np.linspace(0.0, 1.0, 101)
    worst, p5, at = worst_and_p5("max_abs_rel", errors)
    assert (worst, at) == (1.0, 100) and p5 == pytest.approx(0.95)


def test_a_missed_calibration_target_is_a_failed_row_unless_the_held_out_views_pass():
    assert calibration_target_check(None, True) is None
    assert calibration_target_check({"skipped": "no targets"}, True) is None
    met = calibration_target_check({"met_target": True, "kept_out_of_low_precision": [{}]}, True)
    assert met is not None and met.enforced and met.passed
    missed = {"met_target": False, "kept_out_of_low_precision": [{}, {}]}
    failing = calibration_target_check(missed, False)
    assert failing is not None and failing.enforced and not failing.passed and "[FAIL]" in failing.line()
    reported = calibration_target_check(missed, True)
    assert reported is not None and not reported.enforced and "[miss]" in reported.line()
    assert "held-out views pass" in reported.line()
