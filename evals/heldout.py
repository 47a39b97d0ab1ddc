"""Held-out task evaluation (IFEval, TruthfulQA MC1/MC2, GSM8K) through lm-evaluation-harness.

The tasks are lm-eval's own definitions, mirrored as ``humpback_*`` YAML templates in
``evals/tasks/`` so they never collide with lm-eval's built-ins, and reading local data files
instead of the hub. The data directory is a run-time setting, so the templates are filled
with the resolved absolute paths and written into ``<out_dir>/tasks/``, which lm-eval then
indexes on its own (``include_defaults=False``): what ran is on disk next to its results.

Everything lm-eval produced is kept in ``out_dir``:

```
tasks/                     the task YAMLs exactly as lm-eval read them
results.json               lm-eval's full results (config, versions, n-samples, environment)
samples_<task>.jsonl       lm-eval's per-sample log: prompt, response, filtered answer, metrics
summary.json               what :func:`run_heldout` returns
```
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from evals import bundled
from pipeline.digests import file_digest, package_versions, settings_digest
from pipeline.io import content_digest, write_json_atomic

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
TASK_PREFIX = "humpback_"
DEFAULT_TASKS = ("ifeval", "truthfulqa_mc1", "truthfulqa_mc2", "gsm8k")
# lm-eval's filter names, shortened into metric names (gsm8k reports both filters).
FILTER_SUFFIX = {"none": "", "strict-match": "_strict", "flexible-extract": "_flexible"}
# Only non-mean aggregations are bootstrapped; none of ours are, so this bounds cost only.
BOOTSTRAP_ITERS = 1000
# fp32 on every device by default: scores must not move with the hardware's preferred dtype.
DTYPE = "float32"
DTYPES = ("float32", "bfloat16")
"""What the held-out tasks may load a model in (``eval.dtype``)."""
VERSIONED_PACKAGES = (
    "lm_eval", "torch", "transformers", "peft", "datasets", "nltk", "langdetect", "llama-index-core",
)


@dataclass(frozen=True)
class HeldoutTask:
    """One held-out task: its YAML template, the data files it reads and what it includes."""

    template: str
    files: dict[str, str]
    """Placeholder name -> path relative to the data directory."""
    main_file: str
    """The placeholder whose file holds the evaluated documents (counted for ``limit``)."""
    includes: tuple[str, ...] = ()


HELDOUT_TASKS: dict[str, HeldoutTask] = {
    "ifeval": HeldoutTask(
        "humpback_ifeval.yaml", {"DATA_FILE": "heldout/ifeval/input_data.jsonl"}, "DATA_FILE"
    ),
    "truthfulqa_mc1": HeldoutTask(
        "humpback_truthfulqa_mc1.yaml", {"DATA_FILE": "heldout/truthfulqa/v1/mc_task.json"}, "DATA_FILE"
    ),
    "truthfulqa_mc2": HeldoutTask(
        "humpback_truthfulqa_mc2.yaml",
        {"DATA_FILE": "heldout/truthfulqa/v1/mc_task.json"},
        "DATA_FILE",
        includes=("truthfulqa_mc1",),
    ),
    "gsm8k": HeldoutTask(
        "humpback_gsm8k.yaml",
        {"TEST_FILE": "heldout/gsm8k/test.jsonl", "TRAIN_FILE": "heldout/gsm8k/train.jsonl"},
        "TEST_FILE",
    ),
}


class HeldoutError(ValueError):
    """The evaluation cannot be set up as asked; the message says which input is wrong."""


@dataclass(frozen=True)
class ModelSpec:
    """What lm-eval loads: a full model directory, or a base directory plus a LoRA adapter."""

    path: Path
    base: Path
    adapter: Path | None
    tokenizer: Path


def resolve_model(model_path: str | Path) -> ModelSpec:
    """Split ``model_path`` into base weights, optional adapter and tokenizer directory.

    A LoRA adapter directory (``adapter_config.json``) names its base in
    ``base_model_name_or_path``; the adapter's own tokenizer, saved by fine-tuning with the
    chat template it trained on, is preferred over the base's.
    """
    path = Path(model_path).expanduser().resolve()
    if not path.is_dir():
        raise HeldoutError(f"{model_path}: not a model or adapter directory")
    adapter_config = path / "adapter_config.json"
    if not adapter_config.is_file():
        _require_safetensors(path, "model")
        return ModelSpec(path=path, base=path, adapter=None, tokenizer=path)
    _require_safetensors(path, "adapter")
    base_name = json.loads(adapter_config.read_text())["base_model_name_or_path"]
    base = Path(base_name).expanduser()
    if not base.is_absolute():
        base = (path / base).resolve() if (path / base).is_dir() else base.resolve()
    if not base.is_dir():
        raise HeldoutError(f"{path}: adapter's base model {base_name!r} is not a local directory")
    _require_safetensors(base, "base model")
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    return ModelSpec(path=path, base=base.resolve(), adapter=path, tokenizer=path if has_tokenizer else base.resolve())


def _require_safetensors(path: Path, what: str) -> None:
    # Weights are only ever read from safetensors: a directory without them (only .bin
    # pickles) is refused rather than handed to a loader that would unpickle it.
    if not any(path.glob("*.safetensors")):
        raise HeldoutError(f"{path}: {what} directory has no .safetensors weights")


def weights_digest(spec: ModelSpec) -> str:
    """sha256 prefix over the safetensors files (and adapter config) that define the model."""
    parts: dict[str, str] = {}
    for label, folder in (("base", spec.base), ("adapter", spec.adapter)):
        if folder is None:
            continue
        for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("adapter_config.json")):
            parts[f"{label}/{f.name}"] = file_digest(f)
    return settings_digest(parts)


def tokenizer_digest(folder: Path) -> str:
    """sha256 prefix over the tokenizer files, chat template included (it shapes every prompt)."""
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
    return settings_digest({n: file_digest(folder / n) for n in names if (folder / n).is_file()})


def data_files(tasks: Sequence[str], data_dir: str | Path) -> dict[str, dict[str, Path]]:
    """Absolute data paths per task and placeholder, checked to exist (``data_dir`` as in
    :func:`run_heldout`)."""
    data_dir = bundled.resolve_data_dir(data_dir)
    out: dict[str, dict[str, Path]] = {}
    missing: list[str] = []
    for task in tasks:
        out[task] = {}
        for key, rel in HELDOUT_TASKS[task].files.items():
            path = bundled.data_file(data_dir, rel).resolve()
            if not path.is_file():
                missing.append(str(path))
            out[task][key] = path
    if missing:
        raise HeldoutError(f"held-out data missing under data_dir={data_dir}: {', '.join(missing)}")
    return out


def render_template(task: str, values: dict[str, Any]) -> str:
    """A task template with its ``@NAME@`` placeholders filled (values quoted as YAML strings
    or written as numbers)."""
    text = (TASKS_DIR / HELDOUT_TASKS[task].template).read_text(encoding="utf-8")
    for key, value in values.items():
        literal = json.dumps(str(value)) if isinstance(value, (str, Path)) else json.dumps(value)
        text = text.replace(f"@{key}@", literal)
    if re.search(r"@[A-Z_]+@", text):
        raise HeldoutError(f"{task}: template has an unfilled @placeholder@")
    return text


def write_task_yamls(tasks: Sequence[str], files: dict[str, dict[str, Path]], out: Path, max_gen_toks: int) -> Path:
    """Fill the templates of ``tasks`` (and the ones they include) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.yaml"):
        stale.unlink()  # a rerun with fewer tasks must not index the old ones
    needed = list(dict.fromkeys(t for task in tasks for t in (*HELDOUT_TASKS[task].includes, task)))
    for task in needed:
        values: dict[str, Any] = {"MAX_GEN_TOKS": max_gen_toks, **files[task]}
        (out / HELDOUT_TASKS[task].template).write_text(render_template(task, values), encoding="utf-8")
    return out


