"""The export folder's manifest.json: its one reader, its one writer, one accessor per field.

export/pipeline.py writes a manifest and export/rebuild.py rewrites it, both through `write_manifest`,
which stamps the layout version (`schema`). Everything else reads it through `read_manifest(DIR)`, or
`Manifest.of(dict)` for one already in memory: both run `upgrade` first, the one place that knows older
layouts, and give a `Manifest`, whose properties are the only readers of the fields. A field that an
older manifest may lack has its one fallback in its property.

Layouts (`schema`):
    none  every manifest before the key (mvt-deploy 0.1.0 until it): read as it is, except the engine entry
          of the first exports, {"built", "tensorrt": <version>, "profiles"}, which becomes
          {"built", "runtime": "tensorrt", "version": <version>, "profiles"} as written since TensorRT-RTX
    1     the same fields, and `schema`

A manifest with a newer `schema` than SCHEMA is refused: the mvt-deploy that wrote it knows fields this
one would misread.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Union

from export import __version__
from export.core.errors import OptionError
from export.core.folder import MANIFEST_NAME, write_json

# The layout this version writes. Manifests without the key are older layouts (read as 0): 1 is the first
# layout that says which it is.
SCHEMA = 1
# interface.max_batch's fallback: BuildOptions.max_batch's default (the CLI's --max-batch), the batch an
# export records when not told another. Every manifest written so far records the field.
DEFAULT_MAX_BATCH = 32
# What the one-vector-per-image output was called before families named theirs (UNICOM: embedding).
LEGACY_POOLED_OUTPUT = "pooler_output"
# The runtime of an engine entry that names none: the first exports had only datacenter TensorRT.
LEGACY_ENGINE_RUNTIME = "tensorrt"
# The attention form of graphs exported before --attention: the traced MatMul/Softmax/MatMul.
LEGACY_ATTENTION_LOWERING = "decomposed"
ENGINE_PARITY_NOTE = "not measured here: running an engine needs a GPU (scripts/gpu_check.sh)"
# What engine_history keeps of an engine the rebuild replaced.
HISTORY_KEYS = ("built", "runtime", "version", "gpu", "compute_capabilities", "profiles", "sha256", "built_at",
                "reason")


def upgrade(manifest: dict, where: str = "the manifest") -> dict:
    """`manifest` in this version's layout (a new dict, `schema` first): the one place that reads older
    layouts. Refuses a newer layout than SCHEMA, and a `schema` that is not a version."""
    schema = manifest.get("schema", 0)
    if isinstance(schema, bool) or not isinstance(schema, int) or schema < 0:
        raise OptionError(f"{where} has schema {schema!r}, which is not a layout version; re-export the folder "
                          "with python -m export.build_engine")
    if schema > SCHEMA:
        raise OptionError(f"{where} has manifest schema {schema}, newer than this mvt-deploy ({__version__}) reads "
                          f"(schema {SCHEMA} and older): upgrade mvt-deploy (pip install --upgrade mvt-deploy) to "
                          "use this folder")
    upgraded = copy.deepcopy(manifest)
    upgraded.pop("schema", None)
    if schema < 1:
        engine = upgraded.get("engine")
        if isinstance(engine, dict) and "runtime" not in engine and "tensorrt" in engine:
            upgraded["engine"] = _named_runtime(engine)
    return {"schema": SCHEMA, **upgraded}


def _named_runtime(engine: dict) -> dict:
    """A first-exports engine entry, {"tensorrt": version} in place of {"runtime": "tensorrt", "version": ...}."""
    renamed: dict = {}
    for key, value in engine.items():
        if key == "tensorrt":
            renamed.update(runtime=LEGACY_ENGINE_RUNTIME, version=value)
        else:
            renamed[key] = value
    return renamed


def read_manifest(artifacts: Path) -> Manifest:
    """DIR/manifest.json, upgraded to this layout and checked for the sections every reader needs."""
    artifacts = Path(artifacts)
    path = artifacts / MANIFEST_NAME
    if not artifacts.is_dir():
        raise OptionError(f"--artifacts {artifacts} is not a folder; pass an export folder "
                          "(python -m export.build_engine --out DIR)")
    if not path.is_file():
        raise OptionError(f"{artifacts} has no {MANIFEST_NAME}; pass the folder export.build_engine wrote")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise OptionError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise OptionError(f"{path} is not a manifest (a JSON object); pass the folder export.build_engine wrote")
    manifest = upgrade(raw, str(path))
    for key in ("options", "model", "interface"):
        if key not in manifest:
            raise OptionError(f"{path} has no {key!r}; re-export the folder with this version")
    return Manifest(manifest)


def write_manifest(folder: Path, manifest: dict) -> dict:
    """Write DIR/manifest.json (temp + rename) stamped with this layout's SCHEMA, its first key; return what
    was written."""
    stamped = {"schema": SCHEMA, **{k: v for k, v in manifest.items() if k != "schema"}}
    write_json(Path(folder) / MANIFEST_NAME, stamped)
    return stamped


class _Target(Protocol):
    """What the engine entry takes of export.engine.EngineTarget (a layer above this one)."""

    @property
    def runtime(self) -> str: ...

    @property
    def version(self) -> str | None: ...

    @property
    def gpu(self) -> dict: ...


def engine_entry(target: _Target, *, onnx: str, rope_lowering: str, facts: dict | None = None,
                 failure: str | None = None, attention_lowering: str | None = None, **extra: Any) -> dict:
    """The manifest's `engine` entry for a build attempted for `target` from the graph `onnx` (its RoPE in
    `rope_lowering`): built, with export.engine.build_engine's `facts` and what the caller adds (`extra`:
    the rebuild's sha256, built_at, ...); or failed, with `failure` (one line) when facts is None.
    pipeline.py and rebuild.py both record their builds with it (with the graph's `attention_lowering`)."""
    common = {"runtime": target.runtime, "version": target.version, "onnx": onnx, "rope_lowering": rope_lowering,
              **({} if attention_lowering is None else {"attention_lowering": attention_lowering}),
              "gpu": target.gpu}
    if facts is None:
        return {"built": False, "failed": True, **common, "reason": failure}
    return {"built": True, **common, **facts, **extra, "parity": ENGINE_PARITY_NOTE}


def no_engine(runtime: str, reason: str | None) -> dict:
    """The `engine` entry of an export that built none (no TensorRT here, --runtime none, ...)."""
    return {"built": False, "runtime": runtime, "reason": reason}


@dataclass(frozen=True)
class Artifact:
    """One file the manifest records (artifacts.<name>)."""

    sha256: str | None
    size: int | None  # bytes


@dataclass(frozen=True)
class EngineEntry:
    """The manifest's `engine` entry: the plan the folder holds, or why it holds none."""

    data: dict

    @property
    def built(self) -> bool:
        return bool(self.data.get("built"))

    @property
    def failed(self) -> bool:
        """A build was attempted and failed (engine_error.txt says how)."""
        return bool(self.data.get("failed"))

    @property
    def runtime(self) -> str:
        """tensorrt, tensorrt-rtx, or the runtime an export without an engine was asked for (none)."""
        return self.data.get("runtime") or LEGACY_ENGINE_RUNTIME

    @property
    def version(self) -> str | None:
        return self.data.get("version")

    @property
    def reason(self) -> str | None:
        """Why no plan was built (skipped or failed)."""
        return self.data.get("reason")

    @property
    def profiles(self) -> dict | list[dict] | None:
        """The optimization profile(s) the plan was built with (a dict is one); None: none recorded."""
        return self.data.get("profiles")

    @property
    def onnx(self) -> str | None:
        """The graph the plan was built from (engine.onnx, model.onnx, or the engine-<rope>-<attention>.onnx a rebuild
        lowered; older rebuilds: how model.onnx was lowered)."""
        return self.data.get("onnx")

    @property
    def rope_lowering(self) -> str | None:
        return self.data.get("rope_lowering")

    @property
    def attention_lowering(self) -> str:
        """The attention form of the graph the plan was built from; engines before --attention: the traced one."""
        return self.data.get("attention_lowering") or LEGACY_ATTENTION_LOWERING

    @property
    def gpu(self) -> dict:
        return self.data.get("gpu") or {}

    @property
    def compute_capabilities(self) -> list:
        return self.data.get("compute_capabilities") or []

    @property
    def optimization_level(self) -> int | None:
        return self.data.get("builder_optimization_level")

    def history_record(self) -> dict:
        """What engine_history keeps of this entry once a rebuild replaces it."""
        return {k: self.data.get(k) for k in HISTORY_KEYS if k in self.data}


ManifestLike = Union["Manifest", dict]


@dataclass(frozen=True)
class Manifest:
    """An upgraded manifest. `data` is the whole dict, for writers and for records that copy a section."""

    data: dict

    @classmethod
    def of(cls, manifest: ManifestLike, where: str = "the manifest") -> Manifest:
        """`manifest` as a Manifest; a dict (parsed JSON, BuildResult.manifest) is upgraded first."""
        return manifest if isinstance(manifest, Manifest) else cls(upgrade(manifest, where))

    def _section(self, name: str) -> dict:
        return self.data.get(name) or {}

    @property
    def schema(self) -> int:
        return int(self.data["schema"])

    # options: what the export was asked for (BuildOptions)

    @property
    def checkpoint(self) -> str | None:
        """What --model took: a folder, hub id, zoo alias or weights file; None: the bundled demo."""
        return self._section("options").get("model")

    @property
    def random_weights(self) -> bool:
        return bool(self._section("options").get("random_weights"))

    @property
    def projector(self) -> bool:
        """--projector: a VLM checkpoint exported with its multi_modal_projector (the graph's output: image_embeds)."""
        return bool(self._section("options").get("projector"))

    @property
    def num_heads(self) -> int | None:
        """Attention heads given for a released weights file (UNICOM .pt); None: derived from the width."""
        return self._section("options").get("num_heads")

    @property
    def image_size(self) -> list[int] | None:
        """--image-size; None: the checkpoint's native size."""
        return self._section("options").get("image_size")

    @property
    def rope(self) -> str:
        """--rope as asked (the lowering model.onnx got is rope_lowering)."""
        return self._section("options").get("rope") or "auto"

    @property
    def attention(self) -> str:
        """--attention as asked (the form model.onnx got is attention_lowering)."""
        return self._section("options").get("attention") or "auto"

    @property
    def quant_target(self) -> str:
        """The int8/fp8 graph form; exports before --quant-target were all shaped for TensorRT."""
        return self._section("options").get("quant_target") or "tensorrt"

    @property
    def calibration_options(self) -> dict:
        """calib_images, calib_method, calib_count as given (the precision recipe's calibration)."""
        options = self._section("options")
        return {"calib_images": options.get("calib_images"), "calib_method": options.get("calib_method") or "max",
                "calib_count": options.get("calib_count")}

    # model: the checkpoint

    @property
    def model(self) -> dict:
        """The section as recorded, for records that carry it (the ledger, mvt_repository.json)."""
        return self._section("model")

    @property
    def source(self) -> str | None:
        return self.model.get("source")

    @property
    def family(self) -> str | None:
        return self.model.get("family")

    @property
    def hidden_size(self) -> int | None:
        return self.model.get("hidden_size")

    @property
    def num_hidden_layers(self) -> int | None:
        return self.model.get("num_hidden_layers")

    @property
    def num_attention_heads(self) -> int | None:
        return self.model.get("num_attention_heads")

    @property
    def patch_size(self) -> int:
        return int(self.model["patch_size"])

    @property
    def vlm(self) -> dict:
        """A LLaVA-NeXT / LLaVA-OneVision checkpoint's image-side settings (export.models.vlm.VlmSettings: projector,
        text_hidden_size, vision_feature_layer, image_grid_pinpoints, image_token_id, ...); {}: a tower checkpoint."""
        return self.data.get("vlm") or {}

    @property
    def native_image_size(self) -> tuple[int, int]:
        h, w = self.model["native_image_size"]
        return int(h), int(w)

    @property
    def prefix_tokens(self) -> int:
        """Tokens before the patch tokens (1: a class token); older manifests are all class-token models."""
        value = self.model.get("prefix_tokens")
        return 1 if value is None else int(value)

    # interface: the deployed graph's tensors

    @property
    def _interface(self) -> dict:
        return self._section("interface")

    @property
    def input_name(self) -> str:
        (name, _), = self._interface["inputs"].items()
        return name

    @property
    def input_shape(self) -> list:
        """[batch, 3, H, W], "height"/"width" for a dynamic-resolution graph."""
        (_, info), = self._interface["inputs"].items()
        return list(info["shape"])

    @property
    def output_shapes(self) -> dict[str, list]:
        """Output name -> shape, in interface order; symbolic axes by name (batch, sequence)."""
        return {name: list(info.get("shape") or []) for name, info in (self._interface.get("outputs") or {}).items()}

    @property
    def output_names(self) -> list[str]:
        """The deployed graph's outputs, in interface order."""
        return list(self._interface.get("outputs") or {})

    @property
    def pooled_output(self) -> str:
        """The one-vector-per-image output (UNICOM: embedding); manifests written before families named
        theirs have pooler_output; "" for a graph without one (--projector: image_embeds only)."""
        value = self._interface.get("pooled_output")
        return LEGACY_POOLED_OUTPUT if value is None else value

    @property
    def hidden_layer(self) -> int | None:
        """--hidden-layer N (its output: hidden_state); None: none."""
        return self._interface.get("hidden_layer")

    @property
    def dynamic_resolution(self) -> bool:
        return bool(self._interface.get("dynamic_resolution"))

    @property
    def native_budget(self) -> dict | None:
        """The native mode's budget a dynamic-resolution engine holds (factor, min_pixels, max_pixels); None:
        a fixed-size export, or one from before the budget was recorded."""
        return self._interface.get("native_budget")

    @property
    def max_batch(self) -> int:
        """--max-batch of the export (a rebuilt plan may have another: its engine profile says)."""
        return int(self._interface.get("max_batch") or DEFAULT_MAX_BATCH)

    @property
    def traced_size(self) -> tuple[int, int]:
        """(H, W) model.onnx was traced at: --image-size, else the native size (the centre of a
        dynamic-resolution engine's batched profile)."""
        size = self.image_size
        return (int(size[0]), int(size[1])) if size else self.native_image_size

    # the graph, its engine and its files

    @property
    def precision(self) -> str:
        return self.data.get("precision") or "fp32"

    @property
    def precision_recipe(self) -> dict:
        """What the precision recipe did (calibration, smoothing, ...); {}: not recorded."""
        return self.data.get("precision_recipe") or {}

    @property
    def rope_lowering(self) -> str:
        """model.onnx's RoPE lowering (none: no RoPE in the model); the engine's is engine.rope_lowering."""
        return self.data["rope_lowering"]

    @property
    def attention_lowering(self) -> str:
        """model.onnx's attention form (export.graph.attention); exports before --attention kept the traced
        MatMul/Softmax/MatMul (decomposed)."""
        return self.data.get("attention_lowering") or LEGACY_ATTENTION_LOWERING

    @property
    def engine(self) -> EngineEntry:
        return EngineEntry(self._section("engine"))

    @property
    def engine_history(self) -> list[dict]:
        """The engines rebuilds replaced, oldest first (EngineEntry.history_record)."""
        return list(self.data.get("engine_history") or [])

    @property
    def artifacts(self) -> dict[str, Artifact]:
        """Every file the export recorded (not manifest.json itself), by name."""
        return {name: Artifact(meta.get("sha256"), meta.get("bytes"))
                for name, meta in self._section("artifacts").items()}

    def sha256(self, name: str) -> str | None:
        """The recorded sha256 of the file `name`; None: not recorded."""
        record = self.artifacts.get(name)
        return None if record is None else record.sha256

    @property
    def parity_passed(self) -> bool | None:
        """The export's parity verdict; None: not run (--skip-parity)."""
        parity = self.data.get("parity")
        return None if not parity else parity.get("passed")

    @property
    def parity_worst(self) -> dict:
        """The worst value of each metric per output; {}: parity not run."""
        return (self.data.get("parity") or {}).get("worst") or {}

    @property
    def onnx_checker(self) -> str | None:
        """"passed", or onnx.checker's complaint; None: not recorded."""
        return self.data.get("onnx_checker")

    @property
    def timings_s(self) -> dict:
        return self.data.get("timings_s") or {}

    def with_engine(self, entry: dict, plan: str, sha256: str, size: int) -> dict:
        """This manifest with `entry` as its engine, the engine it replaces kept in engine_history, and the
        plan `plan` recorded among the artifacts (the rebuild's rewrite; write it with write_manifest)."""
        history = self.engine_history
        if self.engine.data:
            history.append(self.engine.history_record())
        return {**self.data, "engine": entry, "engine_history": history,
                "artifacts": {**self._section("artifacts"), plan: {"sha256": sha256, "bytes": size}}}
