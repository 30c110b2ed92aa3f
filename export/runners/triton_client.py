"""A served ensemble through tritonclient (HTTP or gRPC)."""

from __future__ import annotations

from typing import Any, Iterable

from export.core.errors import OptionError
from export.core.interface import IMAGE_INPUT
from export.runners.base import Runner


class TritonRunner(Runner):
    """A served ensemble through tritonclient (protocol "http" or "grpc"). Its feed is
    {IMAGE_INPUT: (B, 1) object array of encoded images} (encode_images): the server preprocesses."""

    input_name = IMAGE_INPUT
    PROTOCOLS = ("http", "grpc")

    def __init__(self, url: str, model: str = "embed", output_names: Iterable[str] | None = None,
                 protocol: str = "http"):
        if protocol not in self.PROTOCOLS:
            raise OptionError(f"protocol {protocol!r} is unknown; choose one of {', '.join(self.PROTOCOLS)}")
        self.url, self.model, self.protocol = url, model, protocol
        self._requested = None if output_names is None else list(output_names)
        super().__init__(f"triton {protocol}://{url}/{model}", output_names)
        self._client: Any = None

    def _module(self):
        from export.core.errors import require

        return require(f"tritonclient.{self.protocol}", "serve")

    def activate_impl(self) -> None:
        client = self._module().InferenceServerClient(self.url)
        try:
            if not client.is_model_ready(self.model):
                raise RuntimeError(f"model {self.model!r} is not ready on the server at {self.url}")
            meta = (client.get_model_metadata(self.model) if self.protocol == "http"
                    else client.get_model_metadata(self.model, as_json=True))
        except Exception:
            client.close()
            raise
        served = [o["name"] for o in meta["outputs"]]
        self.output_names = [n for n in (self._requested or served) if n in served]
        self._client = client

    def infer_impl(self, feed):
        mod = self._module()
        payload = feed[IMAGE_INPUT]  # (B, 1) of bytes
        request = mod.InferInput(IMAGE_INPUT, list(payload.shape), "BYTES")
        request.set_data_from_numpy(payload)
        assert self.output_names is not None  # set by activate_impl
        outputs = [mod.InferRequestedOutput(n) for n in self.output_names]
        result = self._client.infer(self.model, [request], outputs=outputs)
        return {n: result.as_numpy(n) for n in self.output_names}

    def deactivate_impl(self) -> None:
        client, self._client = self._client, None
        client.close()
