"""Release files (UNICOM's `.pt` assets) into the user's cache, verified by SHA-256.

    path = fetch_release(zoo_entry("unicom-b-32").release)   # ~/.cache/mvt-deploy/unicom/FP16-ViT-B-32.pt

A cached file is used when its SHA-256 matches; otherwise the file is downloaded (urllib, no other
dependency) into a temporary file beside its destination, hashed while it streams, and renamed into
place only when the sum matches: an interrupted or corrupt download never becomes the cached file.
Without network the error says which URL to download and where to put it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

from export.core.errors import CheckpointError
from export.core.folder import sha256
from export.models.zoo import Release

CHUNK = 1 << 20
TIMEOUT_S = 60


def cache_root() -> Path:
    """mvt-deploy's cache folder: $XDG_CACHE_HOME/mvt-deploy (default ~/.cache/mvt-deploy)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mvt-deploy"


def release_cache(subdir: str = "unicom") -> Path:
    return cache_root() / subdir


def fetch_release(release: Release, alias: str, cache: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """The verified local copy of `release` (downloaded into `cache`, default release_cache()); `alias`
    (the zoo alias) is for the message that says what to do without network."""
    cache = Path(cache) if cache is not None else release_cache()
    target = cache / release.filename
    if target.is_file():
        if sha256(target) == release.sha256:
            return target
        log(f"      {target} does not match its SHA-256; downloading it again")
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{release.filename}.", suffix=".partial", dir=cache)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                got = _download(release.url, out, log)
            except DownloadError as exc:
                raise CheckpointError(f"could not download {release.url} ({exc}); "
                                      + offline_hint(release, alias, cache)) from None
        if got != release.sha256:
            raise CheckpointError(
                f"downloaded {release.url} but its SHA-256 is {got}, not the published {release.sha256}; "
                "the file was discarded (a proxy or a truncated transfer?). Try again, or "
                + offline_hint(release, alias, cache))
        os.replace(tmp, target)  # atomic: the cache holds a verified file or none
    finally:
        tmp.unlink(missing_ok=True)
    log(f"      {release.filename}: SHA-256 verified, cached at {target}")
    return target


def _download(url: str, out, log: Callable[[str], None]) -> str:
    """Stream `url` into the open file `out`; returns the SHA-256 of what was written."""
    import urllib.error
    import urllib.request

    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    log(f"      downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as source:
            total = int(source.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="      download",
                      leave=False) as bar:
                for block in iter(lambda: source.read(CHUNK), b""):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError, ValueError) as exc:  # offline, DNS, HTTP 404, timeout, bad URL
        raise DownloadError(f"{type(exc).__name__}: {getattr(exc, 'reason', None) or exc}") from None
    return digest.hexdigest()


class DownloadError(Exception):
    """The transfer failed (the reason, one line); fetch_release turns it into what to do."""


def offline_hint(release: Release, alias: str, cache: Path | None = None) -> str:
    """What to do where the release cannot be downloaded."""
    target = (Path(cache) if cache is not None else release_cache()) / release.filename
    return (f"download it where GitHub is reachable (curl -L -o {release.filename} {release.url}) and either "
            f"put it at {target} (checked against its SHA-256 {release.sha256[:12]}...) and use --model {alias} "
            f"again, or pass the file itself: --model path/to/{release.filename}. "
            f"Without weights, --model {alias} --random-weights exports the architecture")
