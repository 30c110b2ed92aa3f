"""LLaVA-NeXT and LLaVA-OneVision checkpoints whose vision tower is one of our families (MLCD, RICE, CLIP).

Only the image side is read from the checkpoint's safetensors: the tower, `multi_modal_projector` and
`image_newline` (a 7B language model is never loaded). Without --projector the tower is exported as a
tower checkpoint would be; with it, one module from `pixel_values` to `image_embeds` [B, S', H_llm]:

    hidden_states[vision_feature_layer]   (a list of layers: concatenated on the channel axis)
    [:, 1:] when vision_feature_select_strategy is "default" (the class token dropped)
    multi_modal_projector                 Linear -> act -> Linear, to the language model's width

which is what transformers' `get_image_features` computes per view before `pack_image_features`
(export.core.packing does that part, on the served side).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.core.errors import CheckpointError, UnsupportedModelError
from export.core.folder import PREPROCESSOR_CONFIG
from export.core.interface import CLIP_MEAN, CLIP_STD, IMAGE_EMBEDS
from export.models.families import FAMILIES, ModelFamily, family_for_model_type

# config.json model_type -> (transformers config class, model class, projector class)
VLM_ARCHITECTURES = {
    "llava_next": ("LlavaNextConfig", "LlavaNextModel", "LlavaNextMultiModalProjector"),
    "llava_onevision": ("LlavaOnevisionConfig", "LlavaOnevisionModel", "LlavaOnevisionMultiModalProjector"),
}
# Where each part lives in a checkpoint: the original LLaVA layout (what save_pretrained writes, and the
# llava-hf releases) or transformers' in-memory names.
TOWER_PREFIXES = ("vision_tower.", "model.vision_tower.")
PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
NEWLINE_KEYS = ("image_newline", "model.image_newline")


@dataclass(frozen=True)
class VlmSettings:
    """What the language model expects of the image side, from the checkpoint's config (the manifest's `vlm`)."""

    architecture: str  # llava_next | llava_onevision
    projector: bool  # the export includes multi_modal_projector (its output: image_embeds)
    text_hidden_size: int  # H_llm: the width of image_embeds and of the language model's input embeddings
    vision_feature_layer: int | list[int]
    vision_feature_select_strategy: str  # default (drop the class token) | full
    image_grid_pinpoints: list[list[int]]  # (height, width) AnyRes candidates
    tile_size: int  # the tower's image size: every view is tile_size x tile_size
    patch_size: int
    image_token_id: int | None  # the placeholder token the language model replaces with image rows
    vision_aspect_ratio: str | None  # LLaVA-OneVision: anyres_max_N; None for LLaVA-NeXT
    has_newline: bool  # image_newline rows follow every map row

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def tokens_per_view(self) -> int:
        """Rows of one view after the feature selection (n * n, plus the class token with "full")."""
        n = self.tile_size // self.patch_size
        return n * n + (0 if self.vision_feature_select_strategy == "default" else 1)


def vlm_model_type(folder: Path) -> str | None:
    """The VLM architecture of the checkpoint in `folder` (llava_next, llava_onevision), or None."""
    try:
        model_type = json.loads((Path(folder) / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError):
        return None
    return model_type if model_type in VLM_ARCHITECTURES else None


def _transformers_class(name: str):
    import transformers

    return getattr(transformers, name, None) or _from_module(name)


def _from_module(name: str):
    import importlib

    module = "llava_next" if name.startswith("LlavaNext") else "llava_onevision"
    return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)


def load_vlm_config(folder: Path):
    """The VLM's transformers config, or UnsupportedModelError when its tower is not one of our families."""
    model_type = vlm_model_type(folder)
    assert model_type is not None, folder
    config = _transformers_class(VLM_ARCHITECTURES[model_type][0]).from_pretrained(folder)
    tower_type = getattr(config.vision_config, "model_type", None)
    try:
        family_for_model_type(tower_type or "")
    except UnsupportedModelError:
        known = ", ".join(t for f in FAMILIES if f.weights_file is None for t in f.model_types)
        raise UnsupportedModelError(
            f"{folder} is a {model_type} checkpoint whose vision tower is {tower_type!r}; mvt-deploy exports VLMs "
            f"whose tower is one of its families ({known}: MLCD, RICE, CLIP-style)") from None
    return config


