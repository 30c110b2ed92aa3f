"""The parity ledger: where every number of a deployed model comes from, and how far it is from PyTorch.

    python -m parity_tests --artifacts artifacts/demo            # -> artifacts/demo/ledger/
    python -m parity_tests --artifacts DIR --url 127.0.0.1:8000  # + the Triton-served result

From one export folder (export.build_engine's output) the ledger reloads the PyTorch reference named
in manifest.json, makes every other stage it needs in `<out>/stages/` (stages.py), runs all of
them (export.runners runners) on the same held-out photographs (export.core.images.held_out_photos) and
writes, into `<out>` (default DIR/ledger):

    parity.json   every measured value, every threshold, the invariants, the per-layer errors, skips
    ledger.md     the same as Markdown tables
    stages.png    SQNR per stage and output; nearest-neighbour agreement of the pooled embeddings
    layers.png    relative L2 error of each layer's hidden state against depth, per precision

and prints a checklist ending in PASSED or FAILED (exit 0 / 1; 2 for bad input).
Thresholds are data: export.models.families.TOLERANCES plus parity_tests.agreement.LEDGER_EXTRA.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from export.core.cli import EXIT_FAILED, EXIT_OK, add_artifacts, add_served_model, add_url, command
from export.core.errors import ShapeOutsideProfilesError
from export.core.folder import LEDGER_DIR, LEDGER_JSON, LEDGER_LAYERS_PNG, LEDGER_MD, LEDGER_STAGES_PNG
from export.core.manifest import read_manifest
from export.core.metrics import nn_agreement
from export.engine.profiles import add_native_budget_arguments
from export.graph.trace import export_shape
from export.models.loading import reference_checkpoint
from export.runners.base import Runner, image_feed
from export.runners.pyt import TorchRunner
from parity_tests.agreement import LEDGER_METRICS, LedgerCheck, ledger_thresholds, measure, thresholds
from parity_tests.stages import Stage, make_runner, plan_stages, resolve_groups

REFERENCE_CHUNK = 8  # images per PyTorch / runtime call when running the photo set
INVARIANT_MAX_BATCH = 8  # largest batch the invariants try by default (the manifest's max_batch caps it)
LAYER_IMAGES = 2  # images for the per-layer comparison


class LedgerInputError(Exception):
    """Bad input (a folder that is not an export, unknown stage): exit status 2."""


@dataclass
class LedgerOptions:
    artifacts: Path
    out: Path | None = None  # None: <artifacts>/ledger
    stages: list[str] | None = None  # None: every group (stages.STAGE_GROUPS)
    url: str | None = None  # Triton server (HTTP) serving this folder
    triton_model: str = "embed"
    photos: int | None = None  # None: every held-out view (photos.held_out_photos)
    invariant_max_batch: int | None = None  # None: min(manifest max_batch, INVARIANT_MAX_BATCH)
    plots: bool = True
    keep_stages: bool = True  # keep <out>/stages (the graphs the ledger made)
    # native mode (a --dynamic-resolution export): every photo at smart_resize(h, w, factor, min, max) instead of
    # the export's crop, so each is encoded at its own grid (export.core.preprocessing.native_pixel_values)
    native_max_pixels: int | None = None  # None: crop mode
    native_min_pixels: int | None = None  # None: preprocessing.NATIVE_MIN_PIXELS
    resize_factor: int | None = None  # None: twice the patch size


@dataclass
class Ledger:
    out: Path
    checks: list[LedgerCheck] = field(default_factory=list)
    data: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        enforced = [c for c in self.checks if c.enforced]
        return bool(enforced) and all(c.passed for c in enforced)

    def checklist(self) -> str:
        lines = ["parity ledger (each stage against the PyTorch reference):"]
        lines += [c.line() for c in self.checks]
        for s in self.data.get("stages", []):
            if s["skip_reason"]:
                lines.append(f"  [skip] {s['name']:<22} {s['skip_reason']}")
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def run_on_photos(runner: Runner, pixels: np.ndarray, images: list, chunk: int) -> dict[str, np.ndarray]:
    """Every photo through an active runner, `chunk` at a time: {output: [N, ...] float32}."""
    parts: dict[str, list] = {}
    for sl in _chunks(len(pixels), chunk):
        for name, value in runner.infer(image_feed(runner, pixels[sl], images[sl])).items():
            parts.setdefault(name, []).append(np.asarray(value, dtype=np.float32))
    return {name: np.concatenate(v) for name, v in parts.items()}


def native_inputs(ckpt, images: list, opts: LedgerOptions) -> list[np.ndarray]:
    """Each image at its own native size: [(1, 3, h', w')], as the served --preprocess native computes it."""
    from triton_repo.modes import native_pixels

    return [native_pixels(ckpt.processor, image, ckpt.patch_size, opts.native_max_pixels, opts.native_min_pixels,
                          opts.resize_factor) for image in images]


def run_native(runner: Runner, inputs: list[np.ndarray], token_outputs: set[str],
               skipped: dict[int, str] | None = None) -> dict[str, np.ndarray]:
    """Every photo alone (the sizes differ): token outputs as all tokens of every photo [sum L, C], the others
    one row per photo [N, ...]. With `skipped` given, a photo whose size none of an engine's optimization
    profiles holds is left out and recorded there ({index: reason}) instead of failing the stage."""
    parts: dict[str, list] = {}
    for i, x in enumerate(inputs):  # (1, 3, h', w')
        try:
            out = runner.infer(image_feed(runner, x))
        except ShapeOutsideProfilesError as exc:
            if skipped is None:
                raise
            skipped[i] = str(exc)
            continue
        for name, value in out.items():
            value = np.asarray(value, dtype=np.float32)
            parts.setdefault(name, []).append(value[0] if name in token_outputs else value)
    return {name: np.concatenate(v) for name, v in parts.items()}


def native_subset(reference: dict[str, np.ndarray], inputs: list[np.ndarray], keep: list[int],
                  token_outputs: set[str], patch: int) -> dict[str, np.ndarray]:
    """run_native's output restricted to the photos `keep` (token outputs: their tokens, in order)."""
    tokens = [x.shape[2] * x.shape[3] // (patch * patch) for x in inputs]  # patch tokens per photo
    out = {}
    for name, value in reference.items():
        if name not in token_outputs:
            out[name] = value[keep]
            continue
        extra = (len(value) - sum(tokens)) // len(inputs)  # class/register tokens per photo (0 or 1)
        bounds = np.cumsum([0] + [t + extra for t in tokens])
        out[name] = np.concatenate([value[bounds[i]:bounds[i + 1]] for i in keep])
    return out


def native_invariant_batch(inputs: list[np.ndarray]) -> np.ndarray:
    """Distinct inputs of one native size for the batch invariants: the first photo and its flips (4, 3, h', w')."""
    x = inputs[0][0]  # (3, h', w')
    return np.ascontiguousarray(np.stack([x, x[:, :, ::-1], x[:, ::-1, :], x[:, ::-1, ::-1]]))


def run_ledger(opts: LedgerOptions, log: Callable[[str], None] = print) -> Ledger:
    from tqdm.auto import tqdm

    from export.core.images import held_out_photos, pixel_values
    from export.core.preprocessing import NATIVE_MIN_PIXELS
    from parity_tests.invariants import check_invariants

    start = time.perf_counter()
    artifacts = Path(opts.artifacts)
    manifest = read_manifest(artifacts)
    try:
        groups = resolve_groups(opts.stages)
    except Exception as exc:
        raise LedgerInputError(str(exc)) from None
    out = Path(opts.out) if opts.out is not None else artifacts / LEDGER_DIR
    out.mkdir(parents=True, exist_ok=True)
    work = out / "stages"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()

    log(f"[1/5] Loading the PyTorch reference ({manifest.checkpoint or 'demo'}) ...")
    ckpt = reference_checkpoint(manifest)
    shape = export_shape(manifest)
    names = list(ckpt.family.output_names(shape.hidden_layer))
    pooled = ckpt.family.pooled_output
    table = ledger_thresholds(ckpt.family.tolerances, pooled)
    photos = held_out_photos(opts.photos)
    if len(photos) < 3:
        raise LedgerInputError(f"--photos {opts.photos}: nearest-neighbour agreement needs at least 3 images")
    images = [p.image for p in photos]
    native = opts.native_max_pixels is not None
    token_outputs = {n for n in names if n != pooled}
    if native:
        if not shape.dynamic_resolution:
            raise LedgerInputError(f"--native-max-pixels needs a --dynamic-resolution export; {artifacts} takes "
                                   f"only {shape.height}x{shape.width}")
        inputs = native_inputs(ckpt, images, opts)  # [(1, 3, h', w')]
        pixels = native_invariant_batch(inputs)  # (4, 3, h', w'): invariants and layers
        images = [images[0]] * len(pixels)
        with TorchRunner(ckpt, shape) as torch_runner:
            reference = run_native(torch_runner, inputs, token_outputs)
        sizes = sorted({tuple(x.shape[2:]) for x in inputs})
        log(f"      {len(photos)} held-out photographs at their native sizes ({len(sizes)} distinct, "
            f"{sizes[0][0]}x{sizes[0][1]} .. {sizes[-1][0]}x{sizes[-1][1]})")
    else:
        pixels = pixel_values(ckpt.processor, images, (shape.height, shape.width)).numpy()  # (N, 3, H, W)
        with TorchRunner(ckpt, shape) as torch_runner:
            reference = run_on_photos(torch_runner, pixels, images, REFERENCE_CHUNK)
        log(f"      {len(photos)} held-out photographs at {shape.height}x{shape.width}")

    log(f"[2/5] Making the stages ({', '.join(groups)}) in {work} ...")
    stages, facts = plan_stages(ckpt, shape, manifest, artifacts, work, groups, opts.url, log)

    max_batch = manifest.max_batch
    inv_batch = min(max_batch, opts.invariant_max_batch or INVARIANT_MAX_BATCH)
    ledger = Ledger(out)
    rows: list[dict] = []
    invariants: dict[str, list] = {}
    log(f"[3/5] Running {sum(s.skip_reason is None for s in stages)} stages on the photographs ...")
    for stage in tqdm(stages, desc="      stages", leave=False):
        if native and stage.kind == "triton" and not stage.skip_reason:
            # the served crop ensemble preprocesses to its own size (tests/triton_repo/test_triton_anyres.py: native)
            stage.skip_reason = "native mode compares pixel-fed stages; the served ensemble crops"
        if stage.skip_reason:
            continue
        with contextlib.ExitStack() as active:  # the runner is deactivated whatever happens
            expected = reference
            try:
                runner = active.enter_context(make_runner(stage, names, artifacts, opts.url, opts.triton_model))
                if native:
                    skipped: dict[int, str] = {}
                    actual = run_native(runner, inputs, token_outputs, skipped)
                    if skipped:  # an engine's profiles may not hold every native size: measure the rest
                        first = next(iter(skipped.values()))
                        stage.notes.append(f"{len(skipped)} of {len(inputs)} photos skipped, no optimization "
                                           f"profile holds their size (first: {first})")
                        keep = [i for i in range(len(inputs)) if i not in skipped]
                        expected = native_subset(reference, inputs, keep, token_outputs, ckpt.patch_size)
                else:
                    actual = run_on_photos(runner, pixels, images, min(REFERENCE_CHUNK, max_batch))
            except Exception as exc:  # a stage that cannot run is a failure, said in one line
                first = str(exc).splitlines()[0][:300] if str(exc) else ""
                stage.notes.append(f"could not run: {type(exc).__name__}: {first}")
                ledger.checks.append(LedgerCheck(stage.name, "run", "max_abs", float("inf"), 0.0, stage.enforced))
                continue
            for name in names:
                if name not in actual:
                    stage.notes.append(f"{name} is not served by this stage")
                    continue
                m = measure(expected[name], actual[name])
                if name == pooled and len(actual[name]) >= 3:
                    m.update(nn_agreement(expected[name], actual[name]))
                rows.append({"stage": stage.name, "output": name, **m})
                for metric, threshold in thresholds(table, stage.precision, name).items():
                    if metric in m:
                        ledger.checks.append(LedgerCheck(stage.name, name, metric, m[metric], threshold,
                                                         stage.enforced))
            try:
                results = check_invariants(runner, pixels, images, inv_batch)
            except ShapeOutsideProfilesError as exc:  # native engines take one image at a time
                stage.notes.append(f"batch invariants skipped: {str(exc).splitlines()[0]}")
                continue
        invariants[stage.name] = [r.to_json() for r in results]
        for r in results:
            for metric, threshold in thresholds(table, stage.precision, "invariants").items():
                ledger.checks.append(LedgerCheck(stage.name, "invariants", metric, r.worst_rel_l2, threshold,
                                                 stage.enforced, case=r.name))

    log("[4/5] Per-layer divergence ...")
    layers, layer_notes = _layers(ckpt, stages, pixels[:LAYER_IMAGES])

    ledger.data = {
        "artifacts": str(artifacts),
        "model": manifest.model,
        "deployed_precision": manifest.precision,
        "image_size": [shape.height, shape.width],
        "native": None if not native else {
            "factor": opts.resize_factor or 2 * ckpt.patch_size,
            "min_pixels": NATIVE_MIN_PIXELS if opts.native_min_pixels is None else opts.native_min_pixels,
            "max_pixels": opts.native_max_pixels, "sizes": [list(x.shape[2:]) for x in inputs]},
        "photos": [p.name for p in photos],
        "reference": type(ckpt.model).__module__.split(".")[0] + " " + type(ckpt.model).__name__
                     + " (fp32, eval) on the same pixel_values",
        "stages": [s.to_json() for s in stages],
        "facts": facts,
        "metrics": {k: {"direction": d, "meaning": m} for k, (d, m) in LEDGER_METRICS.items()},
        "thresholds": table,
        "measured": rows,
        "invariants": {"max_batch_tried": inv_batch, "results": invariants},
        "layers": layers,
        "layer_notes": layer_notes,
    }
    log("[5/5] Writing parity.json, ledger.md and plots ...")
    ledger.data["seconds"] = round(time.perf_counter() - start, 1)
    files = _write(ledger, rows, layers, opts.plots)
    if not opts.keep_stages:
        shutil.rmtree(work, ignore_errors=True)
    log(ledger.checklist())
    log(f"wrote {', '.join(str(f) for f in files)}")
    return ledger


def _layers(ckpt, stages: list[Stage], pixels: np.ndarray) -> tuple[dict, list[str]]:
    """{"map": LayerMap json, "stages": {stage: rows}} over the fp32 (custom), fp16 and int8 graphs."""
    from parity_tests.layers import layer_divergence, locate_layers, reference_hidden_states

    notes: list[str] = []
    runnable = {s.name: s for s in stages if s.kind == "onnx" and s.skip_reason is None and s.enforced}
    fp32 = next((s for s in runnable.values() if s.precision == "fp32" and s.name != "deployed"), None) \
        or next((s for s in runnable.values() if s.precision == "fp32"), None)
    if fp32 is None:
        return {}, ["no fp32 ONNX stage: per-layer tensors are located in an fp32 graph (add --stages fp32)"]
    reference = reference_hidden_states(ckpt, pixels)
    assert fp32.path is not None  # every onnx stage has its graph
    layer_map = locate_layers(fp32.path, reference, pixels)
    missing = [i for i, n in enumerate(layer_map.names) if n is None]
    if missing:
        notes.append(f"hidden states {missing} not found in {fp32.name} (no tensor within relative L2 "
                     "1e-4 of PyTorch's)")
    series = {}
    for name in [fp32.name] + [n for n in ("fp16", "int8") if n in runnable] + \
            (["deployed"] if "deployed" in runnable and runnable["deployed"].precision != "fp32" else []):
        stage = runnable[name]
        assert stage.path is not None
        series[name] = layer_divergence(stage.path, layer_map, reference, pixels, mode="exact")
        lost = [r["layer"] for r in series[name] if r["tensor"] and r["rel_l2"] is None]
        if lost:
            notes.append(f"{name}: the recipe renamed or removed the tensors of layers {lost}")
    return {"map": layer_map.to_json(), "images": int(len(pixels)), "stages": series}, notes


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v == float("inf"):
            return "inf"
        return f"{v:.6f}" if 0.001 <= abs(v) <= 1.0 else f"{v:.3g}"
    return str(v)


def markdown(ledger: Ledger) -> str:
    d = ledger.data
    model = d["model"]
    lines = [f"# Parity ledger: {model.get('source')} ({model.get('family')})", "",
             f"Export folder `{d['artifacts']}`, deployed precision **{d['deployed_precision']}**, "
             f"{len(d['photos'])} held-out photographs "
             f"(views of {', '.join(sorted({p.split('/')[0] for p in d['photos']}))}) "
             + (f"at {d['image_size'][0]}x{d['image_size'][1]}" if not d.get("native") else
                f"each at its native size (smart_resize, max_pixels {d['native']['max_pixels']})")
             + f". Reference: {d['reference']}.", "",
             "## Stages", "", "| stage | precision | what | status |", "|---|---|---|---|"]
    for s in d["stages"]:
        status = (f"skipped: {s['skip_reason']}" if s["skip_reason"]
                  else "judged" if s["enforced"] else "reported, not judged")
        notes = "; ".join(s["notes"])
        lines.append(f"| {s['name']} | {s['precision']} | {s['description']}{' — ' + notes if notes else ''} "
                     f"| {status} |")
    cols = ["max_abs", "mean_abs", "min_cosine", "rel_l2", "sqnr_db", "nn_top1", "nn_top5"]
    lines += ["", "## Each stage against PyTorch", "", "| stage | output | " + " | ".join(cols) + " |",
              "|---|---|" + "---|" * len(cols)]
    for r in d["measured"]:
        lines.append(f"| {r['stage']} | {r['output']} | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    lines += ["", "## Batch invariants (worst relative L2 between a row and the same row elsewhere)", "",
              f"Batch sizes tried up to {d['invariants']['max_batch_tried']}.", "",
              "| stage | identical rows | batch size | slot |", "|---|---|---|---|"]
    for stage, results in d["invariants"]["results"].items():
        by = {r["name"]: r["worst_rel_l2"] for r in results}
        lines.append(f"| {stage} | {_fmt(by.get('identical rows'))} | {_fmt(by.get('batch size'))} "
                     f"| {_fmt(by.get('slot'))} |")
    layers = d.get("layers") or {}
    if layers.get("stages"):
        series = layers["stages"]
        lines += ["", "## Per-layer divergence (relative L2 of each hidden state; 0 = embeddings)", "",
                  "| layer | " + " | ".join(series) + " |", "|---|" + "---|" * len(series)]
        depth = max(len(v) for v in series.values())
        for i in range(depth):
            cells = (_fmt(v[i]["rel_l2"]) if i < len(v) else "–" for v in series.values())
            lines.append(f"| {i} | " + " | ".join(cells) + " |")
    for note in d.get("layer_notes", []):
        lines.append(f"\nNote: {note}")
    lines += ["", "## Thresholds (data: export.models.families.TOLERANCES + parity_tests.agreement.LEDGER_EXTRA)", "",
              "```json", json.dumps(d["thresholds"], indent=1, sort_keys=True), "```", "",
              "## Checklist", "", "```", ledger.checklist(), "```", "",
              f"**{'PASSED' if ledger.passed else 'FAILED'}**", ""]
    return "\n".join(lines)


def _write(ledger: Ledger, rows: list[dict], layers: dict, plots: bool) -> list[Path]:
    out = ledger.out
    files = []
    payload = {"passed": ledger.passed, **ledger.data,
               "checks": [c.to_json() for c in ledger.checks]}
    (out / LEDGER_JSON).write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    files.append(out / LEDGER_JSON)
    (out / LEDGER_MD).write_text(markdown(ledger))
    files.append(out / LEDGER_MD)
    if plots:
        from export.check.plots import plot_layers, plot_stages

        title = f"{ledger.data['model'].get('source')} — deployed {ledger.data['deployed_precision']}"
        if rows:
            files.append(plot_stages(rows, out / LEDGER_STAGES_PNG, title))
        if layers.get("stages"):
            files.append(plot_layers(layers["stages"], out / LEDGER_LAYERS_PNG, "Per-layer divergence — " + title))
    return files


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def parser() -> argparse.ArgumentParser:
    from parity_tests.stages import STAGE_GROUPS

    p = argparse.ArgumentParser(prog="python -m parity_tests", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_artifacts(p, required=True)
    p.add_argument("--out", type=Path, help="where to write the ledger (default: DIR/ledger)")
    p.add_argument("--stages", nargs="+", metavar="STAGE",
                   help=f"stage groups to run (default: all): {' '.join(STAGE_GROUPS)}")
    add_url(p, note="HTTP, serving this folder: adds the triton stage")
    add_served_model(p, aliases=["--triton-model"])
    p.add_argument("--photos", type=int, help="how many held-out photo views to use (default: every view of "
                                                      "export.core.images.held_out_photos)")
    p.add_argument("--invariant-max-batch", type=int,
                   help=f"largest batch for the invariants (default: min(max_batch, {INVARIANT_MAX_BATCH}))")
    add_native_budget_arguments(p, "native mode", prefix="native-", max_help=(
        "native mode (a --dynamic-resolution export): each photo resized by smart_resize within this pixel "
        "budget and encoded at its own grid, as --preprocess native serves it"))
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    p.add_argument("--discard-stages", action="store_true", help="delete OUT/stages (the graphs made) at the end")
    return p


@command(LedgerInputError, ImportError)
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    opts = LedgerOptions(args.artifacts, args.out, args.stages, args.url, args.served_model, args.photos,
                         args.invariant_max_batch, not args.no_plots, not args.discard_stages,
                         args.native_max_pixels, args.native_min_pixels, args.resize_factor)
    ledger = run_ledger(opts)  # LedgerInputError, an MvtError or a missing package: exit 2 (command())
    return EXIT_OK if ledger.passed else EXIT_FAILED
