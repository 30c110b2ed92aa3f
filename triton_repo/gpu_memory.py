"""What one instance of a TensorRT encoder holds in GPU memory on Triton, estimated from the export's manifest, for
the generated README (readme.py).

tensorrt_backend (src/model_state.cc, src/instance_state.cc at r25.05) per model instance:
  weights      its own engine: instances share one only when no tensor is dynamic (ModelState::CreateEngine
               disables sharing for dynamic shapes), and every engine here has a dynamic batch;
  activations  one execution context per profile the instance group names (InitOptimizationProfiles), each
               with TensorRT's activation memory: the largest over all profiles under kSTATIC, the default, and
               its own profile's under ON_PROFILE_CHANGE (config.ALLOCATION_STRATEGY, Triton 25.05 on);
  I/O          one device buffer per input and output, for the largest shape over the named profiles
               (InitializeExecuteInputBinding and the output bindings: "the maximum byte sizes across all profiles").

There is no GPU here to ask TensorRT (ICudaEngine.get_device_memory_size_for_profile_v2), so activations are an
estimate from each profile's largest input and the model's dims. TensorRT reuses activation memory from layer to
layer, so the peak is about one encoder layer's working set at the largest batch and sequence:

    attention  B*S*(C residual + C normed + 3C q/k/v + C context) = B*S*6C, plus B*heads*S^2 probabilities when no
               fused attention kernel is chosen (an upper bound: TensorRT's fused attention keeps them on chip)
    MLP        B*S*(C residual + C normed + I hidden + C out) = B*S*(3C + I)

with I = 4C (the manifest records no MLP width; RICE and MLCD-L have 4C, bigG 4.9C), in the graph's activation
type (fp32, or fp16 for fp16/int8/fp8 exports), plus tactic scratch, which is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from export.core.folder import DATA_SUFFIX, ONNX_NAME, PLAN_NAME
from export.core.manifest import Manifest

MLP_RATIO = 4  # I / C, assumed: the manifest records hidden size, layers and heads, not the MLP width
IO_BYTES = 4  # the served interface is float32 in and out (manifest interface dtypes)


@dataclass(frozen=True)
class ProfileMemory:
    input_shape: tuple[int, ...]  # the profile's largest input [B, 3, H, W]
    tokens: int  # S at that size
    activations: int  # bytes, one layer's working set without attention probabilities
    probabilities: int  # bytes, B * heads * S^2 if a kernel materializes them


@dataclass(frozen=True)
class InstanceMemory:
    weights: int  # bytes
    weights_from: str  # what the figure is: the plan's size, or the ONNX weights when there is no plan yet
    io: int  # bytes: the input and output buffers
    profiles: tuple[ProfileMemory, ...]
    activation_bytes: int  # 4 (fp32) or 2 (fp16 activations)

    def activations(self, on_profile_change: bool = True, materialized: bool = False) -> int:
        """Every context's activations: each its own profile's (on profile change), or each the largest."""
        per = [p.activations + (p.probabilities if materialized else 0) for p in self.profiles]
        return sum(per) if on_profile_change else len(per) * max(per)

    def total(self, on_profile_change: bool = True, materialized: bool = False) -> int:
        return self.weights + self.io + self.activations(on_profile_change, materialized)


def _profiles(profiles: dict | list[dict]) -> list[dict]:
    return profiles if isinstance(profiles, list) else [profiles]


def estimate(manifest: Manifest, profiles: dict | list[dict], plan_bytes: int | None) -> InstanceMemory:
    """The estimate for an engine with `profiles` ({input: {min, opt, max}} or a list of them) built from the
    export `manifest`; plan_bytes: the plan's size (None: no plan yet, the ONNX weights stand in)."""
    c = int(manifest.hidden_size or 0)
    heads = int(manifest.num_attention_heads or 1)
    p = manifest.patch_size
    fp16 = manifest.precision == "fp16" or manifest.precision_recipe.get("unquantized_dtype") == "fp16"
    a = 2 if fp16 else 4
    per_token = max(6 * c, 3 * c + MLP_RATIO * c)
    found, io_in, io_out = [], 0, 0
    for profile in _profiles(profiles):
        (shape,) = [tuple(int(d) for d in spec["max"]) for spec in profile.values()]
        b, _, h, w = shape
        s = (h // p) * (w // p) + manifest.prefix_tokens
        found.append(ProfileMemory(shape, s, b * s * per_token * a, b * heads * s * s * a))
        io_in = max(io_in, b * 3 * h * w * IO_BYTES)
        # outputs by their recorded shapes: ["batch", "sequence", C] or ["batch", E]
        out = sum(b * (s if "sequence" in dims else 1) * int(dims[-1]) * IO_BYTES
                  for dims in manifest.output_shapes.values())
        io_out = max(io_out, out)
    if plan_bytes is not None:
        weights, weights_from = plan_bytes, PLAN_NAME
    else:
        records = manifest.artifacts
        weights = sum(int(records[n].size or 0) for n in (ONNX_NAME, ONNX_NAME + DATA_SUFFIX) if n in records)
        weights_from = f"the size of {ONNX_NAME}: no plan yet"
    return InstanceMemory(weights, weights_from, io_in + io_out, tuple(found), a)


def gib(n: int) -> str:
    """Bytes in the largest binary unit that keeps a figure above 1 (GiB, MiB, KiB)."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


def readme_section(manifest: Manifest, profiles: dict | list[dict], plan_bytes: int | None, instances: int) -> str:
    """The README's paragraph: what one encoder instance holds, how it adds up, and that it is an estimate."""
    m = estimate(manifest, profiles, plan_bytes)
    n = len(m.profiles)
    largest = max(m.profiles, key=lambda q: q.activations)
    contexts = ("one execution context" if n == 1 else
                f"{n} execution contexts, one per optimization profile, each allocated for its own profile "
                "(`execution_context_allocation_strategy: ON_PROFILE_CHANGE` in its config.pbtxt)")
    static = "" if n == 1 else (
        f"\nTriton before 25.05 ignores that parameter and sizes every context for the largest profile: "
        f"{gib(m.total(on_profile_change=False))}.")
    dtype = "fp16" if m.activation_bytes == 2 else "fp32"
    return f"""## GPU memory per encoder instance (an estimate)

Each encoder instance ({instances} here, `--instances`) loads its own engine and holds {contexts}:

| | |
|---|---|
| weights | {gib(m.weights)} ({m.weights_from}) |
| input and output buffers | {gib(m.io)} (for the largest shapes) |
| activations | {gib(m.activations())} in all; the largest profile, input {list(largest.input_shape)} \
({largest.tokens} tokens): {gib(largest.activations)} |
| per instance | **{gib(m.total())}** |

Where TensorRT does not fuse attention, a context also holds its profile's attention probabilities (up to
{gib(max(q.probabilities for q in m.profiles))} in one profile; the engine inspector shows which kernels it \
chose).{static}
Estimated from each profile's largest input and the manifest's dims (hidden {manifest.hidden_size},
{manifest.num_attention_heads} heads, MLP width taken as {MLP_RATIO}x hidden, {dtype} activations; tactic
scratch not counted): TensorRT's own figure for profile i is `engine.get_device_memory_size_for_profile_v2(i)`,
on a GPU.
"""
