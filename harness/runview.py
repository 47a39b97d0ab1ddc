"""A typed, read-only view of a run directory: the one place that parses it.

Run as: ``view = read_run(Path("runs/demo"))``, then e.g. ``view.model("iter_01").selection.keep_rate``.

What is read, once, when the view is made: ``config.yaml``, ``env.json``, the ``manifest.json`` of
every stage folder (``seed``, ``iter_01/curate``, ... one or two levels down), and for each model
(``base``, ``iter_NN``) its ``eval/summary.json`` and ``gate.json``. The seed's lengths are read
from ``seed/data.jsonl`` when first asked for. :mod:`harness.rundir` is the writing side.

A file that is absent leaves a gap (None, or an empty record). A file that is present but cannot
be read as what it should be is a :class:`RunDirError`, which names the file: with
``strict=True`` the first one is raised; otherwise it is left out, logged and listed in
``RunView.problems``, so that the report of a run that crashed mid-write still renders. Only
``config.yaml`` is always raised: it is the run's identity (parameters, the parent run in MLflow),
and it is written once, before any stage runs.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.gate import GATE, Decision, GateResult, Metric
from harness.rundir import DONE, MANIFEST

log = logging.getLogger(__name__)
BASE = "base"
ITERATION = re.compile(r"^iter_(\d+)$")
CONFIG = "config.yaml"
ENV = "env.json"
EVAL_SUMMARY = "eval/summary.json"
JUDGE_CALIBRATION = "judge_check/calibration.json"
SEED_DATA = "seed/data.jsonl"
CHECKPOINT = "finetune/model"
HEAD_TO_HEAD = "head_to_head/head_to_head.json"


class RunDirError(ValueError):
    """A file of a run directory that is not what it should be; the message starts with its path."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def _number(value: Any) -> int | float | None:
    """The value if it is a number (an int stays an int; a bool is not a number), else None."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _mapping(path: Path, value: Any, what: str) -> dict[str, Any]:
    """``value`` if it is a JSON object, {} if absent (None); otherwise the file is malformed."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RunDirError(path, f"{what} is {type(value).__name__}, not an object")
    return value


def _load(path: Path, kind: str = "JSON") -> dict[str, Any] | None:
    """A JSON (or YAML) file holding one object; None when the file is absent."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return _mapping(path, yaml.safe_load(text) if kind == "YAML" else json.loads(text), "the file")
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise RunDirError(path, f"not valid {kind} ({exc})") from None


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Stage:
    """One stage folder with a ``manifest.json`` (see :class:`harness.rundir.RunDir`)."""

    name: str
    """The folder relative to the run directory: ``seed``, ``iter_01/curate``, ``base/eval``."""
    done: bool
    """Committed: the ``.done`` marker is there (a ``*.partial`` folder may hold a manifest too)."""
    stats: dict[str, Any]
    """What the stage function returned; free-form, by stage."""
    output_digest: str | None
    started: str | None
    """Local time the stage started, to the second (``2026-01-02T03:04:05``)."""
    written: float
    """When the manifest was written (its mtime): orders stages that started in the same second."""
    seconds: float | None
    peak_rss_mib: float | None
    rss_start_mib: float | None
    rss_end_mib: float | None
    gpu_peak_mib: float | None
    timed: bool
    """The manifest records a run of the stage (its name, seconds or memory peak), not only stats."""


def _stage(root: Path, path: Path) -> Stage:
    manifest = _load(path) or {}
    digest = manifest.get("output_digest")
    started = manifest.get("started")
    return Stage(
        name=path.parent.relative_to(root).as_posix(),
        done=(path.parent / DONE).exists(),
        stats=_mapping(path, manifest.get("stats"), "stats"),
        output_digest=str(digest) if digest else None,
        started=str(started) if started else None,
        written=path.stat().st_mtime,
        **{key: _number(manifest.get(key))
           for key in ("seconds", "peak_rss_mib", "rss_start_mib", "rss_end_mib", "gpu_peak_mib")},
        timed=bool({"stage", "seconds", "peak_rss_mib"} & set(manifest)),
    )


@dataclass(frozen=True)
class MeanStd:
    mean: float | None = None
    std: float | None = None


@dataclass(frozen=True)
class Curation:
    """The curate stage's stats: how the candidates were rated (all None when not curated)."""

    pairs: int | None = None
    histogram: dict[str, int] = field(default_factory=dict)
    """Score (``"1"`` .. ``"5"``, ``"unscored"``) -> pairs."""
    unscored: int | None = None
    unscored_rate: float | None = None
    curator: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    """The curator against outside labels (``harness.calibration.curator_headline``): pairwise
    accuracy on human labels and with GPT-4, with intervals, rank correlation, suggested k."""
    planted: int | None = None
    """Rated pairs in which planted rating text was found and taken out before rating (None: a
    run made before the curator looked for it)."""
    planted_kinds: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, path: Path, stats: dict[str, Any]) -> Curation:
        planted = _mapping(path, stats.get("planted"), "stats.planted")
        return cls(_number(stats.get("pairs")), _mapping(path, stats.get("histogram"), "stats.histogram"),
                   _number(stats.get("unscored")), _number(stats.get("unscored_rate")),
                   _mapping(path, stats.get("curator"), "stats.curator"),
                   _mapping(path, stats.get("calibration"), "stats.calibration"),
                   _number(planted.get("flagged")), _mapping(path, planted.get("kinds"), "stats.planted.kinds"))