def settings_for(config, projector: bool, has_newline: bool) -> VlmSettings:
    vision = config.vision_config
    layer = config.vision_feature_layer
    return VlmSettings(
        architecture=config.model_type, projector=projector, text_hidden_size=int(config.text_config.hidden_size),
        vision_feature_layer=list(layer) if isinstance(layer, (list, tuple)) else int(layer),
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        image_grid_pinpoints=[[int(h), int(w)] for h, w in config.image_grid_pinpoints],
        tile_size=int(vision.image_size), patch_size=int(vision.patch_size),
        image_token_id=getattr(config, "image_token_id", None),
        vision_aspect_ratio=getattr(config, "vision_aspect_ratio", None) if config.model_type == "llava_onevision"
        else None,
        has_newline=has_newline)


def read_tensors(folder: Path, prefixes: tuple[str, ...]) -> dict[str, Any]:
    """{name without its prefix: tensor} for every safetensors entry under one of `prefixes` (exact names
    when a prefix does not end with a dot); only those entries are read from disk."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has no *.safetensors weights")
    found: dict[str, Any] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                for prefix in prefixes:
                    if (key.startswith(prefix) if prefix.endswith(".") else key == prefix):
                        found[key[len(prefix):] if prefix.endswith(".") else ""] = f.get_tensor(key)
    return found


def _load_part(module, folder: Path, prefixes: tuple[str, ...], what: str):
    import torch

    state = {k: v.to(torch.float32) for k, v in read_tensors(folder, prefixes).items()}
    if not state:
        raise CheckpointError(f"{folder} has no {what} weights (looked for {', '.join(p + '*' for p in prefixes)})")
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{folder}: the {what} weights do not match its config (missing {sorted(missing)[:4]}, unexpected "
            f"{sorted(unexpected)[:4]}); re-save the checkpoint with transformers' save_pretrained")
    return module.eval()


@dataclass
class ProjectedOutput:
    image_embeds: Any  # (B, S', H_llm)


def projected_tower_class():
    import torch

    class ProjectedTower(torch.nn.Module):
        """pixel_values (B, 3, s, s) -> ProjectedOutput: the feature layer(s), the class-token strategy, the
        projector."""

        def __init__(self, tower, projector, settings: VlmSettings, vlm_config):
            super().__init__()
            self.tower, self.projector = tower, projector
            self.layer, self.strategy = settings.vision_feature_layer, settings.vision_feature_select_strategy
            self.config = tower.config  # the tower's: image size, patch size, layers (what the pipeline reads)
            self.vlm_config = vlm_config

        def forward(self, pixel_values, output_hidden_states=None, **kwargs):
            hidden = self.tower(pixel_values=pixel_values, output_hidden_states=True, **kwargs).hidden_states
            if isinstance(self.layer, int):
                selected = hidden[self.layer]  # (B, S, C)
            else:
                selected = torch.cat([hidden[i] for i in self.layer], dim=-1)  # (B, S, C * layers)
            if self.strategy == "default":
                selected = selected[:, 1:]  # (B, S - 1, C): the class token dropped
            return ProjectedOutput(self.projector(selected))  # (B, S', H_llm)

    return ProjectedTower


def projector_family(family: ModelFamily) -> ModelFamily:
    """The tower's family with one output, image_embeds, and no pooled output (the language model reads tokens)."""
    return dataclasses.replace(family, outputs=(IMAGE_EMBEDS,), pooled_output="")


@dataclass
class VlmParts:
    model: Any  # the tower, or ProjectedTower with --projector
    family: ModelFamily
    settings: VlmSettings
    image_newline: Any  # numpy (H_llm,) or None
    processor_config: dict  # the checkpoint's image processor config ({} when it has none)


