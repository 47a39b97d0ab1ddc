"""Each pipeline stage as a cached, committed step of the run directory.

A function here reads its inputs from upstream stage folders, calls the pure algorithm in
``pipeline/``, and writes data, rejects and counts into its own folder. The settings it passes
to :meth:`RunDir.stage` are exactly those that change its output.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import torch

from harness.config import RunConfig
from evals import quality
from harness.rundir import RunDir, StageContext, StageResult
from pipeline.digests import model_dir_digest
from pipeline import augment, corpus, curate, data, hardware
from pipeline.engine import Engine, TransformersEngine
from pipeline.finetune import cache_settings, finetune
from pipeline.io import read_jsonl, write_json_atomic, write_jsonl
from pipeline.models import is_adapter, load_model, load_tokenizer, resolve_base
from pipeline.prompts import backward_messages, forward_messages
from pipeline.ray_pool import PoolSettings, open_pool

log = logging.getLogger(__name__)

MODEL = "model"


def base_model(cfg: RunConfig) -> StageResult:
    """The base model as a pseudo stage: its resolved location and a digest of its weights."""
    return model_input(cfg.model.base, cfg.model.revision)


def model_input(spec: str, revision: str | None = None, name: str = "base") -> StageResult:
    """Any model spec as a pseudo stage, so stages can take it as an input like a trained model."""
    resolved = resolve_base(spec, revision)
    path = Path(resolved)
    if path.is_dir():
        digest = model_dir_digest(path)
    else:
        digest = f"{resolved}@{revision or 'main'}"
    return StageResult(name, path, {"output_digest": digest, "resolved": resolved})


def system_prompt(cfg: RunConfig) -> str | None:
    ft = cfg.finetune
    return {"seed": ft.seed_tag, "web": ft.web_tag, "both": f"{ft.seed_tag} {ft.web_tag}", "none": None}[ft.inference_tag]


def make_engine(model_path: str, cfg: RunConfig, batch_size: int) -> Engine:
    """The engine a stage generates and scores with (``engine.backend``)."""
    hardware.configure_threads(cfg.engine.threads)
    if engine_backend(cfg) == "vllm":
        return make_vllm_engine(model_path, cfg)
    # bf16 weights, not autocast: autocast would re-cast every fp32 weight at every decoding step.
    dtype = torch.bfloat16 if engine_bf16(cfg) else torch.float32
    # A plain model loads in its engine dtype, so no fp32 copy of it ever exists (a 7B model: 14
    # instead of 28 GB while loading). An adapter is merged into its base in fp32 and the merged
    # weights rounded once; they are cast before they move, so the device never holds fp32.
    model = load_model(model_path, dtype=torch.float32 if is_adapter(model_path) else dtype)
    model = model.to(device=engine_device(cfg), dtype=dtype)
    tokenizer = load_tokenizer(model_path, cfg.model.chat_template)
    return TransformersEngine(model, tokenizer, batch_size=batch_size, kv_cache_gib=cfg.engine.kv_cache_gib)


def make_vllm_engine(model_path: str, cfg: RunConfig) -> Engine:
    """vLLM serving ``model_path``: a LoRA adapter is served on its base, never merged."""
    from pipeline.vllm_engine import VllmEngine

    base, adapter = model_path, None
    if is_adapter(model_path):
        adapter = model_path
        base = json.loads((Path(model_path) / "adapter_config.json").read_text())["base_model_name_or_path"]
    device = torch.device(engine_device(cfg)).type
    kv = cfg.engine.kv_cache_gib
    if device == "cpu" and kv == "auto":
        kv = hardware.kv_cache_budget_gib("auto", torch.device("cpu"))
    e = cfg.engine
    return VllmEngine(base, load_tokenizer(model_path, cfg.model.chat_template), adapter=adapter,
                      dtype="bfloat16" if engine_bf16(cfg) else "float32", device=device, python=e.vllm_python,
                      kv_cache_gib=kv if device == "cpu" and isinstance(kv, (int, float)) else None,
                      tensor_parallel_size=e.tensor_parallel_size, gpu_memory_utilization=e.gpu_memory_utilization,
                      enforce_eager=e.vllm_enforce_eager, seed=cfg.run.seed)


def engine_backend(cfg: RunConfig) -> str:
    """``engine.backend`` resolved: ``auto`` is vLLM on a GPU when its environment is found (said
    in the log when it is not), else the in-process engine."""
    backend = cfg.engine.backend
    if backend != "auto":
        return backend
    if torch.device(engine_device(cfg)).type != "cuda":
        return "transformers"
    from pipeline.vllm_engine import VllmUnavailable, find_python

    try:
        find_python(cfg.engine.vllm_python)
    except VllmUnavailable as exc:
        log.warning("engine.backend auto: the in-process engine on the GPU, since %s", exc)
        return "transformers"
    return "vllm"


def backend_settings(cfg: RunConfig) -> dict[str, Any]:
    """The engine backend as a stage setting, present only when it is not the in-process engine
    (so stages computed before backends existed stay valid)."""
    backend = engine_backend(cfg)
    return {} if backend == "transformers" else {"engine_backend": backend}


def engine_device(cfg: RunConfig) -> str:
    """``engine.device`` resolved: ``auto`` is CUDA when torch sees a GPU, else the CPU."""
    return hardware.default_device_type() if cfg.engine.device == "auto" else cfg.engine.device


def engine_bf16(cfg: RunConfig) -> bool:
    """Whether generation and scoring run with bf16 weights (``engine.bf16``)."""
    return hardware.use_bf16(cfg.engine.bf16, torch.device(engine_device(cfg)).type)


def model_path(result: StageResult) -> str:
    if "resolved" in result.manifest:
        return result.manifest["resolved"]
    return str(result.path / MODEL)


def pool_settings(cfg: RunConfig) -> PoolSettings:
    """Where generation runs (``engine.workers``, ``engine.ray_address``, ``engine.worker_*``)."""
    e = cfg.engine
    if e.workers == 1:
        return PoolSettings()
    gpus = e.worker_gpus
    if gpus == "auto":
        on_cuda = e.device.startswith("cuda") or (e.device == "auto" and torch.cuda.is_available())
        gpus = (e.tensor_parallel_size if engine_backend(cfg) == "vllm" else 1) if on_cuda else 0
    return PoolSettings(workers=e.workers, address=e.ray_address, cpus=e.worker_cpus, gpus=float(gpus))


def worker_config(cfg: RunConfig, pool: PoolSettings) -> RunConfig:
    """The config a Ray worker builds its engine from. Its torch threads are the CPUs it reserves
    (unless ``engine.threads`` says), and ``engine.bf16: auto`` for a CPU engine is decided here,
    once: the choice is measured, and workers measuring apart could differ, and their rows too."""
    update: dict[str, Any] = {}
    if cfg.engine.threads is None:
        update["threads"] = max(1, int(pool.cpus))
    if cfg.engine.bf16 == "auto" and not pool.gpus and torch.device(engine_device(cfg)).type == "cpu":
        update["bf16"] = "on" if engine_bf16(cfg) else "off"
    return cfg.model_copy(update={"engine": cfg.engine.model_copy(update=update)})


def engine_pool(model: str, cfg: RunConfig, batch_size: int):
    """The engine(s) a generation stage runs its chunks on: one in this process
    (``engine.workers: 1``), or one per Ray worker (pipeline/ray_pool.py)."""
    pool = pool_settings(cfg)
    worker_cfg = cfg if pool.workers == 1 else worker_config(cfg, pool)
    return open_pool(pool, partial(make_engine, model, worker_cfg, batch_size), _engine_counters)


def _engine_counters(engine: Engine) -> dict[str, float]:
    return dict(getattr(engine, "stats", {}))


def _tokenizer(engine: Engine):
    return engine.tokenizer


def _augment_chunk(settings, template: str, run_seed: int, engine: Engine, index: int, chunk) -> list[dict[str, Any]]:
    """One augmentation chunk; its sampling seed comes from the chunk's index alone."""
    return augment.generate_instructions(engine, chunk, settings, template, seed=run_seed * 100_003 + index)


