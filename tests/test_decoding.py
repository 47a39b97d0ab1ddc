"""The engine's decoding loop against transformers' own generate, and its sampler against the
exact top-p distribution."""

from __future__ import annotations

import pytest
import torch

from pipeline.decoding import CANDIDATES, decode, length_groups, pick_tokens
from pipeline.models import load_model, load_tokenizer


@pytest.fixture(scope="module")
def model_and_batch(tiny_model):
    model = load_model(str(tiny_model)).eval()
    tok = load_tokenizer(str(tiny_model))
    texts = ["Hi", "Explain tides in one long sentence please.", "What is the capital of France?", "Count."]
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, seqs))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    return model, ids, mask, pad


@torch.inference_mode()
def test_greedy_matches_transformers_generate(model_and_batch):
    model, ids, mask, pad = model_and_batch
    ours = decode(model, ids, mask, max_new_tokens=10, eos_ids=[], pad_id=pad)
    theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                            eos_token_id=None, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    assert ours == theirs[:, ids.shape[1]:].tolist()


@torch.inference_mode()
def test_rows_that_finish_early_do_not_change_the_others(model_and_batch):
    model, ids, mask, pad = model_and_batch
    free = decode(model, ids, mask, max_new_tokens=8, eos_ids=[], pad_id=pad)
    # Make row 0's third token an "EOS": row 0 stops there and leaves the batch; the others go on.
    eos = free[0][2]
    got = decode(model, ids, mask, max_new_tokens=8, eos_ids=[eos], pad_id=pad)
    for row, tokens in zip(free, got):
        cut = row.index(eos) + 1 if eos in row else len(row)
        assert tokens == row[:cut]
    assert got[0] == free[0][:3]
    alone = [decode(model, ids[i:i + 1, mask[i].argmax():], mask[i:i + 1, mask[i].argmax():], max_new_tokens=8,
                    eos_ids=[eos], pad_id=pad)[0] for i in range(len(ids))]
    assert got == alone


@torch.inference_mode()
def test_min_new_tokens_and_stop_callback(model_and_batch):
    model, ids, mask, pad = model_and_batch
    free = decode(model, ids, mask, max_new_tokens=6, eos_ids=[], pad_id=pad)
    eos = free[1][0]
    forced = decode(model, ids, mask, max_new_tokens=6, min_new_tokens=6, eos_ids=[eos], pad_id=pad)
    assert all(len(t) == 6 and eos not in t for t in forced)
    stopped = decode(model, ids, mask, max_new_tokens=6, eos_ids=[], pad_id=pad, stopped=lambda t: len(t) == 2)
    assert [len(t) for t in stopped] == [2, 2, 2, 2]


def exact_nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Reference: full sort, keep the shortest prefix holding top_p of the mass, renormalize."""
    probs = torch.softmax(logits.double() / temperature, -1)
    values, order = probs.sort(descending=True)
    keep = (values.cumsum(-1) - values) < top_p
    out = torch.zeros_like(probs)
    out[order[keep]] = values[keep]
    return out / out.sum()


@pytest.mark.parametrize("case", ["peaked", "flat"])
def test_top_p_sampling_follows_the_exact_nucleus(case):
    gen = torch.Generator().manual_seed(0)
    vocab = 500
    if case == "peaked":  # the nucleus lies within the first CANDIDATES tokens
        logits = -0.5 * torch.arange(vocab, dtype=torch.float)
    else:  # too flat: the top CANDIDATES hold less than top_p, the full sort is needed
        logits = -0.002 * torch.arange(vocab, dtype=torch.float)
    logits = logits[torch.randperm(vocab, generator=gen)]
    want = exact_nucleus(logits, 0.7, 0.9)
    support = int((want > 0).sum())
    assert (support < CANDIDATES) == (case == "peaked")
    draws = pick_tokens(logits.expand(20000, vocab).clone(), 0.7, 0.9, gen)
    freq = torch.bincount(draws, minlength=vocab).double() / len(draws)
    assert set(draws.unique().tolist()) <= set(torch.nonzero(want).flatten().tolist())
    # As close to the exact distribution as an equally large sample drawn from it directly.
    direct = torch.bincount(torch.multinomial(want, len(draws), replacement=True, generator=gen),
                            minlength=vocab).double() / len(draws)
    sampling_error = (direct - want).abs().sum()
    assert (freq - want).abs().sum() < 1.25 * sampling_error
    assert (freq - want).abs().max() < 0.02


def test_greedy_and_no_nucleus():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    assert pick_tokens(logits, 0.0, 0.9).tolist() == [1, 0]
    gen = torch.Generator().manual_seed(1)
    draws = pick_tokens(torch.zeros(6000, 3), 1.0, 1.0, gen)
    assert torch.bincount(draws, minlength=3).min() > 1800  # uniform over all three


def test_prefill_groups_rows_of_similar_length():
    # Longest first; a group stops at 80% of its longest prompt or at max_rows.
    assert length_groups([1, 9, 5, 10, 2]) == [[3, 1], [2], [4], [0]]
    assert length_groups([10] * 5, max_rows=2) == [[0, 1], [2, 3], [4]]
    assert length_groups([100, 81, 80, 79]) == [[0, 1, 2], [3]]
