"""What --images names: a folder (recursive), a glob, a list file (one path per line) or one image."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from export.core.errors import OptionError
from export.core.images import IMAGE_SUFFIXES

_GLOB_CHARS = set("*?[")


def image_paths(source: str | os.PathLike) -> list[str]:
    """Absolute paths of the images `source` names, without duplicates.

    folder     every file below it (recursively) whose suffix is an image suffix, sorted
    glob       every file it matches (`**` recurses), sorted; any suffix: the pattern chose them
    list file  one path per line, relative ones relative to the list's folder; blank lines and lines
               starting with # are skipped; order kept
    an image   that one file (a suffix in IMAGE_SUFFIXES)

    Paths are absolute (and ".." collapsed) so that a rerun from another folder, and Ray workers, see the same
    names.
    Files that exist but cannot be decoded are kept: they become error rows.
    """
    text = os.fspath(source)
    path = Path(text)
    if path.is_dir():
        paths = sorted(_absolute(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not paths:
            raise OptionError(f"--images {text}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return paths
    if path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return [_absolute(path)]
        return _list_file(path)
    if _GLOB_CHARS & set(text):
        paths = sorted({_absolute(p) for p in glob.glob(text, recursive=True) if Path(p).is_file()})
        if not paths:
            raise OptionError(f"--images {text}: the pattern matches no files")
        return paths
    raise OptionError(f"--images {text} does not exist; pass a folder, a glob (quoted: 'photos/**/*.jpg') or a "
                      "list file with one image path per line")


def _list_file(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError:
        raise OptionError(f"--images {path} is neither an image ({', '.join(IMAGE_SUFFIXES)}) nor a text list of "
                          "image paths") from None
    base = Path(_absolute(path)).parent
    seen: dict[str, None] = {}
    for line in lines:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            p = Path(entry).expanduser()
            seen.setdefault(_absolute(p if p.is_absolute() else base / p), None)
    if not seen:
        raise OptionError(f"--images {path}: the list holds no paths (one image path per line)")
    return list(seen)


def _absolute(path: str | os.PathLike) -> str:
    return os.path.normpath(os.path.abspath(os.fspath(path)))
