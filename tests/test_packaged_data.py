"""The evaluation data shipped in evals/data: every file listed in SOURCES.md with both digests,
nothing unlisted, and the default configuration reading it (no folder beside the repository)."""

from __future__ import annotations

import gzip
import hashlib
import re

from evals import bundled, sources
from harness.config import load_config

ROW = re.compile(r"^\| `([^`]+\.gz)` \| ([\d,]+) \| [^|]+ \| `([0-9a-f]{64})` \| `([0-9a-f]{64})` \|$")


def _listed() -> dict[str, tuple[int, str, str]]:
    text = (bundled.packaged_dir() / "SOURCES.md").read_text(encoding="utf-8")
    rows = [ROW.match(line) for line in text.splitlines()]
    return {m[1]: (int(m[2].replace(",", "")), m[3], m[4]) for m in rows if m}


def test_every_shipped_file_matches_its_sources_entry():
    root = bundled.packaged_dir()
    listed = _listed()
    shipped = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.gz"))
    assert shipped == sorted(listed), "SOURCES.md and evals/data disagree on which files ship"
    for rel, (_, content_sha, gz_sha) in listed.items():
        packed = (root / rel).read_bytes()
        assert hashlib.sha256(packed).hexdigest() == gz_sha, rel
        assert hashlib.sha256(gzip.decompress(packed)).hexdigest() == content_sha, rel


def test_record_counts_match_sources():
    from evals.tasks.utils import read_records

    for rel, (count, _, _) in _listed().items():
        assert len(read_records(bundled.packaged_dir() / rel)) == count, rel


def test_shipped_data_stays_small():
    total = sum(p.stat().st_size for p in bundled.packaged_dir().rglob("*") if p.is_file())
    assert total < 5_000_000, f"evals/data holds {total:,} bytes; keep what ships to a few MB"


def test_default_config_reads_only_the_package():
    cfg = load_config(None, [])
    assert cfg.eval.data_dir == bundled.PACKAGED
    demo = load_config("configs/demo.yaml", [])
    assert demo.eval.data_dir == bundled.PACKAGED
    ref = sources.resolve_reference(demo.eval.data_dir, demo.eval.alpaca_reference, "local")
    assert ref.path.is_relative_to(bundled.packaged_dir())


def test_data_file_prefers_plain_then_gz(tmp_path):
    (tmp_path / "a.json.gz").write_bytes(gzip.compress(b"[]"))
    assert bundled.data_file(tmp_path, "a.json") == tmp_path / "a.json.gz"
    (tmp_path / "a.json").write_text("[]")
    assert bundled.data_file(tmp_path, "a.json") == tmp_path / "a.json"
    assert bundled.data_file(tmp_path, "missing.json") == tmp_path / "missing.json"
    assert bundled.resolve_data_dir(None) is None
    assert bundled.resolve_data_dir("~/x") == bundled.resolve_data_dir("~/x").expanduser()
