"""Generation on several Ray workers (engine.workers > 1): the augmentation stage on two local Ray
workers writes the same rows as in one process; a worker killed mid-chunk has that chunk redone;
chunks committed before an interruption are reused, not recomputed. Offline, on the tiny model."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from harness import stages
from harness.config import load_config
from harness.rundir import RunDir, StageResult
from pipeline import faults
from pipeline.ray_pool import KILL_ENV, LocalPool, PoolSettings, RayPool, connect

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parent.parent
SEGMENTS = 8
CHUNK = 2  # four chunks


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module: two CPU slots, as ``engine.workers=2`` would start."""
    ray_module = connect(PoolSettings(workers=2, cpus=1))
    yield ray_module
    ray_module.shutdown()


@pytest.fixture(scope="module")
def inputs(tiny_model, tmp_path_factory):
    """The augment stage's upstream stages: seed pairs, corpus segments, the backward model."""
    root = tmp_path_factory.mktemp("upstream")
    seed_rows = _read(REPO / "pipeline" / "resources" / "demo_seed.jsonl")
    (root / "seed").mkdir()
    (root / "seed" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in seed_rows[:12]))
    segments = [{"segment_id": f"s{i}", "text": r["response"]} for i, r in enumerate(seed_rows[12:12 + SEGMENTS])]
    (root / "corpus").mkdir()
    (root / "corpus" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in segments))
    seed = StageResult("seed", root / "seed", {"output_digest": "seed-test", "stats": {}})
    corpus = StageResult("corpus", root / "corpus", {"output_digest": "corpus-test", "stats": {}})
    backward = stages.model_input(str(tiny_model), name="backward")
    return seed, corpus, backward


def _cfg(workers: int):
    return load_config(None, ["engine.device=cpu", "engine.bf16=off", "engine.kv_cache_gib=null",
                              f"engine.workers={workers}", "engine.worker_cpus=1", f"augment.chunk_size={CHUNK}",
                              "augment.batch_size=2", "augment.max_new_tokens=12",
                              "augment.drop_unfinished=false"])


def _augment(root: Path, workers: int, inputs) -> tuple[StageResult, float]:
    started = time.perf_counter()
    result = stages.augment_corpus(RunDir(root), _cfg(workers), *inputs)
    return result, time.perf_counter() - started


def _rows(result: StageResult) -> list[dict]:
    return _read(result.path / "candidates.jsonl") + _read(result.path / "rejects.jsonl")


@pytest.fixture(scope="module")
def one_worker(inputs, tmp_path_factory):
    result, seconds = _augment(tmp_path_factory.mktemp("one"), 1, inputs)
    print(f"\naugment, 1 worker (in process): {seconds:.1f} s")
    return result


def test_pool_settings_from_the_engine_section():
    assert stages.pool_settings(_cfg(1)) == PoolSettings()
    pool = stages.pool_settings(load_config(None, ["engine.device=cpu", "engine.workers=3", "engine.worker_cpus=2",
                                                   "engine.ray_address=auto"]))
    assert pool == PoolSettings(workers=3, address="auto", cpus=2.0, gpus=0.0)  # auto: no GPU for a CPU engine
    gpu = load_config(None, ["engine.device=cuda", "engine.backend=transformers", "engine.workers=2"])
    assert stages.pool_settings(gpu).gpus == 1.0
    half = load_config(None, ["engine.device=cuda", "engine.workers=4", "engine.worker_gpus=0.5"])
    assert stages.pool_settings(half).gpus == 0.5
    assert isinstance(stages.engine_pool("unused", _cfg(1), 2), LocalPool)  # no Ray for one worker
    worker = stages.worker_config(load_config(None, ["engine.device=cpu", "engine.workers=2"]), pool)
    assert worker.engine.threads == 2 and worker.engine.bf16 in ("on", "off")  # decided once, by the driver


@pytest.mark.slow
def test_two_ray_workers_write_what_one_process_writes(local_ray, inputs, one_worker, tmp_path):
    two, seconds = _augment(tmp_path / "two", 2, inputs)
    print(f"augment, 2 Ray workers: {seconds:.1f} s")
    expected = _rows(one_worker)
    assert len(expected) == SEGMENTS
    assert _rows(two) == expected
    assert (two.path / "candidates.jsonl").read_bytes() == (one_worker.path / "candidates.jsonl").read_bytes()
    # every chunk's new tokens came back from the workers and add up to the one engine's count
    assert two.stats["new_tokens"] == one_worker.stats["new_tokens"] > 0