def _curate_chunk(settings, system: str | None, run_seed: int, engine: Engine, index: int,
                  chunk) -> list[dict[str, Any]]:
    """One curation chunk; its sampling seed comes from the chunk's index alone."""
    return curate.score_pairs(engine, chunk, settings, system, seed=run_seed * 100_003 + index)


def _score_pairs(pairs, settings, system: str | None, seed: int, engine: Engine) -> list[dict[str, Any]]:
    return curate.score_pairs(engine, pairs, settings, system, seed=seed)


def _calibrate_curator(cfg: RunConfig, system: str | None, n: int, seed: int, engine: Engine):
    from harness.calibration import calibrate_curator

    return calibrate_curator(engine, cfg, system, n, seed=seed)


def _sources(paths: list[str], cfg: RunConfig) -> list[str]:
    return [data.resolve_source(p, cfg.data.dir) for p in paths]


@lru_cache(maxsize=4)
def _contamination(data_dir: str | None, n: int, alpaca_source: str = "local",
                   alpaca_reference: str = "text_davinci_003", hub_revision: str | None = None,
                   hub_tasks: tuple[str, ...] = ()) -> tuple[quality.ContaminationIndex | None, quality.EvalPromptSets]:
    """The evaluation prompts' n-gram index, and the sets found (with where from) and not checked.

    AlpacaEval's prompts come from where evaluation reads them (``eval.alpaca_source``): with the
    hub, the file is fetched here (and cached); if that fails, AlpacaEval is reported unchecked.
    lm-eval hub tasks (``eval.heldout_hub_tasks``) are always reported unchecked."""
    sets = quality.collect_eval_prompt_sets(data_dir, alpaca_source=alpaca_source, alpaca_reference=alpaca_reference,
                                            hub_revision=hub_revision, hub_tasks=hub_tasks)
    if sets.not_checked:
        log.warning("contamination check: not checked against %s",
                    "; ".join(f"{name} ({why})" for name, why in sets.not_checked.items()))
    return (quality.ContaminationIndex(sets.found, n) if sets.found else None), sets


