"""Settings of the evaluations: data, AlpacaEval and its judge, held-out tasks, contamination.

``harness.config`` composes this section into the run configuration as ``eval``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.settings import Section


class EvalSection(Section):
    @model_validator(mode="before")
    @classmethod
    def _full_profile_uses_every_item(cls, data):
        # ``full`` wins over the subset sizes a config file sets for ``quick``, so that one
        # override (eval.profile=full) turns any config into a full evaluation.
        if isinstance(data, dict) and data.get("profile") == "full":
            data = {**data, "alpaca_subset": None, "heldout_limit": None}
        return data

    enabled: bool = True
    profile: Literal["quick", "full"] = "quick"
    """``quick``: the subsets ``alpaca_subset`` and ``heldout_limit`` say (seeded, the same for
    every model); ``full``: every item (805 AlpacaEval prompts, 541 IFEval, 817 TruthfulQA, 1,319
    GSM8K), whatever those two say. ``humpback eval-size`` tells, from a finished run, what n a
    target detectable effect needs and what it would cost."""
    head_to_head: bool = True
    """Judge each M_t directly against M_{t-1} and M0 on the AlpacaEval prompts (stage
    ``iter_NN/head_to_head``, reusing the answers already generated): the win-rate gate's signal
    (``gate.win_rate_signal``) and a row of the report."""
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
    judge: str = "humpback_local_rubric"
    """An annotator config: ours in ``evals/annotators/`` (``humpback_local_rubric``: the judge
    model rates each answer alone on the curation rubric, no position bias by construction;
    ``humpback_local_logprob``: it names the better of the two), or any alpaca_eval ships (the
    GPT-4 ones need OPENAI_API_KEY). On outside labels the rubric judge did better with the same
    model (docs/calibration.md)."""
    judge_model: str | None = None
    """Model behind a local judge (default: ``model.base``); the same for every iteration."""
    judge_check_pairs: int = Field(8, ge=1)
    """Reference answers used in the planted-pairs sanity check; each gives 3 corrupted pairs in
    both orders. The check is reported, but trust is decided by the calibration below."""
    min_judge_accuracy: float = Field(0.75, ge=0, le=1)
    """The planted-pairs check's pass mark (reported beside the calibration verdict)."""
    calibration_sources: list[Literal["llmbar_natural", "llmbar_mtbench", "alpaca_eval_gpt4"]] = Field(
        default_factory=lambda: ["llmbar_natural", "llmbar_mtbench", "alpaca_eval_gpt4"])
    """Labelled answer pairs the judge is calibrated on (``humpback judge-eval`` and the
    ``judge_check`` stage): LLMBar Natural and MT-Bench (human labels, decide trust) and GPT-4's
    AlpacaEval judgments (agreement with GPT-4, reported). Shipped in ``evals/data/preferences``."""
    judge_calibration_pairs: int | None = Field(50, ge=2)
    """Pairs per source in the judge calibration (a seeded subset; None: all 100 + 200 + 4,000).
    Each is judged in both orders; judgments are cached per judge identity across runs."""
    judge_orders: Literal["both", "random"] = "both"
    """AlpacaEval pairs judged in ``both`` orders (reference first, then second; the two
    preferences averaged, so a judge's position bias cancels; twice the judgments) or in one
    ``random`` order (alpaca_eval's default)."""
    judge_trust: Literal["calibration", "assumed"] = "calibration"
    """Who decides whether the judge's win rates are trusted: ``calibration`` (the verdict on
    outside labels, see ``judge_trust_margin``) or ``assumed`` (you vouch for the judge; the
    calibration is still run and reported, and every report and summary says the trust was
    assumed by configuration, not measured)."""
    judge_trust_margin: float = Field(0.0, ge=0, le=1)
    """A judge is trusted when its accuracy on the human-labelled pairs beats always-choosing-the-
    longer-answer by more than this, with the whole 95% interval of the paired difference above
    it, and its own accuracy interval lies above 0.5. Untrusted judges' win rates are reported
    but never gated on."""
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
    tokens x vocabulary x 8 bytes. Lower it where memory is short: those logits shrink in
    proportion (docs/measurements.md has the demo's peaks at 16 and at 8)."""
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
