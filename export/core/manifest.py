"""Reading an export folder back: its manifest.json, the PyTorch reference it names, its interface.

What the ledger, the feature visualization and the engine runner need from a folder that
export.build_engine wrote (pipeline.py writes the manifest).
"""

from __future__ import annotations

import json
from pathlib import Path

from export.core.errors import OptionError
from export.core.folder import MANIFEST_NAME


def read_manifest(artifacts: Path) -> dict:
    """DIR/manifest.json, checked for the keys every reader needs."""
    artifacts = Path(artifacts)
    path = artifacts / MANIFEST_NAME
    if not artifacts.is_dir():
        raise OptionError(f"--artifacts {artifacts} is not a folder; pass an export folder "
                          "(python -m export.build_engine --out DIR)")
    if not path.is_file():
        raise OptionError(f"{artifacts} has no {MANIFEST_NAME}; pass the folder export.build_engine wrote")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise OptionError(f"{path} is not valid JSON: {exc}") from None
    for key in ("options", "model", "interface"):
        if key not in manifest:
            raise OptionError(f"{path} has no {key!r}; re-export the folder with this version")
    return manifest


def output_names(manifest: dict) -> list[str]:
    """The deployed graph's outputs, in interface order."""
    return list(manifest["interface"].get("outputs") or {})


def pooled_output(manifest: dict) -> str:
    """The one-vector-per-image output (UNICOM: embedding); manifests written before families named
    theirs have pooler_output."""
    return manifest["interface"].get("pooled_output") or "pooler_output"


def prefix_tokens(manifest: dict) -> int:
    """Tokens before the patch tokens (1: a class token); older manifests are all class-token models."""
    value = manifest["model"].get("prefix_tokens")
    return 1 if value is None else int(value)