def _eval_contamination(cfg: RunConfig) -> tuple[quality.ContaminationIndex | None, quality.EvalPromptSets]:
    ev = cfg.eval
    if not ev.enabled:
        off = "evaluation is disabled (eval.enabled=false)"
        return None, quality.EvalPromptSets(not_checked={name: off for name in quality.EVAL_PROMPT_FILES})
    return _contamination(ev.data_dir, ev.contamination_n, ev.alpaca_source, ev.alpaca_reference,
                          ev.alpaca_hub_revision, tuple(ev.heldout_hub_tasks))


def contamination_settings(cfg: RunConfig) -> dict[str, Any]:
    _, sets = _eval_contamination(cfg)
    return {"n": cfg.eval.contamination_n, "fields": cfg.eval.contamination_fields, "sets": sets.fingerprints}


def drop_contaminated(rows: list[dict[str, Any]], cfg: RunConfig) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """Rows sharing a word n-gram with any evaluation prompt are removed, with the sets they hit.

    The stats say what was checked and what was not: ``checked_against`` (set names),
    ``sources`` (``local:<path>`` or ``hub:<repo>/<file>`` per checked set), ``not_checked``
    (names) and ``not_checked_reasons`` (name -> why)."""
    index, sets = _eval_contamination(cfg)
    report = {"not_checked": list(sets.not_checked), "not_checked_reasons": dict(sets.not_checked),
              "sources": dict(sorted(sets.origins.items()))}
    if index is None:
        return rows, [], {"contaminated": 0, "checked_against": [], **report}
    flags = {f["index"]: f["eval_sets"] for f in index.flag(rows, cfg.eval.contamination_fields)}
    clean = [r for i, r in enumerate(rows) if i not in flags]
    dropped = [{**r, "contamination": flags[i]} for i, r in enumerate(rows) if i in flags]
    stats = {"contaminated": len(dropped), "checked_against": sorted(index.sizes), **report}
    return clean, dropped, stats


def prepare_seed(run: RunDir, cfg: RunConfig) -> StageResult:
    sources = _sources(cfg.seed.path, cfg)

    def fn(ctx: StageContext) -> dict[str, Any]:
        loaded = data.load_pairs(sources, cfg.seed.instruction_field, cfg.seed.response_field, cfg.seed.limit)
        rows, dropped, contamination = drop_contaminated(loaded.rows, cfg)
        rejects = [r.as_row() for r in loaded.rejects]
        rejects += [{"file": r["origin"], "line": None, "reason": f"contamination: overlaps {', '.join(r['contamination'])}",
                     "preview": r["instruction"][:200]} for r in dropped]
        if not rows:
            raise data.DataError(f"every seed pair in {', '.join(sources)} overlaps an evaluation set")
        write_jsonl(ctx.work / "data.jsonl", rows)
        write_jsonl(ctx.work / "rejects.jsonl", rejects)
        return {**loaded.stats(), "kept": len(rows), **contamination}

    settings = {"seed": cfg.seed.model_dump(), "sources": {s: data.source_fingerprint(s) for s in sources},
                "contamination": contamination_settings(cfg)}
    return run.stage("seed", fn, version="seed_v1", settings=settings)


