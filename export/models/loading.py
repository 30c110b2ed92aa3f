"""Load a checkpoint: a local Hugging Face folder, a hub id, a released weights file (UNICOM `.pt`),
a zoo alias or the bundled demo.

Safetensors (or `torch.load(weights_only=True)` for released `.pt` files) and no remote code: a
checkpoint is data, never code we execute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.core.errors import CheckpointError
from export.core.folder import PREPROCESSOR_CONFIG
from export.core.interface import CLIP_MEAN, CLIP_STD
from export.core.manifest import Manifest, ManifestLike
from export.models.families import ModelFamily, family_for_model_type, family_for_weights_file
from export.models.zoo import DEMO, DEMO_SEED, ZooEntry, release_named, zoo_entry

HUB_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", PREPROCESSOR_CONFIG]


@dataclass
class Checkpoint:
    """A loaded encoder in fp32 eval mode, with what is needed to feed it."""

    model: Any  # transformers PreTrainedModel
    family: ModelFamily
    processor: Any  # CLIP image processor
    source: str  # what the user asked for
    folder: Path | None  # where config/weights came from (None for built-in architectures and weight files)
    random_weights: bool
    # A LLaVA-NeXT / LLaVA-OneVision checkpoint: its image-side settings (export.models.vlm.VlmSettings) and
    # image_newline (numpy (H_llm,) or None); None for a tower checkpoint.
    vlm: Any = None
    image_newline: Any = None

    _config: Any = None  # kept when the model is released

    def __getstate__(self) -> dict:
        # Across the PyTorch child -> parent pickle the processor and the config travel as plain data:
        # unpickling the transformers objects would import transformers and torch in the parent (6-7 s here,
        # ~300 MB), which an fp32 build never needs there.
        state = dict(self.__dict__)
        if self.processor is not None and not isinstance(self.processor, _Deferred):
            state["processor"] = ProcessorJson(self.processor)
        if self.model is None and self._config is not None and not isinstance(self._config, _Deferred):
            state["_config"] = ConfigDict(self._config)
        return state

    @property
    def config(self):
        return self.model.config if self.model is not None else self._config

    def release_model(self) -> None:
        """Free the PyTorch weights (7.4 GB for bigG in fp32) once nothing needs to run them; the
        config, processor and family stay."""
        import gc

        if self.model is not None:
            self._config, self.model = self.model.config, None
            gc.collect()

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.config.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def patch_size(self) -> int:
        p = self.config.patch_size
        return p if isinstance(p, int) else p[0]


def load_checkpoint(model: str | None = None, *, random_weights: bool = False, seed: int = DEMO_SEED,
                    num_heads: int | None = None, projector: bool = False) -> Checkpoint:
    """Resolve `model` (None: the demo) and load it through transformers. num_heads: attention heads of a
    released weights file (None: inferred, hidden / 64 for UNICOM). projector: a VLM checkpoint's tower with its
    multi_modal_projector (export.models.vlm); refused for anything else."""
    if projector:
        return _projector_checkpoint(model, random_weights)
    if model is None:
        if num_heads is not None:
            raise CheckpointError("--num-heads applies to released weights files (UNICOM .pt), not the demo")
        return _from_architecture(DEMO, source="demo", seed=seed)
    entry = zoo_entry(model)
    if num_heads is not None and (random_weights or entry is None or entry.release is None):
        path = Path(model).expanduser()
        if random_weights or not (path.is_file() and family_for_weights_file(path) is not None):
            # a config.json or a zoo architecture already names its heads
            raise CheckpointError(f"--num-heads applies to released weights files (UNICOM .pt); {model!r} "
                                  "names its attention heads itself")
    if random_weights:
        if entry is None:
            raise CheckpointError(
                f"--random-weights needs a zoo architecture ({', '.join(_aliases())}); got {model!r}"
            )
        return _from_architecture(entry, source=entry.alias, seed=seed)
    if entry is not None and entry.release is not None:
        from export.models.download import fetch_release

        return load_weights_file(fetch_release(entry.release, entry.alias), source=model, num_heads=num_heads)
    path = Path(model).expanduser()
    if path.is_file() and family_for_weights_file(path) is not None:
        return load_weights_file(path, source=model, num_heads=num_heads)
    folder = _local_or_download(entry.hub_id if entry else model)
    return load_folder(folder, source=model)


def load_weights_file(path: Path, source: str | None = None, num_heads: int | None = None) -> Checkpoint:
    """A family's released single weights file (UNICOM `.pt`): architecture from the tensor shapes,
    preprocessing CLIP's at the model's resolution (what the releases use)."""
    path = Path(path)
    family = family_for_weights_file(path)
    if family is None or family.weights_file is None:
        known = ", ".join(s for f in _file_families() for s in f.weights_file.suffixes)
        raise CheckpointError(f"{path} is not a weights file mvt-deploy knows ({known}); pass a checkpoint folder")
    model = family.weights_file.load(path, num_heads)
    return Checkpoint(model, family, load_processor(None, model.config), source or str(path), None, False)


def load_folder(folder: Path, source: str | None = None) -> Checkpoint:
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no config.json; pass a Hugging Face checkpoint folder")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from None
    if not model_type:
        raise CheckpointError(f"{config_path} has no model_type")
    from export.models.vlm import vlm_model_type

    if vlm_model_type(folder):  # a LLaVA-NeXT / LLaVA-OneVision checkpoint: its tower, as a tower checkpoint
        return load_vlm_folder(folder, source=source, projector=False)
    family = family_for_model_type(model_type)
    _check_weights(folder)

    import torch

    # CLIPVisionModel reads a full "clip" checkpoint's vision_config and vision_model.* weights.
    model_class: Any = family.model_class()  # a transformers PreTrainedModel class
    model = model_class.from_pretrained(
        folder, use_safetensors=True, trust_remote_code=False, dtype=torch.float32
    )
    model.eval()
    return Checkpoint(model, family, load_processor(folder, model.config), source or str(folder), folder, False)


def load_vlm_folder(folder: Path, source: str | None = None, projector: bool = False) -> Checkpoint:
    """A LLaVA-NeXT / LLaVA-OneVision checkpoint's image side: its tower, or with `projector` the module from
    pixel_values to image_embeds (export.models.vlm); the processor makes one tile as the VLM's makes each view."""
    from export.models.vlm import load_vlm, tile_processor_kwargs

    _check_weights(folder)
    parts = load_vlm(folder, projector)
    processor = _processor_class()(**tile_processor_kwargs(parts.processor_config, parts.settings.tile_size))
    return Checkpoint(parts.model, parts.family, processor, source or str(folder), folder, False,
                      vlm=parts.settings, image_newline=parts.image_newline)