def count_docs(path: Path) -> int:
    from evals.tasks.utils import read_records

    return len(read_records(path))


def choose_samples(task: str, n_docs: int, limit: int, seed: int) -> list[int]:
    """A reproducible subset of document indices (sorted, as lm-eval expects them).

    Seeded by the task's data file, so a subset does not depend on which other tasks run with
    it, and tasks over the same file (TruthfulQA MC1 and MC2) ask the same questions.
    """
    if limit >= n_docs:
        return list(range(n_docs))
    spec = HELDOUT_TASKS[task]
    rng = random.Random(f"{seed}:{spec.files[spec.main_file]}")
    return sorted(rng.sample(range(n_docs), limit))


GENERATION_VERSIONS = {"engine": "engine_v1", "lm_eval": "lm_eval"}
"""How lm-eval's ``generate_until`` requests are answered: by the project's engine on lm-eval's
model (:mod:`evals.engine_generation`), or by lm-eval's own ``model.generate`` batches; the
value is what a results config records."""
GENERATION = tuple(GENERATION_VERSIONS)


def check_generation(generation: str) -> str:
    if generation not in GENERATION:
        raise HeldoutError(f"unknown generation {generation!r}; choose from {list(GENERATION)}")
    return generation


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise HeldoutError(f"unknown dtype {dtype!r}; choose from {list(DTYPES)}")
    return dtype


