"""Content digests and version records: what identifies a file, a folder, a settings object or
the software that produced a result. Cache keys and provenance on every floor are built from these.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any


def settings_digest(obj: Any) -> str:
    """A stable 16-hex-digit hash of any JSON-able object (keys sorted)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_digests(root: Path, exclude: tuple[str, ...] = (), skip_dirs: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file below ``root`` (relative POSIX paths, sorted), leaving out the
    relative paths in ``exclude`` and everything under a top-level folder in ``skip_dirs``."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in exclude or rel.split("/")[0] in skip_dirs:
            continue
        out[rel] = {"sha256": file_digest(path), "bytes": path.stat().st_size}
    return out


def combine_digests(files: dict[str, dict[str, Any]], skip_prefixes: tuple[str, ...] = ()) -> str:
    """One digest over :func:`tree_digests` entries, leaving out paths with any of ``skip_prefixes``."""
    return settings_digest({k: v["sha256"] for k, v in files.items() if not k.startswith(skip_prefixes)})


def package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Installed version of each distribution (None where it is not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".jinja")


def model_dir_digest(path: Path) -> str:
    """What identifies a model folder: its weights, configs and templates (README files, logs and
    the like left out)."""
    files = {k: v for k, v in tree_digests(path).items() if k.endswith(MODEL_FILE_SUFFIXES)}
    return combine_digests(files)
