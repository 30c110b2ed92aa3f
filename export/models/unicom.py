"""UNICOM (MVT-1.0, ICLR 2023): universal and compact image-retrieval embeddings, as a transformers model.

Written from the architecture's description (issue 11), not from upstream's code:

    pixel_values (B, 3, H, W)
      -> patch_embed.proj (conv p x p, stride p) + pos_embed        (B, N, C)   no class token
      -> blocks.{i}: x + attn(norm1(x)), then x + mlp(norm2(x))     pre-LN, LayerNorm eps 1e-5,
                     attn: qkv (no bias), softmax(q k^T / sqrt(64)) v, proj (bias); mlp: fc1 -> ReLU6 -> fc2
      -> norm                                                       (B, N, C)   = last_hidden_state
      -> flatten                                                    (B, N * C)
      -> feature: Linear(N*C -> C) -> BN -> Linear(C -> E) -> BN    (B, E)      = embedding

The flattened head fixes the resolution: N tokens in, and `pos_embed` has no interpolation.

Released weights are fp16 `state_dict` files (`torch.save`) with the upstream key names above,
`feature.{0,1,2,3}` for the head. `load_unicom_file` reads them with `weights_only=True`, infers
the architecture from the tensor shapes, and folds both BatchNorm1d of the head into the Linears
before them (`fold_head_batchnorms`: eval-mode BatchNorm is an affine map per channel, so
`BN(W x) = (s * W) x + (beta - s * mean)` with `s = gamma / sqrt(var + eps)`). The folded model is
what gets exported; `head_folded=False` in the config keeps the released form.

Upstream runs the blocks under CUDA autocast (fp16 on a GPU); our reference is the fp32 forward
(autocast off), which the released fp16 weights convert to exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from export.core.errors import CheckpointError

MODEL_TYPE = "unicom_vision_model"
HEAD_DIM = 64  # every release; the head count of a file is hidden / HEAD_DIM unless told otherwise
BATCHNORM_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
MAX_NAMED_KEYS = 12  # an error lists at most this many key names, then a count


class UnicomVisionConfig(PreTrainedConfig):
    r"""The UNICOM vision transformer. Defaults: ViT-B/32 (224 px, E = 512)."""

    model_type = MODEL_TYPE

    hidden_size: int = 768
    intermediate_size: int = 3072  # 4 x hidden in every release
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    embedding_size: int = 512  # E: 512 for B/32, 768 for B/16, L/14, L/14@336
    layer_norm_eps: float = 1e-5
    batch_norm_eps: float = 2e-5
    head_folded: bool = True  # the head's BatchNorms folded into its Linears (what we export)
    initializer_range: float = 0.02

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class UnicomVisionOutput(ModelOutput):
    """last_hidden_state (B, N, C) after the final norm; embedding (B, E), the head's output as upstream
    returns it (not L2-normalized); hidden_states: embeddings + one per block, before the final norm."""

    last_hidden_state: torch.Tensor | None = None
    embedding: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class UnicomPatchEmbed(nn.Module):
    def __init__(self, config: UnicomVisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.proj(pixel_values)  # (B, C, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, C), row-major over the patch grid


class UnicomAttention(nn.Module):
    def __init__(self, config: UnicomVisionConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, D)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D)
        if self.config._attn_implementation == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, H, N, D)
        else:
            weights = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)  # (B, H, N, N)
            out = weights @ v  # (B, H, N, D)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))  # (B, N, H*D)


class UnicomMlp(nn.Module):
    def __init__(self, config: UnicomVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class UnicomBlock(nn.Module):
    def __init__(self, config: UnicomVisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = UnicomAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = UnicomMlp(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _head(config: UnicomVisionConfig) -> nn.Sequential:
    """`feature`: the released form (bias-free Linears, each followed by BatchNorm1d) or the folded one
    (biased Linears; Identity keeps the indices, so the Linears stay feature.0 and feature.2)."""
    flat, c, e = config.num_patches * config.hidden_size, config.hidden_size, config.embedding_size
    if config.head_folded:
        return nn.Sequential(nn.Linear(flat, c), nn.Identity(), nn.Linear(c, e), nn.Identity())
    eps = config.batch_norm_eps
    return nn.Sequential(nn.Linear(flat, c, bias=False), nn.BatchNorm1d(c, eps=eps),
                         nn.Linear(c, e, bias=False), nn.BatchNorm1d(e, eps=eps))


class UnicomPreTrainedModel(PreTrainedModel):
    config_class = UnicomVisionConfig
    config: UnicomVisionConfig
    base_model_prefix = "unicom"
    main_input_name = "pixel_values"
    input_modalities = "image"
    _supports_sdpa = True

    def _init_weights(self, module):
        from transformers import initialization as init

        super()._init_weights(module)
        if isinstance(module, UnicomVisionModel):
            init.trunc_normal_(module.pos_embed, std=self.config.initializer_range)


class UnicomVisionModel(UnicomPreTrainedModel):
    def __init__(self, config: UnicomVisionConfig):
        super().__init__(config)
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not a multiple of "
                             f"num_attention_heads {config.num_attention_heads}")
        if config.image_size % config.patch_size:
            raise ValueError(f"image_size {config.image_size} is not a multiple of patch_size {config.patch_size}")
        self.patch_embed = UnicomPatchEmbed(config)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches, config.hidden_size))  # (1, N, C)
        self.blocks = nn.ModuleList(UnicomBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feature = _head(config)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs: Any) -> UnicomVisionOutput:
        size = self.config.image_size
        if tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(f"UNICOM takes {size}x{size} images only (pos_embed and the flattened head fix the "
                             f"resolution), got {tuple(pixel_values.shape[-2:])}")
        x = self.patch_embed(pixel_values) + self.pos_embed  # (B, N, C)
        hidden: tuple[torch.Tensor, ...] | None = (x,) if output_hidden_states else None
        for block in self.blocks:
            x = block(x)
            if hidden is not None:
                hidden += (x,)
        x = self.norm(x)  # (B, N, C)
        embedding = self.feature(x.reshape(x.shape[0], -1))  # (B, N*C) -> (B, E)
        return UnicomVisionOutput(last_hidden_state=x, embedding=embedding, hidden_states=hidden)


# ------------------------------------------------------------------------------------ BatchNorm folding

FOLD_CHUNK_ELEMENTS = 1 << 25  # weight elements folded at a time in float64 (256 MB; the L/14@336 head has 604 M)


@torch.no_grad()
def fold_head_batchnorms(model: UnicomVisionModel) -> UnicomVisionModel:
    """Fold `feature`'s two eval-mode BatchNorm1d into the Linears before them, in place (a model in the
    released form, config.head_folded False, becomes the folded form). Each folded value is computed in
    float64 and rounded once, so the folded head equals the released one to float32 rounding."""
    if model.config.head_folded:
        return model
    fc1, bn1, fc2, bn2 = model.feature
    pairs = cast("list[tuple[nn.Linear, nn.BatchNorm1d]]", [(fc1, bn1), (fc2, bn2)])
    for linear, bn in pairs:
        assert bn.running_var is not None and bn.running_mean is not None  # released BatchNorms track statistics
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)  # (out,)
        rows = max(1, FOLD_CHUNK_ELEMENTS // linear.in_features)
        for start in range(0, linear.out_features, rows):  # never a float64 copy of the whole matrix
            chunk = linear.weight[start:start + rows]  # (rows, in)
            chunk.copy_(chunk.double() * scale[start:start + rows, None])
        bias = bn.bias.double() - bn.running_mean.double() * scale  # (out,)
        linear.bias = nn.Parameter(bias.to(linear.weight.dtype))
    model.feature = nn.Sequential(fc1, nn.Identity(), fc2, nn.Identity())  # the folded form's layout
    model.config.head_folded = True
    return model


# ------------------------------------------------------------------------------------ released files

def config_from_state_dict(state: Mapping[str, torch.Tensor], num_heads: int | None = None) -> dict[str, Any]:
    """UnicomVisionConfig kwargs from a released state_dict's tensor shapes (heads: hidden / 64 unless given)."""
    need = ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight", "feature.2.weight")
    absent = [k for k in need if k not in state]
    if absent:
        raise CheckpointError(f"this is not a UNICOM state_dict: it has no {', '.join(absent)} "
                              f"(keys: {_names(sorted(state))})")
    hidden, channels, patch, _ = state["patch_embed.proj.weight"].shape  # (C, 3, p, p)
    tokens = state["pos_embed"].shape[1]  # (1, N, C)
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise CheckpointError(f"pos_embed holds {tokens} positions, not a square patch grid")
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks.") and k.split(".")[1].isdigit())
    if num_heads is None:
        if hidden % HEAD_DIM:
            raise CheckpointError(f"hidden size {hidden} is not a multiple of {HEAD_DIM}: give the head count "
                                  "(num_heads) explicitly")
        num_heads = hidden // HEAD_DIM
    elif num_heads < 1 or hidden % num_heads:
        raise CheckpointError(f"num_heads {num_heads} does not divide the hidden size {hidden}")
    return dict(hidden_size=int(hidden), intermediate_size=int(state["blocks.0.mlp.fc1.weight"].shape[0]),
                num_hidden_layers=layers, num_attention_heads=int(num_heads), num_channels=int(channels),
                image_size=int(side * patch), patch_size=int(patch),
                embedding_size=int(state["feature.2.weight"].shape[0]))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A released file's tensors: `torch.load(weights_only=True)` only (tensors and plain containers;
    anything that needs arbitrary unpickling is refused), a `module.` prefix stripped."""
    import pickle
    import re

    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if unsafe is None:  # not a pickle at all (torch's message for that is the same exception)
            raise CheckpointError(f"{path} is not a readable torch.save state_dict "
                                  f"({_weights_unpickler_reason(exc)})") from None
        raise CheckpointError(
            f"{path} is refused: loading it would need arbitrary unpickling (it holds a {unsafe.group(1)} object; "
            "unpickling can run code), and mvt-deploy loads weights with torch.load(weights_only=True) only. "
            "Re-save the state_dict alone where you trust the file: torch.save(model.state_dict(), path)") from None
    except Exception as exc:  # not a torch.save file at all, truncated, or a TorchScript archive
        raise CheckpointError(f"{path} is not a readable torch.save state_dict "
                              f"({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_unicom_file(path: Path, *, num_heads: int | None = None) -> UnicomVisionModel:
    """A released UNICOM `.pt` file -> the fp32 eval model with its head's BatchNorms folded.

    Missing or unexpected keys, and tensors of the wrong shape, are errors that name them.
    """
    state = read_state_dict(path)
    config = UnicomVisionConfig(**config_from_state_dict(state, num_heads), head_folded=False)
    with torch.device("meta"):  # no random init of weights that are about to be replaced (605 M in one Linear)
        model = UnicomVisionModel(config)
    expected = model.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}  # bookkeeping, unused in eval
    missing = sorted(set(expected) - set(state) - optional)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = ([f"missing keys: {_names(missing)}"] if missing else []) + \
                ([f"unexpected keys: {_names(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{path} does not match the UNICOM architecture inferred from its shapes "
                              f"({_describe(config)}): {'; '.join(parts)}")
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{path}: tensors of the wrong shape for {_describe(config)}: {_names(wrong)}")
    # fp16 -> fp32 is exact; integer bookkeeping (num_batches_tracked) keeps its type
    weights = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    del state
    for key in optional - set(weights):
        weights[key] = torch.zeros((), dtype=torch.long)
    model.load_state_dict(weights, strict=True, assign=True)
    return fold_head_batchnorms(model.eval())


def released_state_dict(model: UnicomVisionModel) -> dict[str, torch.Tensor]:
    """`model` (released form) as the releases store it: fp16 floating tensors, upstream key names."""
    if model.config.head_folded:
        raise ValueError("the releases store the unfolded head; build the model with head_folded=False")
    return {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}


def save_tiny_release(path: Path, config_kwargs: dict[str, Any], seed: int = 0) -> Path:
    """A random model of `config_kwargs` written exactly as the releases are (fp16 state_dict, torch.save),
    with non-trivial BatchNorm statistics so that folding is exercised."""
    torch.manual_seed(seed)
    model = UnicomVisionModel(UnicomVisionConfig(**{**config_kwargs, "head_folded": False})).eval()
    with torch.no_grad():
        for bn in (model.feature[1], model.feature[3]):
            n = bn.num_features
            bn.weight.copy_(torch.rand(n) + 0.5)
            bn.bias.copy_(0.1 * torch.randn(n))
            bn.running_mean.copy_(0.2 * torch.randn(n))
            bn.running_var.copy_(torch.rand(n) * 1.5 + 0.5)
            bn.num_batches_tracked.fill_(1000)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(released_state_dict(model), path)
    return path


def head_flops(config, patches: int) -> int:
    """The flattened head: Linear(N*C -> C) then Linear(C -> E), 2 FLOPs per multiply-add."""
    return 2 * patches * config.hidden_size * config.hidden_size + 2 * config.hidden_size * config.embedding_size


def _describe(config: UnicomVisionConfig) -> str:
    return (f"hidden {config.hidden_size}, {config.num_hidden_layers} layers, {config.num_attention_heads} heads, "
            f"{config.image_size} px, patch {config.patch_size}, embedding {config.embedding_size}")


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_NAMED_KEYS])
    return shown + (f" and {len(keys) - MAX_NAMED_KEYS} more" if len(keys) > MAX_NAMED_KEYS else "")


def _weights_unpickler_reason(exc: BaseException) -> str:
    """What torch's weights_only error says went wrong ("Unsupported operand 110"), after its long preamble."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            return (rest or (lines[i + 1] if i + 1 < len(lines) else ""))[:200]
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