def build_lm(spec: ModelSpec, *, batch_size: int, device: str, generation: str = "engine", dtype: str = DTYPE):
    """lm-eval's HF model over the resolved model, its weights in ``dtype`` (:data:`DTYPES`);
    ``generation``: see :data:`GENERATION`.

    A LoRA adapter is passed as lm-eval's ``peft=`` argument rather than merged into a
    temporary copy: no full set of weights is written for every evaluated iteration, peft
    reads the adapter from its safetensors file, and lm-eval records the adapter in its
    results. The unmerged adapter costs one small extra matmul per adapted layer.
    """
    from pipeline.models import load_tokenizer

    # The project's tokenizer loader: a tokenizer without a chat template gets the same ChatML
    # fallback that fine-tuning and generation use, so the prompts match what the model saw.
    check_generation(generation)
    check_dtype(dtype)
    tokenizer = load_tokenizer(str(spec.tokenizer))
    lm = _trimming_hflm()(
        pretrained=str(spec.base),
        tokenizer=tokenizer,
        peft=str(spec.adapter) if spec.adapter else None,
        device=device,  # lm-eval defaults to "cuda"; CPU must be named
        dtype=dtype,
        batch_size=batch_size,
        trust_remote_code=False,
        use_safetensors=True,  # forwarded to from_pretrained
    )
    lm.engine_generation = generation == "engine"
    return lm


@functools.cache
def _trimming_hflm():
    """lm-eval's HFLM, returning freed heap pages to the OS before every batch.

    Generation through ``model.generate`` grows its KV cache by concatenation at every step and
    the log-likelihood batches allocate full-vocabulary logits; glibc keeps the freed blocks, so
    the process's resident memory would keep every batch's high-water mark. Trimming before each
    batch (model call and generation) hands those blocks back before the next allocation; a trim
    costs far less than the batch it precedes (docs/measurements.md has the figures)."""
    from lm_eval.models.huggingface import HFLM

    from pipeline import memory

    class TrimmingHFLM(HFLM):
        engine_generation = False
        """Answer ``generate_until`` with the project's engine (set by :func:`build_lm`)."""
        engine_batch_size: int | None = None
        """The engine's rows per batch (None: lm-eval's ``batch_size``; set by :class:`SharedLM`)."""
        engine_kv_cache_gib: float | str | None = None
        """The engine's KV-cache budget per batch (GiB, ``"auto"`` or None: no limit; set by
        :class:`SharedLM`)."""

        def generate_until(self, requests, disable_tqdm: bool = False):
            if not self.engine_generation:
                return super().generate_until(requests, disable_tqdm)
            from evals.engine_generation import engine_generate_until

            memory.trim_heap()
            return engine_generate_until(
                self, requests, lambda group: super(TrimmingHFLM, self).generate_until(group, disable_tqdm))

        def _model_call(self, *args, **kwargs):
            memory.trim_heap()
            return super()._model_call(*args, **kwargs)

        def _model_generate(self, *args, **kwargs):
            memory.trim_heap()
            return super()._model_generate(*args, **kwargs)

    return TrimmingHFLM