def load_vlm(folder: Path, projector: bool) -> VlmParts:
    """The image side of a LLaVA-NeXT / LLaVA-OneVision checkpoint in fp32 eval mode."""
    folder = Path(folder)
    config = load_vlm_config(folder)
    family = family_for_model_type(config.vision_config.model_type)
    names = VLM_ARCHITECTURES[config.model_type]
    tower = _load_part(family.model_class()(config.vision_config), folder, TOWER_PREFIXES, "vision tower")
    newline_tensors = read_tensors(folder, NEWLINE_KEYS)
    newline = newline_tensors[""].float().numpy() if newline_tensors else None
    settings = settings_for(config, projector, newline is not None)
    processor_config = _processor_config(folder, settings)
    if not projector:
        return VlmParts(tower, family, settings, newline, processor_config)
    if settings.vision_feature_select_strategy not in ("default", "full"):
        raise CheckpointError(f"{folder}: vision_feature_select_strategy {settings.vision_feature_select_strategy!r} "
                              "is neither 'default' nor 'full'")
    if settings.vision_feature_select_strategy == "full" and family.prefix_tokens:
        raise CheckpointError(
            f"{folder}: vision_feature_select_strategy 'full' keeps the class token, and transformers' AnyRes "
            "packing cannot lay n*n+1 rows out as a grid; export the tower alone (drop --projector)")
    layers = settings.vision_feature_layer if isinstance(settings.vision_feature_layer, list) \
        else [settings.vision_feature_layer]
    depth = config.vision_config.num_hidden_layers
    if any(not -(depth + 1) <= i <= depth for i in layers):
        raise CheckpointError(f"{folder}: vision_feature_layer {settings.vision_feature_layer} is out of range for a "
                              f"{depth}-layer tower")
    proj = _load_part(_transformers_class(names[2])(config), folder, PROJECTOR_PREFIXES, "multi_modal_projector")
    model = projected_tower_class()(tower, proj, settings, config).eval()
    return VlmParts(model, projector_family(family), settings, newline, processor_config)


def _processor_config(folder: Path, settings: VlmSettings) -> dict:
    path = folder / PREPROCESSOR_CONFIG
    if not path.is_file():
        return {}
    cfg = json.loads(path.read_text())
    pinpoints = cfg.get("image_grid_pinpoints")
    if pinpoints is not None and [list(p) for p in pinpoints] != settings.image_grid_pinpoints:
        raise CheckpointError(f"{path} tiles with image_grid_pinpoints {pinpoints}, but config.json packs with "
                              f"{settings.image_grid_pinpoints}; make them agree (the language model would get "
                              "rows laid out for another grid)")
    return cfg


def tile_processor_kwargs(processor_config: dict, tile_size: int) -> dict:
    """CLIP image processor arguments that make one tile_size x tile_size view the way the VLM's processor treats
    each view (its resample, rescale, mean/std): what parity, calibration and the served views go through."""
    keys = ("do_convert_rgb", "resample", "do_rescale", "rescale_factor", "do_normalize")
    kwargs = {k: processor_config[k] for k in keys if processor_config.get(k) is not None}
    return dict(size={"shortest_edge": tile_size}, crop_size={"height": tile_size, "width": tile_size},
                do_center_crop=True, image_mean=processor_config.get("image_mean") or CLIP_MEAN,
                image_std=processor_config.get("image_std") or CLIP_STD, **kwargs)


def image_processor(folder: Path):
    """The checkpoint's own VLM image processor (transformers' PIL class: no torchvision needed)."""
    import transformers

    model_type = vlm_model_type(folder)
    stem = "LlavaNext" if model_type == "llava_next" else "LlavaOnevision"
    cls = getattr(transformers, f"{stem}ImageProcessorPil", None) or getattr(transformers, f"{stem}ImageProcessor")
    return cls.from_pretrained(folder)


def reference_vlm(model, image_newline):
    """transformers' own VLM module around the loaded image side, its language model left on the meta device
    (never run): `get_image_features` is the reference the export is checked against."""
    import torch

    config = model.vlm_config
    cls = _transformers_class(VLM_ARCHITECTURES[config.model_type][1])
    with torch.device("meta"):
        vlm = cls(config)
    vlm.vision_tower, vlm.multi_modal_projector = model.tower, model.projector
    vlm.image_newline = torch.nn.Parameter(torch.from_numpy(image_newline)) if image_newline is not None else None
    return vlm.eval()


def vlm_image_features(vlm, batch, vision_aspect_ratio: str | None) -> list:
    """transformers' packed rows per image ([R_i, H_llm] numpy) for `batch`, what the VLM's image processor made
    (pixel_values, image_sizes)."""
    import torch

    kwargs = {"vision_aspect_ratio": vision_aspect_ratio} if vision_aspect_ratio else {}
    pixels, sizes = torch.as_tensor(batch["pixel_values"]).float(), torch.as_tensor(batch["image_sizes"])
    with torch.no_grad():
        out = vlm.get_image_features(pixels, sizes, return_dict=True, **kwargs)
    return [rows.numpy() for rows in out.pooler_output]
