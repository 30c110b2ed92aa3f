"""python -m embed: real photos (plus a corrupt and an empty file) -> Parquet rows equal to PyTorch's pooled
output; error rows; reruns add nothing; a different normalization is refused; a killed run leaves only
complete parts and resumes; Ray Data gives the rows in-process mode gives.

The model is a tiny random checkpoint exported by the real pipeline (triton_repo.testing.tiny_artifacts);
the PyTorch reference is the checkpoint its manifest names, fed the served preprocessing's pixels.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export.core.errors import OptionError, OutputExistsError

pa = pytest.importorskip("pyarrow", reason="the embed extra: pip install 'mvt-deploy[embed]'")
pq = pytest.importorskip("pyarrow.parquet")

MIN_COSINE = 0.9999  # the bar: every vector against PyTorch's on the same image
BAD = {"corrupt.jpg": "cannot decode image", "empty.png": "empty image"}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    from triton_repo.testing import tiny_artifacts

    return tiny_artifacts(tmp_path_factory.mktemp("embed-model"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """30 real photographs (7 scikit-image photos x 4 views, a grayscale and an RGBA one; JPEG and PNG, some in
    a subfolder), a corrupt and an empty file, and a text file that is not an image."""
    import skimage.data
    from PIL import Image, ImageOps

    from export.core.images import sample_photos

    folder = tmp_path_factory.mktemp("photos")
    (folder / "more").mkdir()
    for i, photo in enumerate(sample_photos(7)):
        w, h = photo.size
        views = {"full": photo, "flip": ImageOps.mirror(photo), "crop": photo.crop((w // 4, h // 5, w, h)),
                 "small": photo.resize((max(8, w // 9), max(8, h // 7)))}  # smaller than the model's input
        for j, (view, image) in enumerate(views.items()):
            sub = folder / "more" if j % 2 else folder
            if (i + j) % 2:
                image.save(sub / f"p{i}-{view}.jpg", quality=90)
            else:
                image.save(sub / f"p{i}-{view}.png")
    Image.fromarray(skimage.data.camera()).save(folder / "camera-gray.png")  # mode L
    Image.fromarray(skimage.data.logo()).save(folder / "more" / "logo-rgba.png")  # RGBA: composited on white
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG" * 10)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image\n")
    return folder


@pytest.fixture(scope="module")
def reference(artifacts, photos) -> dict[str, np.ndarray]:
    """{absolute path: PyTorch's pooled output (E,)} for every decodable image, the served preprocessing's pixels."""
    from export.core.manifest import read_manifest
    from export.core.preprocessing import CONFIG_NAME, ClipPreprocessing, ImageDecodeError, pixel_values_from_bytes
    from export.runners.select import runner_for_artifacts

    manifest = read_manifest(artifacts)
    cfg = ClipPreprocessing.from_file(artifacts / CONFIG_NAME)
    out = manifest.pooled_output
    refs = {}
    with runner_for_artifacts(artifacts, "torch", output_names=[out], manifest=manifest) as torch_runner:
        for path in sorted(photos.rglob("*.*")):
            try:
                x = pixel_values_from_bytes(path.read_bytes(), cfg)  # (3, H, W)
            except ImageDecodeError:
                continue
            refs[str(path.absolute())] = torch_runner.infer({"pixel_values": x[None]})[out][0]  # (E,)
    return refs


def _rows(out: Path) -> dict[str, dict]:
    from embed import read_embeddings

    table = read_embeddings(out).to_pylist()
    paths = [r["path"] for r in table]
    assert len(paths) == len(set(paths)), "a path was written twice"
    return {r["path"]: r for r in table}


def _check_against_reference(rows: dict[str, dict], reference: dict[str, np.ndarray], photos: Path,
                             normalize: bool = False) -> None:
    from export.core.metrics import row_cosines

    good = sorted(reference)
    assert len(good) == 30
    assert sorted(rows) == sorted(good + [str((photos / name).absolute()) for name in BAD])
    for name, message in BAD.items():
        row = rows[str((photos / name).absolute())]
        assert row["embedding"] is None and message in row["error"], row
    actual = np.array([rows[p]["embedding"] for p in good], dtype=np.float32)  # (30, E)
    expected = np.stack([reference[p] for p in good])  # (30, E)
    assert all(rows[p]["error"] is None for p in good)
    assert float(row_cosines(expected, actual).min()) >= MIN_COSINE
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(actual, axis=1), 1.0, atol=1e-6)
    else:  # not normalized: the magnitudes are PyTorch's too
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def in_process(artifacts, photos, tmp_path_factory):
    from embed import embed_images

    out = tmp_path_factory.mktemp("runs") / "in-process"
    result = embed_images(artifacts, photos, out, batch_size=8, rows_per_part=10, progress=False, log=lambda _: None)
    return out, result


def test_in_process_rows_equal_pytorch_and_bad_files_are_error_rows(in_process, reference, photos):
    out, result = in_process
    assert (result.images, result.skipped, result.embedded, result.errors) == (32, 0, 30, 2)
    assert result.parts == 4 and len(list(out.glob("part-*.parquet"))) == 4  # 10 + 10 + 10 + 2 rows
    schema = pq.read_schema(next(out.glob("part-*.parquet")))
    embedding = schema.field("embedding").type
    assert pa.types.is_list(embedding) and embedding.value_type == pa.float32()
    assert schema.field("path").type == pa.string() and schema.field("error").type == pa.string()
    assert b"mvt_embed" in schema.metadata
    _check_against_reference(_rows(out), reference, photos)
    import pandas as pd  # the layout reads as one table with the usual readers (temporary and _ files skipped)

    assert len(pd.read_parquet(out)) == 32


def test_a_second_run_adds_nothing(in_process, artifacts, photos):
    from embed import embed_images

    out, _ = in_process
    before = sorted(p.name for p in out.iterdir())
    again = embed_images(artifacts, photos, out, batch_size=8, progress=False, log=lambda _: None)
    assert (again.skipped, again.embedded, again.errors, again.parts) == (32, 0, 0, 0)
    assert sorted(p.name for p in out.iterdir()) == before


def test_normalized_run_from_a_list_file_and_a_different_normalization_is_refused(artifacts, photos, reference,
                                                                                    tmp_path):
    import torch

    from embed.__main__ import main

    listing = tmp_path / "lists" / "images.txt"
    listing.parent.mkdir()
    names = [str(p.relative_to(photos)) for p in sorted(photos.rglob("*")) if p.suffix in (".jpg", ".png")]
    # relative entries are relative to the list's folder (not the working directory); comments and blank
    # lines are skipped
    up = os.path.relpath(photos, listing.parent)
    listing.write_text("# the test photos\n\n" + "\n".join(f"{up}/{n}" for n in names) + "\n")
    out = tmp_path / "normalized"
    args = ["--artifacts", str(artifacts), "--images", str(listing), "--out", str(out), "--batch-size", "5",
            "--no-progress"]
    assert main(args + ["--normalize"]) == 0
    rows = _rows(out)
    _check_against_reference(rows, reference, photos, normalize=True)
    good = sorted(reference)
    torch_normalized = torch.nn.functional.normalize(torch.from_numpy(np.stack([reference[p] for p in good])), dim=-1)
    np.testing.assert_allclose(np.array([rows[p]["embedding"] for p in good]), torch_normalized.numpy(), atol=1e-5)

    with pytest.raises(OutputExistsError, match=r"differ in normalize.*--force"):
        from embed import embed_images

        embed_images(artifacts, photos, out, normalize=False, progress=False, log=lambda _: None)
    assert main(args) == 2  # the CLI: the same refusal, exit 2, nothing written
    assert len(_rows(out)) == 32
    assert main(args + ["--force"]) == 0  # --force starts over, unnormalized
    _check_against_reference(_rows(out), reference, photos, normalize=False)


def test_killed_run_leaves_only_complete_parts_and_resumes(artifacts, photos, reference, tmp_path, monkeypatch):
    import embed.store as store
    from embed import embed_images

    real_write_part, calls = store.write_part, []

    def killed_while_writing_the_second_part(out, table, name):
        calls.append(name)
        if len(calls) == 1:
            return real_write_part(out, table, name)
        # What SIGKILL in the middle of pq.write_table leaves: a truncated file under the temporary name.
        tmp = Path(out) / f".{store.PART_PREFIX}{name}{store.PART_SUFFIX}{store.TMP_SUFFIX}"
        tmp.write_bytes(b"PAR1 truncated")
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "write_part", killed_while_writing_the_second_part)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        embed_images(artifacts, photos, out, batch_size=4, rows_per_part=8, progress=False, log=lambda _: None)
    parts = list(out.glob("part-*.parquet"))
    assert len(parts) == 1 and pq.read_table(parts[0]).num_rows == 8  # complete, readable
    assert len(list(out.glob(".part-*.tmp"))) == 1
    monkeypatch.setattr(store, "write_part", real_write_part)

    resumed = embed_images(artifacts, photos, out, batch_size=4, rows_per_part=8, progress=False, log=lambda _: None)
    assert (resumed.skipped, resumed.embedded + resumed.errors) == (8, 24)
    assert not list(out.glob(".part-*"))  # the killed run's unfinished part is gone
    _check_against_reference(_rows(out), reference, photos)


def test_write_part_failure_leaves_no_file(tmp_path, monkeypatch):
    import pyarrow.parquet

    from embed.store import schema, write_part
    from embed.worker import Row, rows_table

    table = rows_table([Row("/a.jpg", np.ones(4, np.float32), None), Row("/b.jpg", None, "bad")], {"k": 1})
    assert table.column("embedding").null_count == 1 and table.schema == schema({"k": 1})

    def disk_full(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half")
        raise OSError("No space left on device")

    monkeypatch.setattr(pyarrow.parquet, "write_table", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_part(tmp_path, table, "x")
    assert list(tmp_path.iterdir()) == []


def test_sources_folder_glob_list_and_bad_input(photos, tmp_path):
    from embed.sources import image_paths

    folder = image_paths(photos)
    assert len(folder) == 32 and all(Path(p).is_absolute() for p in folder)  # recursive; notes.txt left out
    assert not any(p.endswith(".txt") for p in folder)
    assert image_paths(f"{photos}/more/*.png") == sorted(str(p) for p in (photos / "more").glob("*.png"))
    assert len(image_paths(f"{photos}/**/*.jpg")) == len(list(photos.rglob("*.jpg")))
    listing = tmp_path / "list.txt"
    listing.write_text(f"{folder[1]}\n{folder[0]}\n{folder[1]}\nmissing.jpg\n")  # order kept, duplicates dropped
    assert image_paths(listing) == [folder[1], folder[0], str(tmp_path / "missing.jpg")]
    with pytest.raises(OptionError, match="does not exist; pass a folder, a glob"):
        image_paths(tmp_path / "nowhere")
    with pytest.raises(OptionError, match="matches no files"):
        image_paths(f"{tmp_path}/*.webp")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OptionError, match="holds no images"):
        image_paths(tmp_path / "empty")


def test_output_folder_with_other_files_is_refused(artifacts, photos, tmp_path):
    from embed import embed_images

    (tmp_path / "mine.csv").write_text("a,b\n")
    with pytest.raises(OutputExistsError, match="not batch embeddings"):
        embed_images(artifacts, photos, tmp_path, progress=False, log=lambda _: None)
    with pytest.raises(OutputExistsError, match="is a file"):
        embed_images(artifacts, photos, tmp_path / "mine.csv", progress=False, log=lambda _: None)
    with pytest.raises(OptionError, match="add --ray"):
        embed_images(artifacts, photos, tmp_path / "new", actors=2, progress=False, log=lambda _: None)
    incomplete = tmp_path / "incomplete"
    shutil.copytree(artifacts, incomplete)
    (incomplete / "preprocessor_config.json").unlink()
    with pytest.raises(OptionError, match="has no preprocessor_config.json"):
        embed_images(incomplete, photos, tmp_path / "new", progress=False, log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["incomplete", "mine.csv"]  # nothing written


def test_tensorrt_batches_follow_the_plan_profile_not_the_export(artifacts, photos, tmp_path, monkeypatch):
    """A plan rebuilt with `--artifacts --max-batch 2` takes batches of 2 at most, though the export's interface
    still says 8: the embedder splits by the plan's profile 0 (the one Polygraphy's TrtRunner runs)."""
    import json

    import embed.worker as worker
    import export.runners.trt

    folder = Path(shutil.copytree(artifacts, tmp_path / "artifacts"))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["interface"]["max_batch"] = 8
    profile = {"pixel_values": {"min": [1, 3, 56, 56], "opt": [1, 3, 56, 56], "max": [2, 3, 56, 56]}}
    manifest["engine"] = {"built": True, "runtime": "tensorrt", "version": "fake", "profiles": profile}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    batches: list[int] = []

    class FakeEngineRunner:  # TensorRT refuses a batch outside the profile, as this does
        def activate(self):
            return self

        def infer(self, feed):
            (x,) = feed.values()  # (B, 3, H, W)
            assert x.shape[0] <= 2, f"batch {x.shape[0]} is outside the plan's profile (max 2)"
            batches.append(x.shape[0])
            return {model.output: np.zeros((x.shape[0], 64), np.float32)}

    monkeypatch.setattr(worker, "resolve_runtime", lambda *a: ("tensorrt", None))
    monkeypatch.setattr(export.runners.trt, "engine_runner_from_manifest", lambda *a, **k: FakeEngineRunner())
    paths = sorted(str(p) for p in photos.glob("p*-full.*"))[:5]
    model = worker.Embedder(folder, "tensorrt")
    rows = model.rows(paths)
    assert model.max_batch == 2 and batches == [2, 2, 1]
    assert all(r.error is None and r.embedding is not None for r in rows)


def test_normalization_is_the_served_one():
    import torch

    from embed.worker import l2_normalize

    x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32) * 40
    x[2] = 0  # a zero vector stays zero (the 1e-12 floor), as in torch and the served step
    np.testing.assert_allclose(l2_normalize(x), torch.nn.functional.normalize(torch.from_numpy(x), dim=-1).numpy(),
                               atol=1e-7)
    served = (ROOT / "triton_repo" / "backend_models" / "normalize.py").read_text()
    assert "EPS = 1e-12" in served and "np.maximum(norm, EPS)" in served  # the definition l2_normalize copies


def test_import_and_help_need_no_heavy_dependency():
    blocked = ("pyarrow", "ray", "torch", "onnxruntime", "onnx", "tensorrt", "tritonclient")
    code = (f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
            "import embed, runpy\nsys.argv = ['embed', '-h']\nrunpy.run_module('embed', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "--ray [ADDRESS]" in proc.stdout and "--normalize" in proc.stdout


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (startup is several seconds on 2 cores); embed_images reuses it."""
    pytest.importorskip("ray.data", reason="the embed extra: pip install 'mvt-deploy[embed]'")
    import ray

    from embed.ray_job import start_ray

    started = start_ray(None)
    yield
    if started:
        ray.shutdown()