class SharedLM:
    """lm-eval's model for one evaluated model, built on first use and then reused, so the local
    tasks and the hub tasks (:mod:`evals.hub_tasks`) load the weights once."""

    def __init__(self, spec: ModelSpec, *, batch_size: int, device: str, generation: str = "engine",
                 engine_batch_size: int | None = None, kv_cache_gib: float | str | None = None, dtype: str = DTYPE):
        """``engine_batch_size`` and ``kv_cache_gib``: the engine's batches when it answers the
        generation requests (default: lm-eval's ``batch_size``, which is sized for the
        log-likelihood batches' full-vocabulary logits; generation holds only a KV cache)."""
        self.spec, self.batch_size, self.device, self.generation = spec, batch_size, device, generation
        self.engine_batch_size, self.kv_cache_gib, self.dtype = engine_batch_size, kv_cache_gib, dtype
        self._lm = None

    def get(self, spec: ModelSpec, batch_size: int, device: str, generation: str = "engine", dtype: str = DTYPE):
        wanted = (spec, batch_size, device, generation, dtype)
        built = (self.spec, self.batch_size, self.device, self.generation, self.dtype)
        if wanted != built:
            raise HeldoutError(f"shared model was built for {self.spec.path} (batch size {self.batch_size}, "
                               f"{self.device}, {self.generation} generation, {self.dtype}), asked for {spec.path} "
                               f"(batch size {batch_size}, {device}, {generation} generation, {dtype})")
        if self._lm is None:
            self._lm = build_lm(spec, batch_size=batch_size, device=device, generation=generation, dtype=dtype)
            self._lm.engine_batch_size, self._lm.engine_kv_cache_gib = self.engine_batch_size, self.kv_cache_gib
        return self._lm


def metric_name(task: str, key: str) -> tuple[str, str] | None:
    """``("gsm8k/exact_match_strict", "exact_match")`` from lm-eval's ``"exact_match,strict-match"``;
    None for stderr entries and non-metric keys."""
    if "," not in key or "_stderr," in key:
        return None
    metric, _, filt = key.partition(",")
    return f"{task}/{metric}{FILTER_SUFFIX.get(filt, '_' + filt.replace('-', '_'))}", metric


