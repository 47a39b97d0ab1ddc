"""Held-out evaluation on lm-eval's own stock tasks, whose data lm-eval fetches from the hub.

``eval.heldout_hub_tasks`` names tasks, groups or tags of lm-eval's default task index (the
paper's commonsense set is ``arc_easy``, ``arc_challenge``, ``piqa``, ``social_iqa``,
``openbookqa``, and ``mmlu``). They run in addition to the project's local ``humpback_*``
tasks (:mod:`evals.heldout`) and exactly like them: the same model loading (:mod:`evals.lm_eval_runner`:
fp32, the project's tokenizer with its chat-template fallback, LoRA adapters unmerged), chat
template applied with few-shot examples as turns, the same system prompt and seeds, and a seeded
random subset of documents (lm-eval's ``samples``) in place of lm-eval's first-N ``limit``.

Order of work, so that nothing heavy happens before a mistake is found:

1. :func:`validate_task_names` checks every name against ``TaskManager().all_tasks`` (no
   network; close matches are suggested);
2. :func:`prepare_hub_tasks` builds the tasks (lm-eval downloads their datasets here, through
   ``datasets``; lm-eval drops ``trust_remote_code`` for datasets 4 and later, which run no
   loading scripts), identifies each task's evaluated documents by a sha256 of their content,
   and draws the subsets;
3. :func:`run_hub_tasks` loads the model and runs ``lm_eval.simple_evaluate`` on the built tasks.

Metrics are summarized as ``<task>/<metric>`` (``<task>`` the name asked for, or each member of
a tag), in the same shape as :func:`evals.heldout.summarize_metrics`. Everything lm-eval wrote
is kept in the output folder as for the local tasks (``results.json``, ``samples_<task>.jsonl``,
``summary.json``).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

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
from pipeline.data import DataError
from pipeline.digests import file_digest, settings_digest

log = logging.getLogger(__name__)

SOURCE = "lm_eval_hub"
# The paper's names (and common spellings) for tasks lm-eval knows under another name.
PAPER_NAMES = {
    "siqa": "social_iqa",
    "social_i_qa": "social_iqa",
    "obqa": "openbookqa",
    "openbook_qa": "openbookqa",
    "arc_e": "arc_easy",
    "arc_c": "arc_challenge",
    "arc-easy": "arc_easy",
    "arc-challenge": "arc_challenge",
}


class HubTaskError(HeldoutError, DataError):
    """A hub task cannot be set up: an unknown name, or its data could not be loaded."""


@dataclass
class HubTaskPlan:
    """Hub tasks built and ready to run: what :func:`prepare_hub_tasks` returns.

    Attributes:
        names: the names asked for, in order.
        members: name -> the lm-eval tasks it stands for (itself, a group's tasks, a tag's).
        groups: the names that are lm-eval groups (reported with the group's aggregate row).
        objects: the built lm-eval ``Task``/``Group`` objects handed to ``simple_evaluate``.
        samples: leaf task -> sorted document indices (None: every document).
        tasks: name -> provenance of each member: data source, split, document count and the
            sha256 of the evaluated documents, version, few-shot count, YAML sha256.
        limit, seed, num_fewshot: the settings that shaped the plan.
    """

    names: list[str]
    members: dict[str, list[str]]
    groups: set[str]
    objects: list[Any]
    samples: dict[str, list[int]] | None
    tasks: dict[str, dict[str, dict[str, Any]]]
    limit: int | None
    seed: int
    num_fewshot: dict[str, int] = field(default_factory=dict)
    task_manager: Any = None

    def reported_tasks(self) -> list[str]:
        """The ``<task>`` prefixes the metrics will have: each name, or a tag's member tasks."""
        out: list[str] = []
        for name in self.names:
            is_tag = name not in self.groups and self.members.get(name) != [name]
            out.extend(self.members[name] if is_tag else [name])
        return out


@functools.lru_cache(maxsize=1)
def stock_task_names() -> tuple[str, ...]:
    """Every name in lm-eval's default task index (tasks, groups, tags); no network."""
    from lm_eval.tasks import TaskManager

    return tuple(TaskManager().all_tasks)


def close_matches(name: str, known: Iterable[str], n: int = 5) -> list[str]:
    """Names in ``known`` that ``name`` may have meant: the paper's alias, a case-insensitive
    match, then the most similar spellings."""
    known = sorted(known)
    lower = {k.lower(): k for k in known}
    out: list[str] = []
    alias = PAPER_NAMES.get(name.lower())
    if alias and alias in known:
        out.append(alias)
    if name.lower() in lower:
        out.append(lower[name.lower()])
    out += [lower[m] for m in difflib.get_close_matches(name.lower(), list(lower), n=n, cutoff=0.6)]
    return list(dict.fromkeys(out))[:n]


def validate_task_names(names: Sequence[str], known: Iterable[str] | None = None) -> list[str]:
    """``names`` if every one is in lm-eval's task index (``known``, default: the stock index).

    Raises:
        HubTaskError: naming each unknown task with its close matches.
    """
    names = list(names)
    if not names:
        raise HubTaskError("no hub tasks given")
    known_set = set(stock_task_names() if known is None else known)
    unknown = [n for n in names if n not in known_set]
    if unknown:
        parts = []
        for n in unknown:
            near = close_matches(n, known_set)
            parts.append(f"{n!r} (did you mean {', '.join(near)}?)" if near else f"{n!r} (no close match)")
        raise HubTaskError(
            f"unknown lm-eval task name(s) in eval.heldout_hub_tasks: {'; '.join(parts)}. "
            f"`lm-eval ls tasks` lists the {len(known_set)} known names")
    return names


def _docs_sha256(docs: Iterable[Any]) -> str:
    h = hashlib.sha256()
    for doc in docs:
        h.update(json.dumps(doc, sort_keys=True, default=str, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def _eval_split(task: Any) -> str | None:
    cfg = task.config
    return cfg.test_split if task.has_test_docs() else cfg.validation_split


def choose_hub_samples(data_key: str, n_docs: int, limit: int, seed: int) -> list[int]:
    """A reproducible subset of ``n_docs`` document indices (sorted), seeded by the task's data
    (``data_key``: dataset, configuration, split and data files) rather than its name, so tasks over
    the same documents ask the same questions and a subset does not depend on the other tasks run."""
    return seeded_subset(f"hub:{data_key}", n_docs, limit, seed)


def _task_record(task: Any, yaml_path: Path | None) -> tuple[str, dict[str, Any], int]:
    cfg = task.config
    split = _eval_split(task)
    docs = task.eval_docs
    n_docs = len(docs)
    kwargs = cfg.dataset_kwargs or {}
    data_key = json.dumps([cfg.dataset_path, cfg.dataset_name, split, kwargs.get("data_files")], default=str)
    record = {
        "dataset_path": cfg.dataset_path,
        "dataset_name": cfg.dataset_name,
        "dataset_revision": kwargs.get("revision"),
        "split": split,
        "n_docs": n_docs,
        "docs_sha256": _docs_sha256(docs),
        "version": task.VERSION,
        "num_fewshot": cfg.num_fewshot,
        "output_type": cfg.output_type,
        "yaml_sha256": file_digest(yaml_path) if yaml_path is not None and Path(yaml_path).is_file() else None,
    }
    return data_key, record, n_docs


def prepare_hub_tasks(
    names: Sequence[str],
    *,
    limit: int | None,
    seed: int,
    num_fewshot: Mapping[str, int] | None = None,
    task_manager: Any = None,
) -> HubTaskPlan:
    """Validate, build (downloading their data) and subset the hub tasks; no model is loaded.

    Args:
        names: lm-eval task, group or tag names.
        limit: documents per lm-eval task (each task of a group), a seeded subset; None: all.
        seed: draws the subsets.
        num_fewshot: name -> few-shot count overriding lm-eval's default (for every task of a
            group or tag).
        task_manager: an lm-eval ``TaskManager`` (default: lm-eval's stock index).

    Raises:
        HubTaskError: an unknown name (with close matches), a task whose data could not be
            loaded (the hub error is in the message), or two names sharing a task.
    """
    names = list(dict.fromkeys(names))
    num_fewshot = dict(num_fewshot or {})
    if limit is not None and limit < 1:
        raise HubTaskError(f"limit must be a positive document count, got {limit}")
    stray = sorted(set(num_fewshot) - set(names))
    if stray:
        raise HubTaskError(f"few-shot counts given for {stray}, which are not among the hub tasks {names}")
    if task_manager is None:
        from lm_eval.tasks import TaskManager

        task_manager = TaskManager()
    validate_task_names(names, task_manager.all_tasks)

    members: dict[str, list[str]] = {}
    built: dict[str, dict[str, Any]] = {}
    groups: set[str] = set()
    objects: list[Any] = []
    owner: dict[str, str] = {}
    for name in names:
        try:
            loaded = task_manager.load([name])
        except Exception as exc:  # datasets/hub errors come in many types; all stop here
            raise HubTaskError(f"lm-eval task {name!r} could not be loaded (lm-eval reads its data from the "
                               f"Hugging Face hub): {type(exc).__name__}: {exc}") from exc
        leaves = dict(sorted(loaded["tasks"].items()))
        for leaf in leaves:
            if leaf in owner:
                raise HubTaskError(f"{name!r} and {owner[leaf]!r} both contain the lm-eval task {leaf!r}; "
                                   f"list it once")
            owner[leaf] = name
        if name in loaded["groups"]:
            groups.add(name)
            objects.append(loaded["groups"][name])
        else:
            objects.extend(leaves.values())
        members[name] = list(leaves)
        built[name] = leaves

    for name, k in num_fewshot.items():
        for task in built[name].values():
            task.set_config(key="num_fewshot", value=k)

    samples: dict[str, list[int]] | None = {} if limit is not None else None
    records: dict[str, dict[str, dict[str, Any]]] = {}
    index = getattr(task_manager, "task_index", {})
    for name, leaves in built.items():
        records[name] = {}
        for leaf, task in leaves.items():
            entry = index.get(leaf)
            data_key, record, n_docs = _task_record(task, getattr(entry, "yaml_path", None))
            records[name][leaf] = record
            if samples is not None:
                samples[leaf] = choose_hub_samples(data_key, n_docs, limit, seed)
    return HubTaskPlan(names=names, members=members, groups=groups, objects=objects, samples=samples,
                       tasks=records, limit=limit, seed=seed, num_fewshot=num_fewshot, task_manager=task_manager)


def _effective_n(results: Mapping[str, Any], name: str) -> int | None:
    counts = results.get("n-samples", {})
    if name in counts:
        return int(counts[name]["effective"])
    children = results.get("group_subtasks", {}).get(name)
    if children:
        parts = [_effective_n(results, c) for c in children]
        return sum(p for p in parts if p is not None)
    sample_len = results.get("results", {}).get(name, {}).get("sample_len")
    return int(sample_len) if isinstance(sample_len, int) else None


def summarize_hub_metrics(
    results: Mapping[str, Any], names: Sequence[str], members: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, dict[str, Any]]:
    """One entry per metric and filter: ``<task>/<metric>`` -> value, stderr, n, task,
    task_version, higher_is_better, source.

    A task or group asked for by name is reported under that name (a group with its aggregate,
    ``n`` summed over its tasks); a tag, which lm-eval does not aggregate, under each of its
    member tasks (``members``). Non-numeric values (lm-eval's ``"N/A"``) give no entry, or a
    None stderr.

    Raises:
        HubTaskError: a name with no results.
    """
    rows: list[str] = []
    for name in names:
        if name in results["results"]:
            rows.append(name)
        elif members and members.get(name) and all(m in results["results"] for m in members[name]):
            rows.extend(members[name])
        else:
            raise HubTaskError(f"lm-eval returned no results for {name!r}")
    out: dict[str, dict[str, Any]] = {}
    for name in rows:
        for full, entry in metric_rows(results, name, name, _effective_n(results, name), default_direction=True).items():
            out[full] = {**entry, "source": SOURCE}
    return dict(sorted(out.items()))


def run_hub_tasks(
    model_path: str,
    out_dir: Path,
    plan: HubTaskPlan,
    *,
    batch_size: int = 8,
    system_prompt: str | None = None,
    device: str = "cpu",
    shared_lm: SharedLM | None = None,
    generation: str = "engine",
    dtype: str = DTYPE,
) -> dict[str, Any]:
    """Evaluate a model on prepared hub tasks with ``lm_eval.simple_evaluate``.

    Args:
        model_path: a model directory or LoRA adapter directory, as for
            :func:`evals.heldout.run_heldout`.
        out_dir: where lm-eval's results, per-sample logs and ``summary.json`` are written.
        plan: from :func:`prepare_hub_tasks`.
        batch_size, system_prompt, device, generation, dtype: as for :func:`evals.heldout.run_heldout`.
        shared_lm: reuse a model already loaded for the local tasks.

    Returns:
        ``{"metrics", "config", "config_digest", "seconds", "paths", "files"}`` as
        :func:`evals.heldout.run_heldout` returns them; ``config["tasks"]`` identifies each task's
        documents by content.
    """
    started = time.perf_counter()
    check_generation(generation)
    check_dtype(dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = resolve_model(model_path)
    config = {
        "source": SOURCE,
        "tasks": plan.tasks,
        "num_fewshot": plan.num_fewshot,
        "model": model_config(spec, dtype),
        "limit": plan.limit,
        "sample_indices_digest": settings_digest(plan.samples) if plan.samples is not None else None,
        **run_settings(seed=plan.seed, batch_size=batch_size, system_prompt=system_prompt, device=device,
                       generation=generation),
    }
    shared = shared_lm or SharedLM(spec, batch_size=batch_size, device=device, generation=generation, dtype=dtype)
    lm = shared.get(spec, batch_size, device, generation, dtype)
    log.info("hub held-out evaluation of %s on %s (limit=%s, seed=%s)", spec.path, plan.names, plan.limit, plan.seed)
    return run_and_record(
        lm, plan.objects, plan.task_manager, plan.samples, config=config, paths=model_paths(spec), out_dir=out_dir,
        summarize=lambda results: summarize_hub_metrics(results, plan.names, plan.members), started=started,
        label="hub held-out")



def data_digest(plan: HubTaskPlan, task: str) -> str | None:
    """A short digest of what a reported task's documents are (content, split, few-shot count,
    version; for a group, all of its tasks'): part of each of its metrics' provenance, so numbers
    from a changed hub dataset are never compared as if they were the same evaluation."""
    if task in plan.tasks:
        return settings_digest(plan.tasks[task])
    for records in plan.tasks.values():
        if task in records:
            return settings_digest(records[task])
    return None