@dataclass(frozen=True)
class Selection:
    """The select stage's stats: what was kept at threshold ``k``, and the kept pairs' quality."""

    candidates: int | None = None
    selected: int | None = None
    keep_rate: float | None = None
    k: float | None = None
    unscored: int | None = None
    contaminated: int | None = None
    flagged: int | None = None
    """Pairs left out because curation found planted rating text in them (``select.drop_flagged``)."""
    curator: dict[str, float] = field(default_factory=dict)
    """The curator's precision and recall on labelled pairs at this ``k``."""
    instruction_chars: MeanStd = MeanStd()
    response_chars: MeanStd = MeanStd()
    instruction_distinct_1: float | None = None
    instruction_distinct_2: float | None = None
    near_duplicate_rate: float | None = None

    @classmethod
    def of(cls, path: Path, stats: dict[str, Any]) -> Selection:
        quality = _mapping(path, stats.get("quality"), "stats.quality")

        def chars(key: str) -> MeanStd:
            node = _mapping(path, quality.get(key), f"stats.quality.{key}")
            return MeanStd(_number(node.get("mean")), _number(node.get("std")))

        return cls(
            *(_number(stats.get(k)) for k in ("candidates", "selected", "keep_rate", "k", "unscored", "contaminated",
                                               "flagged")),
            curator=_mapping(path, stats.get("curator"), "stats.curator"),
            instruction_chars=chars("instruction_chars"), response_chars=chars("response_chars"),
            instruction_distinct_1=_number(quality.get("instruction_distinct_1")),
            instruction_distinct_2=_number(quality.get("instruction_distinct_2")),
            near_duplicate_rate=_number(quality.get("instruction_near_duplicate_rate")),
        )


JUDGE_NUMBERS = ("human_accuracy", "human_accuracy_low", "human_accuracy_high", "minus_longer", "minus_longer_low",
                 "minus_longer_high", "gpt4_agreement", "gpt4_agreement_low", "gpt4_agreement_high",
                 "planted_accuracy", "position_bias")


@dataclass(frozen=True)
class JudgeCheck:
    """How the judge did against outside labels (trust) and on planted pairs (sanity); an
    untrusted judge's numbers are not compared."""

    human_accuracy: float | None = None
    """Accuracy on the human-labelled pairs, both orders averaged, with its 95% interval."""
    human_accuracy_low: float | None = None
    human_accuracy_high: float | None = None
    minus_longer: float | None = None
    """Paired difference from always choosing the longer answer, same pairs, with its interval."""
    minus_longer_low: float | None = None
    minus_longer_high: float | None = None
    gpt4_agreement: float | None = None
    gpt4_agreement_low: float | None = None
    gpt4_agreement_high: float | None = None
    planted_accuracy: float | None = None
    position_bias: float | None = None
    trusted: bool | None = None
    verdict: str | None = None


@dataclass(frozen=True)
class EvalSummary:
    """A model's ``eval/summary.json``: every metric with its stderr, n and provenance."""

    metrics: dict[str, Metric]
    judge_check: JudgeCheck
    seconds: float | None


def _metric(path: Path, name: str, raw: Any) -> Metric:
    """One metric; a bare number is taken as its value."""
    m = raw if isinstance(raw, dict) else {"value": raw}
    value = m.get("value")
    if value is not None and not isinstance(value, (int, float)):
        raise RunDirError(path, f"metric {name}: value {value!r} is not a number")
    return Metric(name, value, _number(m.get("stderr")), m.get("n"), m.get("higher_is_better", True),
                  _mapping(path, m.get("provenance"), f"metric {name}: provenance"), m.get("trusted", True))


