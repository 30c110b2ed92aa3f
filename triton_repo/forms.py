"""The encoder's backend forms (`--backend`): one small spec each, the only place a form is described.

    tensorrt     model.plan on Triton's TensorRT backend (tensorrt_plan, GPU)
    onnxruntime  model.onnx (+ model.onnx.data) on Triton's onnxruntime backend (onnxruntime_onnx)
    python       model.onnx run by onnxruntime inside Triton's python backend (our encoder.py, CPU)

resolve.py (which artifacts a form needs), layout.py (the files it places), readme.py and config.py
(platform or backend, instance kind) read these specs; none branches on a form's name. Registry order is the
order of preference when `--backend` is not given. Plain data: importable without tritonclient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from export.core.errors import OptionError
from export.core.folder import DATA_SUFFIX, ONNX_NAME, PLAN_NAME

if TYPE_CHECKING:
    from triton_repo.options import RepoOptions


@dataclass(frozen=True)
class EncoderForm:
    name: str  # the --backend choice
    help: str  # its clause in the CLI's --backend help
    serves_with: str  # who loads the model, for messages ("Triton's TensorRT backend")
    kind: str  # ModelInstanceGroup.Kind of its instances
    # where Triton finds the code: a platform it ships (platform) or a backend running our model.py
    platform: str | None = None
    backend: str | None = None
    default_model_filename: str | None = None
    # artifact files hard-linked (or copied) into <model>/1/; the first is required, later ones
    # only when present (external weights stay beside model.onnx)
    model_files: tuple[str, ...] = (ONNX_NAME, ONNX_NAME + DATA_SUFFIX)
    model_py: str | None = None  # triton_repo/backend_models/<file>, copied as <model>/1/model.py
    engine_runtimes: tuple[str, ...] = ()  # runtimes whose plan it loads; () = it runs model.onnx instead
    needs_portable_graph: bool = False  # model.onnx must run in plain onnxruntime (no body-less custom node)
    parameters: Callable[[RepoOptions], dict[str, object]] | None = None  # config.pbtxt parameters
    readme: str = ""  # the repository README's paragraph on this form; {engine_version} is filled in

    @property
    def needs_engine(self) -> bool:
        """An engine has one resolution and an optimization profile: the exact sequence length and
        the profile's max batch go into the config."""
        return bool(self.engine_runtimes)


FORMS: dict[str, EncoderForm] = {f.name: f for f in (
    EncoderForm(
        name="tensorrt",
        help="tensorrt = model.plan on Triton's TensorRT backend (GPU)",
        serves_with="Triton's TensorRT backend",
        kind="KIND_GPU",
        platform="tensorrt_plan",
        default_model_filename=PLAN_NAME,
        model_files=(PLAN_NAME,),
        # Triton's TensorRT backend links datacenter TensorRT: a TensorRT-RTX plan does not load there.
        engine_runtimes=("tensorrt",),
        readme="The encoder is a TensorRT engine (built with TensorRT {engine_version}): serve it with the NGC "
               "Triton container whose TensorRT version matches the one that built `model.plan` "
               "(an engine runs only on the TensorRT release and GPU architecture that built it).",
    ),
    EncoderForm(
        name="onnxruntime",
        help="onnxruntime = model.onnx on Triton's onnxruntime backend",
        serves_with="Triton's onnxruntime backend",
        kind="KIND_AUTO",  # GPU where the server has one, else CPU
        platform="onnxruntime_onnx",
        default_model_filename=ONNX_NAME,
        needs_portable_graph=True,
        readme="The encoder runs on Triton's onnxruntime backend (GPU where the server has one, else CPU).",
    ),
    EncoderForm(
        name="python",
        help="python = onnxruntime inside the python backend, for servers without the onnxruntime backend "
             "(the pip tritonserver)",
        serves_with="onnxruntime in Triton's python backend",
        kind="KIND_CPU",
        backend="python",
        model_py="encoder.py",
        needs_portable_graph=True,
        parameters=lambda opts: {"intra_op_threads": opts.intra_op_threads, "providers": "CPUExecutionProvider"},
        readme="The encoder runs onnxruntime inside Triton's python backend on the CPU: this form serves on a "
               "`tritonserver` without the onnxruntime backend (the pip one). The server's python environment "
               "needs numpy<2, onnxruntime and pillow.",
    ),
)}
BACKENDS = tuple(FORMS)  # the --backend choices


def form(name: str) -> EncoderForm:
    if name not in FORMS:
        raise OptionError(f"--backend {name} is unknown; choose one of {', '.join(BACKENDS)}")
    return FORMS[name]


def cli_help() -> str:
    return ("encoder backend: " + "; ".join(f.help for f in FORMS.values())
            + ". Default: the first of these the artifacts can serve")