@pytest.mark.slow
def test_a_killed_worker_has_its_chunk_redone_and_committed_chunks_are_reused(local_ray, inputs, one_worker,
                                                                             tmp_path, monkeypatch):
    root = tmp_path / "run"
    # First try: the disk "fills up" right after the second chunk is committed, and the stage stops.
    faults.reset_counts()
    monkeypatch.setenv(faults.FAULT_ENV, "chunk.committed@augment:2:ENOSPC")
    with pytest.raises(OSError):
        _augment(root, 2, inputs)
    monkeypatch.delenv(faults.FAULT_ENV)
    chunk_dir = root / "augment.partial" / "_scratch" / "progress" / "chunks"
    committed = sorted(chunk_dir.glob("*.jsonl"))
    assert len(committed) == 2
    # Mark one committed chunk's rows: if the resumed stage recomputed that chunk, the mark would go.
    marked = committed[0]
    rows = _read(marked)
    marked.write_text("".join(json.dumps({**r, "instruction": "REUSED " + r["instruction"]}) + "\n" for r in rows))
    reused_ids = {r["segment_id"] for r in rows}
    # Second try: the worker handed one of the chunks still to do dies on it (once).
    todo = sorted({f"{i:05d}.jsonl" for i in range(SEGMENTS // CHUNK)} - {p.name for p in committed})
    victim = int(todo[0].split(".")[0])
    mark = tmp_path / "killed"
    monkeypatch.setenv(KILL_ENV, f"{victim}:{mark}")
    resumed, seconds = _augment(root, 2, inputs)
    print(f"augment, 2 Ray workers, resumed with a worker killed: {seconds:.1f} s")
    assert mark.exists()  # a worker did die on that chunk
    assert int(mark.read_text()) != os.getpid()
    got = {r["segment_id"]: r for r in _rows(resumed)}
    for want in _rows(one_worker):
        have = got.pop(want["segment_id"])
        if want["segment_id"] in reused_ids:
            assert have == {**want, "instruction": "REUSED " + want["instruction"]}
        else:
            assert have == want  # the killed worker's chunk included
    assert not got


@pytest.mark.slow
def test_ray_pool_maps_chunks_in_order_and_sums_counters(local_ray, tmp_path):
    """The generic pool without a stage: a state built once per worker process, rows in chunk
    order whatever order the chunks finish in, counters summed over the workers."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    with RayPool(PoolSettings(workers=2, cpus=1), list, counters=_seen) as pool:
        pids = pool.pids()
        assert len(set(pids)) == 2 and os.getpid() not in pids
        out = pool.map_chunks(list(range(7)), _square_chunk, work=tmp_path, chunk_size=3, desc="squares")
        assert out == [{"x": x, "y": x * x} for x in range(7)]
        assert sorted(p.name for p in (tmp_path / "chunks").iterdir()) == ["00000.jsonl", "00001.jsonl", "00002.jsonl"]
        assert pool.counters() == {"seen": 7}
        assert pool.call(len) <= 7


def _seen(state: list) -> dict[str, float]:
    return {"seen": len(state)}


def _square_chunk(state: list, index: int, chunk) -> list[dict]:
    state.extend(chunk)
    return [{"x": x, "y": x * x} for x in chunk]


@pytest.mark.slow
def test_alpaca_answers_on_two_workers_match_one_process(local_ray, tiny_model, tmp_path):
    """The AlpacaEval answering path with engine.workers=2: chunks of 4 x eval.batch_size answers,
    committed as chunk files; greedy answers equal to one process's on the tiny model."""
    from functools import partial

    from harness import evaluate

    seed_rows = _read(REPO / "pipeline" / "resources" / "demo_seed.jsonl")
    instructions = [{"instruction": r["instruction"], "dataset": "test"} for r in seed_rows[:12]]
    answer = partial(evaluate._answer_chunk, "tiny", None, 10, 0)
    extra = ["eval.batch_size=2"]
    one = load_config(None, ["engine.device=cpu", "engine.bf16=off", "engine.kv_cache_gib=null", *extra])
    with stages.engine_pool(str(tiny_model), one, 2) as pool:
        expected = pool.call(lambda engine: answer(engine, 0, instructions))
    two = load_config(None, ["engine.device=cpu", "engine.bf16=off", "engine.kv_cache_gib=null",
                             "engine.workers=2", *extra])
    with stages.engine_pool(str(tiny_model), two, 2) as pool:
        got = pool.map_chunks(instructions, answer, work=tmp_path, chunk_size=evaluate.ANSWER_CHUNK_BATCHES * 2,
                              desc="answers")
    assert len(list((tmp_path / "chunks").glob("*.jsonl"))) == 2
    assert [r["instruction"] for r in got] == [r["instruction"] for r in instructions]
    assert got == expected