def prepare_corpus(run: RunDir, cfg: RunConfig) -> StageResult:
    sources = _sources(cfg.unlabelled.path, cfg)

    def fn(ctx: StageContext) -> dict[str, Any]:
        docs = data.load_documents(sources, cfg.unlabelled.text_field, cfg.unlabelled.limit)
        kept, removed, stats = corpus.prepare_corpus(docs.rows, cfg.corpus, cfg.run.seed)
        if not kept:
            raise data.DataError(f"no segment of {', '.join(sources)} survived corpus filtering: {stats['removed']}")
        write_jsonl(ctx.work / "data.jsonl", kept)
        write_jsonl(ctx.work / "removed.jsonl", removed)
        write_jsonl(ctx.work / "rejects.jsonl", (r.as_row() for r in docs.rejects))
        return {**stats, "documents_rejected": len(docs.rejects), "sources_read": docs.sources}

    settings = {
        "unlabelled": cfg.unlabelled.model_dump(),
        "corpus": corpus.cache_settings(cfg.corpus),
        "seed": cfg.run.seed,
        "sources": {s: data.source_fingerprint(s) for s in sources},
    }
    return run.stage("corpus", fn, version="corpus_v1", settings=settings)


def train(run: RunDir, name: str, chats_fn, cfg: RunConfig, section: str, inputs: dict[str, StageResult]) -> StageResult:
    """A fine-tuning stage; ``chats_fn(inputs)`` builds the training chats from upstream data."""
    train_cfg = getattr(cfg, section)

    def fn(ctx: StageContext) -> dict[str, Any]:
        chats = chats_fn(ctx.inputs)
        stats = finetune(
            model_path(ctx.inputs["base"]), chats, train_cfg, ctx.work / MODEL, ctx.scratch,
            seed=cfg.run.seed, chat_template=cfg.model.chat_template,
        )
        return {"train_pairs": len(chats), **stats}

    settings = {
        "train": {k: v for k, v in cache_settings(train_cfg).items() if k != "inference_tag"},
        "chat_template": cfg.model.chat_template,
        "seed": cfg.run.seed,
    }
    return run.stage(name, fn, version="sft_v1", settings=settings, inputs=inputs)


def train_backward(run: RunDir, cfg: RunConfig, seed: StageResult, base: StageResult) -> StageResult:
    def chats(inputs):
        return [
            backward_messages(r["response"], cfg.backward.template) + [{"role": "assistant", "content": r["instruction"]}]
            for r in read_jsonl(inputs["seed"].path / "data.jsonl")
        ]

    return train(run, "backward", chats, cfg, "backward", {"seed": seed, "base": base})


def train_forward(
    run: RunDir, cfg: RunConfig, iteration: int, seed: StageResult, base: StageResult, selected: StageResult | None
) -> StageResult:
    """M_t: seed pairs tagged as assistant answers, selected pairs tagged as web knowledge."""
    ft = cfg.finetune

    def chats(inputs):
        rows = [(r, ft.seed_tag) for r in read_jsonl(inputs["seed"].path / "data.jsonl")]
        if "selected" in inputs:
            rows += [(r, ft.web_tag) for r in read_jsonl(inputs["selected"].path / "data.jsonl")]
        return [
            forward_messages(r["instruction"], tag) + [{"role": "assistant", "content": r["response"]}]
            for r, tag in rows
        ]

    inputs = {"seed": seed, "base": base} | ({"selected": selected} if selected is not None else {})
    return train(run, f"iter_{iteration:02d}/finetune", chats, cfg, "finetune", inputs)