@pytest.mark.slow  # ~15 s here, plus Ray's start (local_ray) on 2 loaded cores
@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")  # Ray Data's own deprecated settings
def test_ray_rows_equal_in_process_and_resume(local_ray, in_process, artifacts, photos, reference, tmp_path):
    from embed import embed_images

    out = tmp_path / "ray"
    result = embed_images(artifacts, photos, out, ray=True, actors=1, batch_size=8, rows_per_part=12,
                          progress=False, log=lambda _: None)
    assert (result.images, result.embedded, result.errors) == (32, 30, 2) and result.mode == "ray (local)"
    assert result.parts >= 2  # parts of at least 12 rows, from Ray's write tasks
    ray_rows, local_rows = _rows(out), _rows(in_process[0])
    _check_against_reference(ray_rows, reference, photos)
    assert sorted(ray_rows) == sorted(local_rows)
    for path, row in local_rows.items():
        if row["embedding"] is None:
            assert ray_rows[path]["embedding"] is None and ray_rows[path]["error"].split(":")[0] == \
                row["error"].split(":")[0]
        else:  # the same code on the same batches: the same numbers
            np.testing.assert_allclose(ray_rows[path]["embedding"], row["embedding"], rtol=0, atol=1e-6)

    lost = sorted(out.glob("part-*.parquet"))[0]  # a part a killed job never wrote: resumed on Ray
    missing = pq.read_table(lost).num_rows
    lost.unlink()
    resumed = embed_images(artifacts, photos, out, ray=True, actors=1, batch_size=8, progress=False,
                           log=lambda _: None)
    assert (resumed.skipped, resumed.embedded + resumed.errors) == (32 - missing, missing)
    assert _rows(out).keys() == ray_rows.keys()
    again = embed_images(artifacts, photos, out, ray=True, progress=False, log=lambda _: None)
    assert (again.skipped, again.embedded + again.errors, again.parts) == (32, 0, 0)
