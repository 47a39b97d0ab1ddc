"""What every lm-evaluation-harness run of this project shares: resolving the model (a full
model or a base plus an unmerged LoRA adapter, safetensors only), building lm-eval's HF model
once per evaluated model, the seeded ``simple_evaluate`` call, the provenance config, the subset
choice, metric rows, and writing lm-eval's outputs beside a ``summary.json``.

The project's local tasks (:mod:`evals.heldout`) and lm-eval's stock hub tasks
(:mod:`evals.hub_tasks`) differ only in where their tasks come from and how their rows are named.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from pipeline.digests import file_digest, package_versions, settings_digest
from pipeline.io import write_json_atomic

log = logging.getLogger(__name__)

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
    without the trim a process's resident memory only grows over an evaluation. The trim costs
    milliseconds against seconds per batch (figures in docs/measurements.md)."""
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


def seeded_subset(key: str, n_docs: int, limit: int, seed: int) -> list[int]:
    """A reproducible subset of ``n_docs`` document indices (sorted, as lm-eval expects them),
    seeded by ``key`` (what identifies the documents) so that a subset does not depend on which
    other tasks run with it, and tasks over the same documents ask the same questions."""
    if limit >= n_docs:
        return list(range(n_docs))
    rng = random.Random(f"{seed}:{key}")
    return sorted(rng.sample(range(n_docs), limit))


def number(value: Any) -> float | None:
    """A metric value as a float; None for lm-eval's non-numbers (``"N/A"``, NaN, booleans)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def metric_rows(results: Mapping[str, Any], name: str, report_as: str, n: int | None,
                default_direction: bool | None = None) -> dict[str, dict[str, Any]]:
    """The metrics of lm-eval's result row ``name`` as ``<report_as>/<metric>`` entries with
    value, stderr, n, task, task version and direction (``default_direction`` where lm-eval gives
    none; None: a missing direction is an error)."""
    row = results["results"][name]
    directions = results.get("higher_is_better", {}).get(name, {}) or {}
    out: dict[str, dict[str, Any]] = {}
    for key, raw in row.items():
        parsed = metric_name(report_as, key)
        value = number(raw)
        if parsed is None or value is None:
            continue
        full, metric = parsed
        direction = directions.get(metric)
        if direction is None:
            if default_direction is None:
                raise KeyError(f"lm-eval gives no direction for {name}/{metric}")
            direction = default_direction
        out[full] = {
            "value": value,
            "stderr": number(row.get(key.replace(",", "_stderr,", 1))),
            "n": n,
            "task": name,
            "task_version": results.get("versions", {}).get(name),
            "higher_is_better": bool(direction),
        }
    return out


def model_config(spec: ModelSpec, dtype: str) -> dict[str, Any]:
    """The evaluated model by content: weights and tokenizer digests, adapter or not, dtype."""
    return {"weights_digest": weights_digest(spec), "tokenizer_digest": tokenizer_digest(spec.tokenizer),
            "adapter": spec.adapter is not None, "dtype": dtype}


def run_settings(*, seed: int, batch_size: int, system_prompt: str | None, device: str,
                 generation: str) -> dict[str, Any]:
    """The settings every run's config records besides its tasks and model."""
    return {
        "seed": seed,
        "batch_size": batch_size,
        "system_prompt": system_prompt,
        "apply_chat_template": True,
        "fewshot_as_multiturn": True,
        "bootstrap_iters": BOOTSTRAP_ITERS,
        "device": device,
        "generation": GENERATION_VERSIONS[generation],
        "packages": package_versions(VERSIONED_PACKAGES),
    }


def model_paths(spec: ModelSpec) -> dict[str, str | None]:
    return {"model": str(spec.path), "base": str(spec.base), "adapter": str(spec.adapter) if spec.adapter else None,
            "tokenizer": str(spec.tokenizer)}


def run_and_record(lm, tasks: Any, task_manager: Any, samples: dict[str, list[int]] | None, *, config: dict[str, Any],
                   paths: dict[str, Any], out_dir: Path, summarize: Callable[[dict[str, Any]], dict[str, Any]],
                   started: float, extra_files: Mapping[str, str] | None = None, label: str = "held-out",
                   strip_prefix: str = "") -> dict[str, Any]:
    """Run :func:`seeded_evaluate`, keep lm-eval's outputs in ``out_dir`` and write the run's
    ``summary.json``: metrics (``summarize(results)``), config and its digest, seconds, paths and
    the files written."""
    results = dict(seeded_evaluate(lm, tasks, task_manager, samples, config, config["system_prompt"]))
    written = write_raw_outputs(results, out_dir, {"config": config, "paths": paths, "sample_indices": samples},
                                strip_prefix)
    summary = {
        "metrics": summarize(results),
        "config": config,
        "config_digest": settings_digest(config),
        "seconds": round(time.perf_counter() - started, 3),
        "paths": paths,
        "files": {"results": "results.json", "samples": written, **(extra_files or {})},
    }
    write_json_atomic(out_dir / "summary.json", summary)
    log.info("%s metrics (%.0f s): %s", label, summary["seconds"],
             {k: round(v["value"], 4) for k, v in summary["metrics"].items()})
    return summary


def write_raw_outputs(results: dict[str, Any], out_dir: Path, extra: dict[str, Any],
                      strip_prefix: str = "") -> dict[str, str]:
    """lm-eval's per-sample logs as ``samples_<task>.jsonl`` (``strip_prefix`` taken off the task
    name) and the rest as ``results.json``, with ``extra`` (our config, paths and sample indices)
    under the key ``humpback``."""
    from lm_eval.utils import handle_non_serializable

    logged = results.pop("samples", {}) or {}
    for stale in out_dir.glob("samples_*.jsonl"):
        stale.unlink()  # from an earlier run into the same folder, perhaps of other tasks
    written: dict[str, str] = {}
    for name, rows in logged.items():
        path = out_dir / f"samples_{name.removeprefix(strip_prefix)}.jsonl"
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