def augment_corpus(run: RunDir, cfg: RunConfig, seed: StageResult, segments: StageResult,
                   backward: StageResult) -> StageResult:
    """An instruction for every segment, within a new-token budget measured on the seed's
    instructions (``augment.max_new_tokens: auto``); rejects counted by reason."""

    def fn(ctx: StageContext) -> dict[str, Any]:
        rows = read_jsonl(ctx.inputs["corpus"].path / "data.jsonl")
        with engine_pool(model_path(ctx.inputs["backward"]), cfg, cfg.augment.batch_size) as pool:
            budget, budget_stats = instruction_budget(pool.call(_tokenizer), ctx.inputs["seed"], cfg)
            settings = cfg.augment.model_copy(update={"max_new_tokens": budget})
            out = pool.map_chunks(rows, partial(_augment_chunk, settings, cfg.backward.template, cfg.run.seed),
                                  work=ctx.scratch / "progress", chunk_size=cfg.augment.chunk_size, desc="augment")
            new_tokens = pool.counters().get("new_tokens", 0)
        kept = [r for r in out if r["rejected"] is None]
        write_jsonl(ctx.work / "candidates.jsonl", (augment.candidate(r) for r in kept))
        write_jsonl(ctx.work / "rejects.jsonl", (r for r in out if r["rejected"] is not None))
        salvaged = [r for r in kept if r.get("salvaged_from")]
        write_jsonl(ctx.work / "salvaged.jsonl", salvaged)
        reasons: dict[str, int] = {}
        for r in out:
            if r["rejected"]:
                reasons[r["rejected"]] = reasons.get(r["rejected"], 0) + 1
        if not kept:
            raise data.DataError(f"augmentation produced no usable instruction for {len(out)} segments: {reasons} "
                                 f"('unfinished': the backward model did not end its instruction within "
                                 f"{budget} new tokens)")
        return {"segments": len(out), "generated": len(kept), "rejected": dict(sorted(reasons.items())),
                "salvaged": len(salvaged), "budget": budget_stats,
                "instruction_tokens": augment.length_summary([r["new_tokens"] for r in kept]),
                "new_tokens": new_tokens}

    settings = {"augment": cfg.augment.model_dump(), "template": cfg.backward.template, "seed": cfg.run.seed,
                "engine_bf16": cfg.engine.bf16, **backend_settings(cfg)}
    return run.stage("augment", fn, version="augment_v2", settings=settings,
                     inputs={"corpus": segments, "backward": backward, "seed": seed})


def instruction_budget(tokenizer, seed: StageResult, cfg: RunConfig) -> tuple[int, dict[str, Any]]:
    """Augmentation's new-token budget and how it was set, measured on the seed's instructions with
    the backward model's tokenizer; logged, and warned about when a fixed budget cuts seed ones."""
    lengths = augment.instruction_token_lengths(
        lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]),
        [r["instruction"] for r in read_jsonl(seed.path / "data.jsonl")])
    budget, info = augment.token_budget(lengths, cfg.augment)
    s = info["seed_instruction_tokens"]
    how = (f"p{cfg.augment.budget_quantile * 100:g} {info['quantile_tokens']} x {cfg.augment.budget_margin:g}"
           if info["source"] == "auto" else "augment.max_new_tokens")
    log.info("augment: budget %d new tokens (%s); seed instructions in the backward model's tokens, end of turn "
             "included: n=%d, median %s, p90 %s, p95 %s, max %s", budget, how, s["n"], s["p50"], s["p90"], s["p95"],
             s["max"])
    if info["seed_over_budget"]:
        log.warning("augment: %d of %d seed instructions are longer than the budget of %d new tokens: instructions "
                    "like theirs would be cut (augment.max_new_tokens: auto sets it from them)",
                    info["seed_over_budget"], s["n"], budget)
    return budget, info


