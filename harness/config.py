"""Typed, strict run configuration, composed of each floor's own settings.

The pipeline's stage sections live in :mod:`pipeline.settings`, the evaluation's in
:mod:`evals.settings`; this module adds the harness's own (run, gates, tracking, iterations) and
composes them into :class:`RunConfig`. A config is a YAML file whose keys mirror :class:`RunConfig`. Command-line overrides use
``key.sub=value`` (values parsed as YAML scalars). Unknown keys and wrong types are errors that
name the offending key and list the valid ones.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from evals.settings import EvalSection
from pipeline.digests import settings_digest
from pipeline.settings import (
    AugmentSection,
    BackwardSection,
    CorpusSection,
    CurateSection,
    DataSection,
    EngineSection,
    FinetuneSection,
    ModelSection,
    Section,
    SeedSection,
    SelectSection,
    UnlabelledSection,
)


class ConfigError(ValueError):
    """A config file or override is invalid; the message says where and what is allowed."""


class RunSection(Section):
    name: str = "demo"
    """Run name; the run directory is ``<root>/<name>`` unless ``--run-dir`` is given."""
    root: str = "runs"
    seed: int = 0
    """Global seed: sampling, data shuffles and training all derive their seeds from it."""
    share_stages_from: list[str] = Field(default_factory=list)
    """Other run directories this run may take finished stages from instead of computing them
    (the ablation configs share everything up to where they differ). A stage is taken only when
    one of them holds it committed under exactly the cache key this run computes for it (same
    stage version, settings and input digests), and its files still match their digests; it is
    copied in (hard links where the file system allows). Anything else is computed. Relative paths
    are taken from the current directory; directories that do not exist are passed over."""
    tags: dict[str, str] = Field(default_factory=dict)
    """Labels of this run, e.g. ``{ablation: uncurated}``: tags of its MLflow parent run, and
    shown by ``humpback compare``."""

    @model_validator(mode="after")
    def _tags_are_ours(self) -> "RunSection":
        reserved = [k for k in self.tags if k.startswith(("mlflow.", "humpback."))]
        if reserved:
            raise ValueError(f"run.tags {reserved}: names starting with 'mlflow.' or 'humpback.' are reserved")
        return self


class GateRuleSection(Section):
    @model_validator(mode="before")
    @classmethod
    def _z_was_removed(cls, data: Any) -> Any:
        # Run directories made before the paired gate hold it in config.yaml: ignored, with a
        # warning, so that `humpback gate` and `humpback report` still read them.
        if isinstance(data, dict) and "z" in data:
            logging.getLogger(__name__).warning(
                "gate.metrics[].z is ignored: each gated metric is now compared item by item with a confidence "
                "interval at gate.level (README, Gates); remove z from %s", data.get("metric"))
            data = {k: v for k, v in data.items() if k != "z"}
        return data

    metric: str
    abs_tol: float = Field(0.0, ge=0)
    """The tolerance, in the metric's own units: a regression is a change whose whole interval
    lies beyond this drop (for the head-to-head win rate: this many points below 50)."""


class GateSection(Section):
    enabled: bool = True
    baseline: Literal["best", "previous", "m0"] = "previous"
    """What each iteration is compared with: the one before, M0, or the best earlier iteration
    per metric (the largest of noisy numbers: biased towards false alarms as iterations pile up)."""
    metrics: list[GateRuleSection] = Field(default_factory=lambda: [
        GateRuleSection(metric="alpaca_eval/win_rate", abs_tol=5.0),
        GateRuleSection(metric="ifeval/prompt_level_loose_acc", abs_tol=0.05),
        GateRuleSection(metric="truthfulqa_mc2/acc", abs_tol=0.05),
    ])
    level: float = Field(0.95, gt=0, lt=1)
    """Confidence that all the gated metrics' intervals hold together (see ``correction``)."""
    correction: Literal["bonferroni", "none"] = "bonferroni"
    """``bonferroni``: with m gated metrics each interval is at 1 - (1 - level) / m."""
    power: float = Field(0.8, gt=0, lt=1)
    """For the minimum detectable effect each decision reports."""
    on_inconclusive: Literal["continue", "stop"] = "continue"
    """What an interval that straddles the tolerance does: the loop goes on (and the log and the
    report say so), or stops as for a regression."""
    win_rate_signal: Literal["head_to_head", "reference"] = "head_to_head"
    """What the win-rate gate compares: this model judged directly against its baseline on the
    same prompts (``head_to_head``; the stage ``iter_NN/head_to_head``), or the two models' win
    rates against the reference, prompt by prompt."""
    min_selected: int = Field(1, ge=0)
    """Data gate: fewer curated pairs than this and the iteration does not fine-tune."""
    max_unscored_rate: float = Field(0.5, ge=0, le=1)
    max_augment_reject_rate: float = Field(0.4, ge=0, le=1)
    """Data gate: the share of corpus segments augmentation may leave without a usable
    instruction (unfinished, echo, too short); above it the loop stops, naming the reasons. The
    demo and news corpora lose 6-15% (docs/measurements.md); 0.4 stops a corpus that loses nearly
    half, while an 8-segment demo losing 10% on average crosses it with probability about 0.5%."""
    max_contamination_rate: float = Field(0.05, ge=0, le=1)
    """Share of selected pairs that overlapped an evaluation prompt (they are dropped either way)."""
    on_unfiltered: Literal["continue", "stop"] = "continue"
    """What a curation whose threshold left out no scored candidate does (the ``curation/filtered``
    check; ``select.k: all`` is exempt): the loop goes on and the log, summary and report say so, or
    the gate fails before M_t is trained on uncurated data."""
    stop_at_fixed_point: bool = True
    """From iteration 2 on, a selection byte-identical to the previous iteration's means M_t would
    repeat M_{t-1} (same base, data, settings and seed) and so would every later iteration: the
    loop ends there, successfully, and the gate's ``data/changed`` check says so. False: it goes on."""


