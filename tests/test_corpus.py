from pipeline.settings import CorpusSection
from pipeline.corpus import (
    boilerplate_line_fraction,
    deduplicate,
    duplicate_line_fraction,
    duplicate_ngram_fraction,
    filter_reason,
    prepare_corpus,
    segment_document,
    top_ngram_fraction,
)

PARA = (
    "Tides rise and fall because the Moon pulls on the oceans, and the water on the near side "
    "bulges toward it while inertia leaves a second bulge on the far side of the planet."
)


def _para(i: int) -> str:
    return f"Paragraph {i} talks about topic number {i * 7} with its own words: " + " ".join(
        f"w{i}x{j}" for j in range(25)
    )


def test_markdown_headers_make_sections():
    doc = "# Intro\n\nfirst body\n\n## Details\n\nsecond body\nmore\n"
    segs = segment_document("d", doc, max_chars=1000)
    assert [(s.heading, s.text) for s in segs] == [("Intro", "first body"), ("Details", "second body\nmore")]


def test_rest_underlined_titles_make_sections():
    doc = "The if statement\n****************\n\nbody one\n\nOther title\n===========\n\nbody two\n"
    segs = segment_document("d", doc, max_chars=1000)
    assert [s.heading for s in segs] == ["The if statement", "Other title"]
    assert segs[1].text == "body two"


def test_blocks_are_packed_up_to_max_chars():
    doc = "\n\n".join(_para(i) for i in range(6))
    segs = segment_document("d", doc, max_chars=len(_para(0)) * 2 + 10)
    assert len(segs) == 3
    assert all(s.text.count("Paragraph") == 2 for s in segs)
    assert all(len(s.text) <= len(_para(0)) * 2 + 10 for s in segs)


def test_plain_text_without_blank_lines_splits_long_block_at_lines():
    doc = "\n".join(_para(i) for i in range(6))
    segs = segment_document("d", doc, max_chars=len(_para(0)) * 3 + 10)
    assert len(segs) == 2


def test_repetition_measures():
    assert duplicate_line_fraction("a\nb\na\nc") == 0.5
    assert duplicate_line_fraction("a\nb\nc") == 0.0
    assert top_ngram_fraction(PARA) == 0.0
    assert top_ngram_fraction("buy now " * 40) > 0.3
    assert duplicate_ngram_fraction(PARA) == 0.0
    assert duplicate_ngram_fraction("one two three four five " * 3) == 1.0
    assert boilerplate_line_fraction("Home\nSign up for our newsletter\nAccept cookies\nText") == 0.5


def test_filter_reasons():
    cfg = CorpusSection(min_chars=50, max_chars=400)
    assert filter_reason("short", cfg) == "too_short"
    assert filter_reason("x " * 300, cfg) == "too_long"
    assert filter_reason(PARA, cfg) is None
    assert filter_reason("\n".join(["Same line here again"] * 6), cfg) == "duplicate_lines"
    nav = "\n".join(["Click here to subscribe", "Privacy Policy", "Terms of Use", PARA])
    assert filter_reason(nav, cfg) == "boilerplate"


def test_dedup_exact_and_near():
    base = " ".join(f"word{i}" for i in range(200))
    near = base.replace("word100", "changed")
    other = " ".join(f"other{i}" for i in range(200))
    rows = [{"segment_id": f"s{i}", "text": t} for i, t in enumerate([base, base.upper(), near, other])]
    kept, removed = deduplicate(rows, threshold=0.7, num_perm=128)
    assert [r["segment_id"] for r in kept] == ["s0", "s3"]
    assert {r["segment_id"]: r["reason"] for r in removed} == {"s1": "exact_duplicate", "s2": "near_duplicate"}
    assert all(r["duplicate_of"] == "s0" for r in removed)


def test_prepare_corpus_accounts_for_every_segment():
    docs = [{"doc_id": f"d{i}", "text": f"# T\n\n{_para(1)}\n\n# U\n\ntiny"} for i in range(3)]
    docs.append({"doc_id": "other", "text": _para(9) + " " + _para(10)})
    kept, removed, stats = prepare_corpus(docs, CorpusSection(min_chars=100, max_chars=1000, max_segments=1), seed=0)
    assert stats["segments"] == 7
    assert len(kept) == 1
    assert sum(stats["removed"].values()) + stats["kept"] == stats["segments"]
    assert stats["removed"] == {"too_short": 3, "exact_duplicate": 2, "sampled_out": 1}