def _projector_checkpoint(model: str | None, random_weights: bool) -> Checkpoint:
    from export.models.vlm import VLM_ARCHITECTURES, vlm_model_type

    kinds = " or ".join(VLM_ARCHITECTURES)
    if model is None or random_weights:
        raise CheckpointError(f"--projector exports a VLM checkpoint's tower with its multi_modal_projector; pass "
                              f"a {kinds} checkpoint folder with --model (and no --random-weights)")
    folder = _local_or_download(model) if zoo_entry(model) is None else None
    if folder is None or not vlm_model_type(folder):
        raise CheckpointError(f"--projector needs a {kinds} checkpoint (config.json model_type); {model!r} is not "
                              "one: drop --projector to export an encoder checkpoint")
    return load_vlm_folder(folder, source=model, projector=True)


def _from_architecture(entry: ZooEntry, source: str, seed: int) -> Checkpoint:
    import torch

    family = family_for_model_type(entry.model_type)
    config = family.config_class()(**entry.config)
    torch.manual_seed(seed)  # seeded so that every run of the demo builds the same weights
    model = family.model_class()(config).eval()
    return Checkpoint(model, family, load_processor(None, config), source, None, True)


def load_processor(folder: Path | None, config):
    """The checkpoint's CLIPImageProcessor, or CLIP's defaults at the model's resolution."""
    cls = _processor_class()
    if folder is not None and (folder / PREPROCESSOR_CONFIG).is_file():
        return cls.from_pretrained(folder)
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
               image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)


