"""Held-out task evaluation (IFEval, TruthfulQA MC1/MC2, GSM8K) through lm-evaluation-harness.

The tasks are lm-eval's own definitions, mirrored as ``humpback_*`` YAML templates in
``evals/tasks/`` so they never collide with lm-eval's built-ins, and reading local data files
instead of the hub. The data directory is a run-time setting, so the templates are filled
with the resolved absolute paths and written into ``<out_dir>/tasks/``, which lm-eval then
indexes on its own (``include_defaults=False``): what ran is on disk next to its results.
Loading the model, running lm-eval and recording its outputs is shared with the hub tasks
(:mod:`evals.lm_eval_runner`).

Everything lm-eval produced is kept in ``out_dir``:

```
tasks/                     the task YAMLs exactly as lm-eval read them
results.json               lm-eval's full results (config, versions, n-samples, environment)
samples_<task>.jsonl       lm-eval's per-sample log: prompt, response, filtered answer, metrics
summary.json               what :func:`run_heldout` returns
```
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from evals import bundled
from evals.lm_eval_runner import (
    DTYPE,
    HeldoutError,
    SharedLM,
    check_dtype,
    check_generation,
    metric_rows,
    model_config,
    model_paths,
    resolve_model,
    run_and_record,
    run_settings,
    seeded_subset,
)
from pipeline.digests import file_digest, settings_digest
from pipeline.io import content_digest

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
TASK_PREFIX = "humpback_"
DEFAULT_TASKS = ("ifeval", "truthfulqa_mc1", "truthfulqa_mc2", "gsm8k")


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
    """A reproducible subset of a task's document indices, seeded by its data file, so tasks over
    the same file (TruthfulQA MC1 and MC2) ask the same questions (:func:`seeded_subset`)."""
    spec = HELDOUT_TASKS[task]
    return seeded_subset(spec.files[spec.main_file], n_docs, limit, seed)


def summarize_metrics(results: dict[str, Any], tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One entry per task metric and filter, with stderr, n, version and direction."""
    out: dict[str, dict[str, Any]] = {}
    for task in tasks:
        name = TASK_PREFIX + task
        out.update(metric_rows(results, name, task, int(results["n-samples"][name]["effective"])))
    return dict(sorted(out.items()))


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
        "model": model_config(spec, dtype),
        "limit": limit,
        "sample_indices_digest": settings_digest(samples) if samples is not None else None,
        "max_gen_toks": max_gen_toks,
        **run_settings(seed=seed, batch_size=batch_size, system_prompt=system_prompt, device=device,
                       generation=generation),
    }
    paths = {**model_paths(spec), "data_dir": str(data_root), "task_yamls": str(tasks_dir),
             "nltk_data": str(nltk_data) if nltk_data else None}

    from lm_eval.tasks import TaskManager

    log.info("held-out evaluation of %s on %s (limit=%s, seed=%s)", spec.path, tasks, limit, seed)
    shared = shared_lm or SharedLM(spec, batch_size=batch_size, device=device, generation=generation, dtype=dtype)
    return run_and_record(
        shared.get(spec, batch_size, device, generation, dtype), [TASK_PREFIX + t for t in tasks],
        TaskManager(include_path=str(tasks_dir), include_defaults=False), samples, config=config, paths=paths,
        out_dir=out_dir, summarize=lambda results: summarize_metrics(results, tasks), started=started,
        extra_files={"task_yamls": "tasks/"}, strip_prefix=TASK_PREFIX)