class TrackingSection(Section):
    @model_validator(mode="before")
    @classmethod
    def _off_is_not_false(cls, data: Any) -> Any:
        # In a YAML file, `uri: off` arrives as False.
        if isinstance(data, dict) and data.get("uri") is False:
            data = {**data, "uri": "off"}
        return data

    uri: str | None = None
    """MLflow tracking URI: None for a local database under ``run.root`` (``mlflow.db``), ``off``
    to disable, or a server such as ``http://127.0.0.1:5000``."""
    experiment: str | None = None
    """Default: ``humpback/<run.name>``."""
    register_model: str | None = "humpback"
    """Registered model name for the champion (None: do not register)."""


class IterateSection(Section):
    iterations: int = Field(2, ge=0)


class RunConfig(Section):
    run: RunSection = RunSection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    seed: SeedSection = SeedSection()
    unlabelled: UnlabelledSection = UnlabelledSection()
    corpus: CorpusSection = CorpusSection()
    backward: BackwardSection = BackwardSection()
    augment: AugmentSection = AugmentSection()
    curate: CurateSection = CurateSection()
    select: SelectSection = SelectSection()
    finetune: FinetuneSection = FinetuneSection()
    engine: EngineSection = EngineSection()
    eval: EvalSection = EvalSection()
    gate: GateSection = GateSection()
    tracking: TrackingSection = TrackingSection()
    iterate: IterateSection = IterateSection()

    @model_validator(mode="after")
    def _calibrated_k_needs_calibration(self) -> "RunConfig":
        if self.select.k == "calibrated" and not self.curate.calibration_pairs:
            raise ValueError("select.k is 'calibrated', which reads the threshold from the curator's calibration: "
                             "set curate.calibration_pairs (e.g. 20) or give a numeric select.k")
        return self

    def digest(self, *sections: str) -> str:
        """Stable hash of the named sections (all sections if none are named)."""
        dump = self.model_dump(mode="json")
        if sections:
            dump = {name: dump[name] for name in sections}
        return settings_digest(dump)


def valid_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key the config accepts, for error messages and ``--help``."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(valid_keys(ann, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key not in valid_keys():
        raise ConfigError(_unknown_key_message(key, "override"))
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from exc
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw.strip()  # YAML 1.1 reads on/off/yes/no as booleans; keep the word, let the type decide
    return key, value


def _unknown_key_message(key: str, where: str) -> str:
    section = key.split(".")[0]
    keys = valid_keys()
    near = [k for k in keys if k.startswith(section + ".")] or keys
    return f"{where}: unknown key {key!r}. Valid keys: {', '.join(near)}"


EXTENDS = "extends"
"""A config file's top-level key naming the file it starts from (relative to itself)."""


def _read_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file's mapping, merged onto the file it ``extends`` (recursively)."""
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}" + (f" (extended by {seen[-1]})" if seen else "")) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    parent = tree.pop(EXTENDS, None)
    if parent is None:
        return tree
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: '{EXTENDS}' must be the path of another config file, relative to this one")
    base = (path.parent / parent).resolve()
    if base in seen or base == path.resolve():
        raise ConfigError(f"{path}: '{EXTENDS}: {parent}' extends itself through {', '.join(map(str, seen))}")
    return merge_trees(_read_tree(base, (*seen, path.resolve())), tree)


def merge_trees(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``: sections merge key by key; any other value (a list too) replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge_trees(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config (or defaults when ``path`` is None) and apply ``key=value`` overrides.

    A file may start from another: ``extends: ../demo.yaml`` (relative to the file) takes that
    file's settings and puts its own on top, section by section (a list replaces the list)."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        tree = _read_tree(Path(path))
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc, source)) from None


def _format_validation(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append("  " + _unknown_key_message(key, "unknown key").split(": ", 1)[1])
        else:
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