def _processor_class():
    # The PIL processor needs no torchvision; transformers falls back to it anyway, with a warning.
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


def _check_weights(folder: Path) -> None:
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise CheckpointError(
            f"{folder} has only pickle weights ({', '.join(pickles)}); mvt-deploy loads safetensors only. "
            "Convert once where you trust the file: "
            "Model.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)"
        )
    raise CheckpointError(f"{folder} has no *.safetensors weights")


def _local_or_download(name: str) -> Path:
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            files = ", ".join(f"{s} ({f.name})" for f in _file_families() for s in f.weights_file.suffixes)
            raise CheckpointError(f"{path} is a file; pass the checkpoint folder that holds config.json, "
                                  f"or a released weights file: {files}")
        return path
    released = release_named(path.name)
    if released is not None and released.release is not None:
        raise CheckpointError(
            f"{name} does not exist; download it from {released.release.url}, or use --model {released.alias} "
            "(downloads it into the cache and verifies its SHA-256)")
    if _looks_like_path(name):
        raise CheckpointError(
            f"checkpoint folder {name} does not exist; pass a folder, a released weights file (UNICOM .pt), "
            f"a hub id (owner/name) or a zoo alias ({', '.join(_aliases())})"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except Exception as exc:  # offline, unknown repo, gated repo: all end the same way for the user
        raise CheckpointError(
            f"could not fetch {name!r} from the Hugging Face hub ({type(exc).__name__}: {_first_line(exc)}). "
            f"Download it where the hub is reachable (hf download {name}) and pass the folder, "
            f"or use a zoo alias ({', '.join(_aliases())}) with --random-weights to export the architecture"
        ) from None


def _file_families() -> list[Any]:
    from export.models.families import FAMILIES

    return [f for f in FAMILIES if f.weights_file is not None]


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or name.endswith("/")


def _aliases() -> list[str]:
    from export.models.zoo import ZOO

    return [e.alias for e in ZOO]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


def reference_checkpoint(manifest: ManifestLike):
    """The PyTorch model the folder was exported from, as its manifest names it."""
    from export.models.loading import load_checkpoint

    m = Manifest.of(manifest)
    return load_checkpoint(m.checkpoint, random_weights=m.random_weights, num_heads=m.num_heads,
                           projector=m.projector)


class _Deferred:
    """A transformers object as plain data, built on first use of anything the data does not hold."""

    def __init__(self) -> None:
        self._built: Any = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_built"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _built=None)

    def _build(self) -> Any:
        raise NotImplementedError

    @property
    def built(self) -> Any:
        if self._built is None:
            self._built = self._build()
        return self._built

    def __getattr__(self, name: str):
        if name.startswith("_"):  # pickle and copy probe dunders before __setstate__ has run
            raise AttributeError(name)
        return getattr(self.built, name)


class ProcessorJson(_Deferred):
    """A checkpoint's image processor as its JSON. Saving writes the bytes transformers' `save_pretrained`
    writes (its `to_json_string()`) with no transformers import; calling it builds the processor."""

    def __init__(self, processor: Any):
        super().__init__()
        self.json: str = processor.to_json_string()

    def _build(self) -> Any:
        return _processor_class().from_dict(json.loads(self.json))

    def save_pretrained(self, folder: Path | str) -> None:
        Path(folder, PREPROCESSOR_CONFIG).write_text(self.json)

    def __call__(self, *args, **kwargs):
        return self.built(*args, **kwargs)


class ConfigDict(_Deferred):
    """A model config as its `to_dict()`: attributes it holds are read from there, anything else (a method,
    a derived property) builds the config class from it."""

    def __init__(self, config: Any):
        super().__init__()
        self.cls = f"{type(config).__module__}:{type(config).__qualname__}"
        self.values: dict = config.to_dict()

    def _build(self) -> Any:
        import importlib

        module, name = self.cls.split(":")
        return getattr(importlib.import_module(module), name).from_dict(self.values)

    def __getattr__(self, name: str):
        values = self.__dict__.get("values")
        if values is not None and name in values:
            return values[name]
        return super().__getattr__(name)