def summarize_metrics(results: dict[str, Any], tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One entry per task metric and filter, with stderr, n, version and direction."""
    out: dict[str, dict[str, Any]] = {}
    for task in tasks:
        name = TASK_PREFIX + task
        row = results["results"][name]
        n = int(results["n-samples"][name]["effective"])
        for key, value in row.items():
            parsed = metric_name(task, key)
            if parsed is None:
                continue
            full, metric = parsed
            stderr = row.get(key.replace(",", "_stderr,", 1))
            out[full] = {
                "value": float(value),
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                "n": n,
                "task": name,
                "task_version": results["versions"].get(name),
                "higher_is_better": bool(results["higher_is_better"][name][metric]),
            }
    return dict(sorted(out.items()))


def write_raw_outputs(results: dict[str, Any], out_dir: Path, extra: dict[str, Any]) -> dict[str, str]:
    """lm-eval's per-sample logs as ``samples_<task>.jsonl`` and the rest as ``results.json``,
    with ``extra`` (our config, paths and sample indices) under the key ``humpback``."""
    from lm_eval.utils import handle_non_serializable

    logged = results.pop("samples", {}) or {}
    for stale in out_dir.glob("samples_*.jsonl"):
        stale.unlink()  # from an earlier run into the same folder, perhaps of other tasks
    written: dict[str, str] = {}
    for name, rows in logged.items():
        path = out_dir / f"samples_{name.removeprefix(TASK_PREFIX)}.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n")
        written[name] = path.name
    # lm-eval's own "config" cannot see batch size or device when handed a built model.
    results["humpback"] = extra
    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    tmp = out_dir / f"results.json.tmp{os.getpid()}"
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / "results.json")
    return written


def run_heldout(
    model_path: str,
    out_dir: Path,
    *,
    data_dir: str | Path,
    tasks: Sequence[str] = DEFAULT_TASKS,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    system_prompt: str | None = None,
    max_gen_toks: int = 256,
    device: str = "cpu",
    shared_lm: SharedLM | None = None,
    generation: str = "engine",
    dtype: str = DTYPE,
) -> dict:
    """Evaluate a model on held-out tasks with ``lm_eval.simple_evaluate``.

    Prompts go through the model's chat template (``apply_chat_template=True``), few-shot
    examples as earlier turns, with ``system_prompt`` as the system message, because the
    models evaluated are chat fine-tunes. Decoding is greedy.

    Args:
        model_path: A model directory (safetensors and tokenizer) or a LoRA adapter directory
            whose ``adapter_config.json`` names its base directory.
        out_dir: Where the task YAMLs, lm-eval's results and per-sample logs are written.
        data_dir: ``packaged`` (the data shipped in ``evals/data``) or a folder holding
            ``heldout/`` (``ifeval/input_data.jsonl``, ``truthfulqa/v1/mc_task.json``,
            ``gsm8k/{test,train}.jsonl``, each plain or ``.gz``).
        tasks: Any of ``ifeval``, ``truthfulqa_mc1``, ``truthfulqa_mc2``, ``gsm8k``.
        limit: Documents per task. Unlike lm-eval's ``limit`` (the first N), this is a seeded
            random subset (lm-eval's ``samples``), the same for a given seed and data file whatever
            other tasks run (so MC1 and MC2 ask the same questions); the indices are kept in
            ``results.json`` and as ``doc_id`` in the sample logs.
        seed: Seeds the subset choice and lm-eval's Python, numpy, torch and few-shot seeds.
        batch_size: lm-eval's batch size.
        system_prompt: System message for every prompt (lm-eval's ``system_instruction``).
        max_gen_toks: Generation budget for IFEval and GSM8K (lm-eval's defaults: 1280 for
            IFEval, 256 for GSM8K).
        device: Torch device; lm-eval itself would assume CUDA.
        shared_lm: a model loader shared with other evaluations of the same model (the hub
            tasks), so the weights are loaded once; None: load them here.
        generation: who answers IFEval's and GSM8K's generation requests (:data:`GENERATION`).
        dtype: the weights' dtype (:data:`DTYPES`): ``float32`` keeps scores independent of the
            hardware; ``bfloat16`` halves the model's memory, and scores may move slightly.

    Returns:
        ``{"metrics": {"<task>/<metric>": {"value", "stderr", "n", "task", "task_version",
        "higher_is_better"}}, "config": {...}, "config_digest": str, "seconds": float,
        "paths": {...}, "files": {...}}``. ``config`` holds everything that defines the
        evaluation, with data and weights identified by content (sha256) rather than by where
        they live, so the digest is the same on another machine; ``paths`` says where they were.

    Raises:
        HeldoutError: an unknown task, a missing data file, a model directory without
            safetensors weights or an adapter whose base is not a local directory.
    """
    started = time.perf_counter()
    tasks = list(dict.fromkeys(tasks))
    unknown = [t for t in tasks if t not in HELDOUT_TASKS]
    if unknown or not tasks:
        raise HeldoutError(f"unknown or no tasks {unknown}; choose from {sorted(HELDOUT_TASKS)}")
    if limit is not None and limit < 1:
        raise HeldoutError(f"limit must be a positive document count, got {limit}")
    check_generation(generation)
    check_dtype(dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_root = bundled.resolve_data_dir(data_dir).resolve()
    spec = resolve_model(model_path)
    files = data_files(tasks, data_root)
    includes = {t for task in tasks for t in HELDOUT_TASKS[task].includes}
    files.update(data_files(sorted(includes - set(files)), data_root))
    tasks_dir = write_task_yamls(tasks, files, out_dir / "tasks", max_gen_toks)

    nltk_data = None
    if "ifeval" in tasks:
        from evals.tasks.utils import configure_nltk

        nltk_data = configure_nltk()  # fail here, before the model loads, if the data is missing

    n_docs = {t: count_docs(files[t][HELDOUT_TASKS[t].main_file]) for t in tasks}
    samples = None
    if limit is not None:
        samples = {TASK_PREFIX + t: choose_samples(t, n_docs[t], limit, seed) for t in tasks}

    config = {
        "tasks": {
            t: {
                "name": TASK_PREFIX + t,
                "templates_sha256": {
                    HELDOUT_TASKS[x].template: file_digest(TASKS_DIR / HELDOUT_TASKS[x].template)
                    for x in (*HELDOUT_TASKS[t].includes, t)
                },
                "data": {
                    HELDOUT_TASKS[t].files[k]: content_digest(p) for k, p in files[t].items()
                },
                "n_docs": n_docs[t],
            }
            for t in tasks
        },
        "task_utils_sha256": file_digest(TASKS_DIR / "utils.py"),
        "model": {
            "weights_digest": weights_digest(spec),
            "tokenizer_digest": tokenizer_digest(spec.tokenizer),
            "adapter": spec.adapter is not None,
            "dtype": dtype,
        },
        "limit": limit,
        "sample_indices_digest": settings_digest(samples) if samples is not None else None,
        "seed": seed,
        "batch_size": batch_size,
        "system_prompt": system_prompt,
        "max_gen_toks": max_gen_toks,
        "apply_chat_template": True,
        "fewshot_as_multiturn": True,
        "bootstrap_iters": BOOTSTRAP_ITERS,
        "device": device,
        "generation": GENERATION_VERSIONS[generation],
        "packages": package_versions(VERSIONED_PACKAGES),
    }
    paths = {
        "model": str(spec.path),
        "base": str(spec.base),
        "adapter": str(spec.adapter) if spec.adapter else None,
        "tokenizer": str(spec.tokenizer),
        "data_dir": str(data_root),
        "task_yamls": str(tasks_dir),
        "nltk_data": str(nltk_data) if nltk_data else None,
    }

    log.info("held-out evaluation of %s on %s (limit=%s, seed=%s)", spec.path, tasks, limit, seed)
    results = evaluate(spec, tasks, tasks_dir, samples=samples, config=config, shared_lm=shared_lm,
                       generation=generation)
    files_written = write_raw_outputs(
        results, out_dir, {"config": config, "paths": paths, "sample_indices": samples}
    )
    summary = {
        "metrics": summarize_metrics(results, tasks),
        "config": config,
        "config_digest": settings_digest(config),
        "seconds": round(time.perf_counter() - started, 3),
        "paths": paths,
        "files": {"results": "results.json", "samples": files_written, "task_yamls": "tasks/"},
    }
    write_json_atomic(out_dir / "summary.json", summary)
    log.info("held-out metrics (%.0f s): %s", summary["seconds"],
             {k: round(v["value"], 4) for k, v in summary["metrics"].items()})
    return summary


def evaluate(
    spec: ModelSpec,
    tasks: Sequence[str],
    tasks_dir: Path,
    *,
    samples: dict[str, list[int]] | None,
    config: dict[str, Any],
    shared_lm: SharedLM | None = None,
    generation: str = "engine",
) -> dict[str, Any]:
    """Run ``lm_eval.simple_evaluate`` on the rendered tasks only (no built-ins indexed)."""
    from lm_eval.tasks import TaskManager

    if shared_lm is not None:
        lm = shared_lm.get(spec, config["batch_size"], config["device"], generation, config["model"]["dtype"])
    else:
        lm = build_lm(spec, batch_size=config["batch_size"], device=config["device"], generation=generation,
                      dtype=config["model"]["dtype"])
    results = seeded_evaluate(lm, [TASK_PREFIX + t for t in tasks],
                              TaskManager(include_path=str(tasks_dir), include_defaults=False), samples, config,
                              config["system_prompt"])
    return dict(results)


def seeded_evaluate(lm, tasks, task_manager, samples, config: dict[str, Any], system_prompt: str | None):
    """``lm_eval.simple_evaluate`` with the settings every held-out run shares: per-sample logs,
    chat template and few-shot turns as in ``config``, and every seed set to ``config["seed"]``."""
    import lm_eval

    seed = config["seed"]
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=task_manager,
        samples=samples,
        log_samples=True,
        apply_chat_template=config["apply_chat_template"],
        fewshot_as_multiturn=config["fewshot_as_multiturn"],
        system_instruction=system_prompt,
        bootstrap_iters=config["bootstrap_iters"],
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if results is None:  # only non-zero ranks of a distributed run get None
        raise RuntimeError("lm-eval returned no results")
    return results