def _eval_summary(path: Path) -> EvalSummary | None:
    raw = _load(path)
    if raw is None:
        return None
    check = _mapping(path, raw.get("judge_check"), "judge_check")
    trusted = check.get("trusted")
    return EvalSummary(
        {name: _metric(path, name, m) for name, m in _mapping(path, raw.get("metrics"), "metrics").items()},
        JudgeCheck(**{k: _number(check.get(k)) for k in JUDGE_NUMBERS if k != "planted_accuracy"},
                   # runs made before the calibration stage hold only the planted check's accuracy
                   planted_accuracy=_number(check.get("planted_accuracy", check.get("accuracy"))),
                   trusted=trusted if isinstance(trusted, bool) else None,
                   verdict=check.get("verdict") if isinstance(check.get("verdict"), str) else None),
        _number(raw.get("seconds")),
    )


def _gate(path: Path) -> GateResult | None:
    raw = _load(path)
    if raw is None:
        return None
    decisions = raw.get("decisions") or []
    if not isinstance(decisions, list) or not all(isinstance(d, dict) for d in decisions):
        raise RunDirError(path, "decisions is not a list of objects")
    evaluated = raw.get("evaluated")
    return GateResult(
        raw.get("passed") is True,
        [_decision(d) for d in decisions],
        raw.get("baseline"),
        evaluated if isinstance(evaluated, bool) else None,
    )


_DECISION_NUMBERS = ("current", "baseline", "threshold", "estimate", "low", "high", "level", "mde", "sd")
_DECISION_TEXTS = ("outcome", "signal", "method")
_DECISION_INTS = ("n", "items_needed", "baseline_iteration")


def _decision(d: dict[str, Any]) -> Decision:
    """One decision of ``gate.json``; fields a gate of an older version did not write stay None."""
    blind = d.get("blind")
    return Decision(d.get("check"), bool(d.get("passed")), d.get("reason"),
                    **{k: _number(d.get(k)) for k in _DECISION_NUMBERS},
                    **{k: d.get(k) if isinstance(d.get(k), str) else None for k in _DECISION_TEXTS},
                    **{k: d.get(k) if isinstance(d.get(k), int) and not isinstance(d.get(k), bool) else None
                       for k in _DECISION_INTS},
                    blind=blind if isinstance(blind, bool) else None)


@dataclass(frozen=True)
class ModelView:
    """One model of the run: ``base`` (the untuned model) or ``iter_NN`` (M_t), and its stages."""

    name: str
    stages: dict[str, Stage] = field(default_factory=dict)
    """``curate``, ``select``, ``finetune``, ``eval`` (those that have a manifest)."""
    eval: EvalSummary | None = None
    gate: GateResult | None = None
    curation: Curation = Curation()
    selection: Selection = Selection()
    training: dict[str, Any] = field(default_factory=dict)
    """The finetune stage's stats (``train_pairs``, ``final_loss``, ...)."""
    checkpoint: bool = False
    """Whether ``finetune/model`` is on disk."""
    head_to_head: dict[str, Any] | None = None
    """``head_to_head/head_to_head.json``: this model judged against earlier ones (``against``:
    ``{"iter_00": {"win_rate", "interval_95", "mde_95", "n", ...}}``, ``trusted``)."""

    def committed(self, stage: str) -> bool:
        """Whether that stage of this model is finished (its folder carries ``.done``)."""
        return stage in self.stages and self.stages[stage].done

    @property
    def iteration(self) -> int | None:
        """t of ``iter_t``; None for ``base``."""
        match = ITERATION.match(self.name)
        return int(match.group(1)) if match else None


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class RunView:
    """A run directory as read at one moment."""

    root: Path
    """As given (not resolved): paths below are ``root / name``."""
    config: dict[str, Any]
    """The resolved ``config.yaml`` as a tree ({} when absent)."""
    env: dict[str, Any]
    """``env.json``: git commit, packages, machine ({} when absent)."""
    stages: dict[str, Stage]
    """Every folder with a manifest, by name (``seed``, ``iter_01/curate``, ``iter_01/curate.partial``)."""
    models: dict[str, ModelView]
    """``base`` first (always, maybe empty), then each ``iter_NN`` folder by t."""
    problems: tuple[RunDirError, ...] = ()
    """Files that were present but unreadable, left out (only when not ``strict``)."""
    judge_calibration: dict[str, Any] | None = None
    """``judge_check/calibration.json``: the judge and the trivial judges on outside labels
    (:func:`evals.calibration.judge_eval.evaluate_judge`); None when absent."""

    @property
    def run_name(self) -> str | None:
        """``run.name`` of the config."""
        return (self.config.get("run") or {}).get("name")

    @property
    def name(self) -> str:
        """``run.name`` of the config, else the directory's name."""
        return self.run_name or self.root.name

    @property
    def git_commit(self) -> str | None:
        return self.env.get("git_commit")

    def model(self, name: str) -> ModelView:
        """The model of that name; an empty one when the run has nothing for it yet."""
        return self.models.get(name) or ModelView(name)

    def stages_in_order(self) -> list[Stage]:
        """The stages whose manifest records a run, in the order they ran: ``started`` (to the
        second), then when the manifest was written."""
        timed = [s for s in self.stages.values() if s.timed]
        return sorted(timed, key=lambda s: (s.started or "", s.written, s.name))

    @functools.cached_property
    def seed_lengths(self) -> dict[str, MeanStd]:
        """``instruction`` / ``response`` -> mean and std of the seed pairs' character counts."""
        path = self.root / SEED_DATA
        sizes: dict[str, list[int]] = {"instruction": [], "response": []}
        if path.is_file():
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise RunDirError(path, f"line {number} is not valid JSON ({exc})") from None
                for key in sizes:
                    sizes[key].append(len(str(row.get(key, ""))))
        return {k: _mean_std(v) for k, v in sizes.items() if v}