def curate_candidates(run: RunDir, cfg: RunConfig, iteration: int, candidates: StageResult, model: StageResult) -> StageResult:
    system = system_prompt(cfg)

    def fn(ctx: StageContext) -> dict[str, Any]:
        pairs = read_jsonl(ctx.inputs["candidates"].path / "candidates.jsonl")
        with engine_pool(model_path(ctx.inputs["model"]), cfg, cfg.curate.batch_size) as pool:
            scores = pool.map_chunks(pairs, partial(_curate_chunk, cfg.curate, system, cfg.run.seed),
                                     work=ctx.scratch / "progress", chunk_size=cfg.curate.chunk_size,
                                     desc=f"curate iter {iteration}")
            write_jsonl(ctx.work / "scores.jsonl", scores)
            # The same curator on pairs whose quality is known, for precision and recall at k.
            labelled = [{**r, "segment_id": f"labelled-{i}"}
                        for i, r in enumerate(quality.load_labelled_pairs(n=cfg.curate.smoke_pairs))]
            checks = pool.call(partial(_score_pairs, labelled, cfg.curate, system, cfg.run.seed))
            write_jsonl(ctx.work / "labelled_scores.jsonl",
                        ({**c, "label": r["label"]} for c, r in zip(checks, labelled)))
            values = [s["score"] for s in scores]
            unscored = sum(v is None for v in values)
            stats = {"pairs": len(scores), "histogram": curate.score_histogram(values), "unscored": unscored,
                     "unscored_rate": round(unscored / len(scores), 4) if scores else 0.0, "mode": cfg.curate.mode,
                     "planted": curate.planted_counts(scores)}
            if cfg.curate.calibration_pairs:
                # The same curator on answer pairs labelled outside the project (evals/calibration).
                from harness.calibration import curator_headline

                result, rows = pool.call(partial(_calibrate_curator, cfg, system, cfg.curate.calibration_pairs,
                                                 cfg.run.seed))
                write_json_atomic(ctx.work / "calibration.json", result)
                write_jsonl(ctx.work / "calibration_ratings.jsonl", rows)
                stats["calibration"] = curator_headline(result)
        return stats

    settings = {"curate": cfg.curate.model_dump(), "system": system, "seed": cfg.run.seed, "engine_bf16": cfg.engine.bf16,
                **backend_settings(cfg)}
    return run.stage(f"iter_{iteration:02d}/curate", fn, version="curate_v4", settings=settings,
                     inputs={"candidates": candidates, "model": model})


def calibrated_k(scores: StageResult) -> float:
    """The threshold the curate stage's calibration suggests (``select.k: calibrated``)."""
    k = (scores.stats.get("calibration") or {}).get("suggested_k")
    if k is None:
        raise data.DataError(f"select.k is 'calibrated' but {scores.path} has no calibrated threshold: set "
                             f"curate.calibration_pairs (labelled pairs the curator rates) or a numeric select.k")
    return float(k)


def select_candidates(run: RunDir, cfg: RunConfig, iteration: int, candidates: StageResult, scores: StageResult) -> StageResult:
    def fn(ctx: StageContext) -> dict[str, Any]:
        pairs = read_jsonl(ctx.inputs["candidates"].path / "candidates.jsonl")
        scored = read_jsonl(ctx.inputs["scores"].path / "scores.jsonl")
        select = cfg.select
        if select.k == "calibrated":
            select = select.model_copy(update={"k": calibrated_k(ctx.inputs["scores"])})
        kept, stats = curate.select_pairs(pairs, scored, select)
        # Pairs left out for planted rating text, with what was found (none when drop_flagged is off).
        flags = {r["segment_id"]: r["flags"] for r in scored if r.get("flags")} if select.drop_flagged else {}
        write_jsonl(ctx.work / "flagged.jsonl",
                    ({**p, "reason": "planted rating text", "flags": flags[p["segment_id"]]}
                     for p in pairs if p["segment_id"] in flags))
        stats["k_source"] = {"calibrated": "calibrated", "all": "none (select.k: all, uncurated)"}.get(
            str(cfg.select.k), "config")
        if select.k != "all":  # without a threshold there is no precision or recall at k
            labelled = read_jsonl(ctx.inputs["scores"].path / "labelled_scores.jsonl")
            stats["curator"] = quality.curator_precision_recall(
                [r["label"] for r in labelled], [r["score"] for r in labelled], select.k)
        kept, dropped, contamination = drop_contaminated(kept, cfg)
        write_jsonl(ctx.work / "data.jsonl", kept)
        write_jsonl(ctx.work / "contaminated.jsonl", dropped)
        stats.update(contamination, selected=len(kept), quality=quality.pair_metrics(kept))
        stats["keep_rate"] = round(len(kept) / stats["candidates"], 4) if stats["candidates"] else 0.0
        return stats

    settings = {"select": cfg.select.model_dump(), "contamination": contamination_settings(cfg)}
    return run.stage(f"iter_{iteration:02d}/select", fn, version="select_v2", settings=settings,
                     inputs={"candidates": candidates, "scores": scores})