def _mean_std(values: list[int]) -> MeanStd:
    mean = sum(values) / len(values)
    return MeanStd(mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)))


class _Reader:
    """Reads each file once; strict raises the first problem, else keeps it and leaves a gap."""

    def __init__(self, strict: bool):
        self.strict = strict
        self.problems: list[RunDirError] = []

    def read(self, parse: Any, path: Path, default: Any = None) -> Any:
        try:
            return parse(path)
        except RunDirError as exc:
            if self.strict:
                raise
            log.warning("%s; left out", exc)
            self.problems.append(exc)
            return default


def _model(reader: _Reader, root: Path, name: str, stages: dict[str, Stage]) -> ModelView:
    own = {s.name.split("/", 1)[1]: s for s in stages.values() if s.name.startswith(name + "/")}

    def stats_of(stage: str, parse: Any, default: Any) -> Any:
        if stage not in own:
            return default
        return reader.read(lambda p: parse(p, own[stage].stats), root / name / stage / MANIFEST, default)

    return ModelView(
        name, own,
        eval=reader.read(_eval_summary, root / name / EVAL_SUMMARY),
        gate=reader.read(_gate, root / name / GATE),
        curation=stats_of("curate", Curation.of, Curation()),
        selection=stats_of("select", Selection.of, Selection()),
        training=own["finetune"].stats if "finetune" in own else {},
        checkpoint=(root / name / CHECKPOINT).exists(),
        head_to_head=reader.read(_head_to_head, root / name / HEAD_TO_HEAD),
    )


def _head_to_head(path: Path) -> dict[str, Any] | None:
    raw = _load(path)
    if raw is None:
        return None
    against = raw.get("against")
    if not isinstance(against, dict) or not all(isinstance(v, dict) for v in against.values()):
        raise RunDirError(path, "against is not an object of objects")
    return raw


def read_run(run_dir: str | Path, *, strict: bool = False) -> RunView:
    """Read a run directory (any subset of its files may be missing).

    Raises:
        FileNotFoundError: ``run_dir`` is not a directory.
        RunDirError: a malformed ``config.yaml``; with ``strict``, the first malformed file.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"run directory not found: {root}")
    reader = _Reader(strict)
    manifests = sorted([*root.glob(f"*/{MANIFEST}"), *root.glob(f"*/*/{MANIFEST}")])
    stages = {s.name: s for s in (reader.read(lambda p: _stage(root, p), path) for path in manifests) if s}
    iterations = sorted((p.name for p in root.iterdir() if p.is_dir() and ITERATION.match(p.name)),
                        key=lambda n: int(ITERATION.match(n).group(1)))
    models = {name: _model(reader, root, name, stages) for name in [BASE, *iterations]}
    calibration = reader.read(_calibration, root / JUDGE_CALIBRATION)
    return RunView(root, _load(root / CONFIG, "YAML") or {}, reader.read(_load, root / ENV) or {},
                   stages, models, tuple(reader.problems), calibration)


def _calibration(path: Path) -> dict[str, Any] | None:
    raw = _load(path)
    if raw is None:
        return None
    for key in ("subject", "verdict"):
        if not isinstance(raw.get(key), str):
            raise RunDirError(path, f"{key} is missing or not text")
    groups = _mapping(path, raw.get("groups"), "groups")
    for name, row in groups.items():
        if not isinstance(row, dict) or not isinstance(row.get("judges"), dict) or not isinstance(row.get("vs"), dict):
            raise RunDirError(path, f"groups.{name} lacks judges/vs")
    return raw


def as_view(run: str | Path | RunView) -> RunView:
    """``run`` itself if it is a view already, else the view of that directory."""
    return run if isinstance(run, RunView) else read_run(run)
