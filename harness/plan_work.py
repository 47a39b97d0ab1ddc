"""The work a config asks for, stage by stage, counted before anything runs.

Items come from the config (seed and corpus sizes, evaluation subsets, iterations); characters
per item are counted in the local data where it is on this machine (the seed files, the shipped
evaluation data, the prompt templates) and otherwise taken from a stated figure
(:mod:`harness.plan_rates`). Every figure used is returned with its source.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean
from typing import Any

from harness import plan_rates as R
from harness.config import RunConfig

FULL_ALPACA = 805


@dataclass(frozen=True)
class Work:
    stage: str
    kind: str
    """``generate`` (prompts in, new tokens out), ``score`` (prompts only) or ``train``."""
    items: int
    prompt_tokens: float = 0.0
    new_tokens: float = 0.0
    train_tokens: float = 0.0
    method: str = ""
    """``full`` or ``lora`` for training work."""
    recompute: bool = False
    """Training with gradient checkpointing: the forward pass runs twice."""
    note: str = ""


@dataclass
class Figures:
    """Per-item figures, each with its source, gathered once per plan."""

    values: dict[str, float] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def set(self, key: str, value: float, source: str) -> float:
        self.values[key], self.sources[key] = value, source
        return value

    def __getitem__(self, key: str) -> float:
        return self.values[key]


def _mean_chars(texts: list[str]) -> float:
    return fmean(len(t) for t in texts) if texts else 0.0


def _seed(cfg: RunConfig, fig: Figures) -> int:
    """Seed pairs, and their mean characters, counted in the seed files when they are here."""
    from pipeline.data import DataError, load_pairs, resolve_source

    sources = [resolve_source(p, cfg.data.dir) for p in cfg.seed.path]
    rows = None
    if not any(s.startswith("hub:") for s in sources):
        try:
            rows = load_pairs(sources, cfg.seed.instruction_field, cfg.seed.response_field, cfg.seed.limit).rows
        except (DataError, OSError):
            rows = None
    if rows:
        where = f"counted in {', '.join(cfg.seed.path)}"
        fig.set("seed_instruction_chars", _mean_chars([r["instruction"] for r in rows]), where)
        fig.set("seed_response_chars", _mean_chars([r["response"] for r in rows]), where)
        return len(rows)
    missing = "not on this machine" if not any(s.startswith("hub:") for s in sources) else "on the hub"
    fig.set("seed_instruction_chars", 150.0, f"assumed (seed files {missing})")
    fig.set("seed_response_chars", 900.0, f"assumed (seed files {missing})")
    if cfg.seed.limit is None:
        raise ValueError(f"the seed ({', '.join(cfg.seed.path)}) is {missing}, so its size is unknown: set seed.limit")
    return cfg.seed.limit


def _eval_texts(cfg: RunConfig) -> dict[str, list[str]] | None:
    """Prompts of the local evaluation tasks, as the model sees their text (None: no local data)."""
    from evals.bundled import resolve_data_dir

    root = resolve_data_dir(cfg.eval.data_dir)
    if root is None:
        return None

    def read(rel: str):
        path = root / rel
        if not path.exists() and Path(str(path) + ".gz").exists():
            path = Path(str(path) + ".gz")
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        text = raw.decode("utf-8")
        return json.loads(text) if rel.endswith(".json") else [json.loads(x) for x in text.splitlines() if x.strip()]

    try:
        out: dict[str, list[str]] = {"alpaca_eval": [r["instruction"] for r in read(
            "alpaca_eval/reference_text_davinci_003.json")]}
        out["ifeval"] = [r["prompt"] for r in read("heldout/ifeval/input_data.jsonl")]
        gsm = read("heldout/gsm8k/test.jsonl")
        shots = "".join(r["question"] + r["answer"] for r in gsm[:5])  # 5-shot (evals/tasks/humpback_gsm8k.yaml)
        out["gsm8k"] = [shots + r["question"] for r in gsm]
        tqa = read("heldout/truthfulqa/v1/mc_task.json")
        # a log-likelihood request per answer choice, each with the question as its context
        out["truthfulqa_mc1"] = ["".join(r["question"] + c for c in r["mc1_targets"]) for r in tqa]
        out["truthfulqa_mc2"] = ["".join(r["question"] + c for c in r["mc2_targets"]) for r in tqa]
    except (OSError, ValueError, KeyError):
        return None
    return out


def _template_chars(name: str) -> float:
    from importlib import resources

    return float(len((resources.files("pipeline") / "prompts" / f"{name}.txt").read_text(encoding="utf-8")))


def _train_tokens(examples: int, per_example: float, section) -> float:
    """Tokens one training stage processes: epochs (or max_steps) over examples cut at max_seq_len."""
    per_example = min(per_example, section.max_seq_len)
    if section.max_steps > 0:
        return section.max_steps * section.batch_size * section.grad_accum * per_example
    return examples * section.epochs * per_example


def count_work(cfg: RunConfig, corpus_segments: int | None = None, keep_rate: float | None = None) -> tuple[list[Work], Figures, list[str]]:
    """Every stage's work in the order the loop runs them, the figures behind it, and warnings."""
    fig = Figures()
    warnings: list[str] = []
    cpt, cpt_src = R.CHARS_PER_TOKEN
    fig.set("chars_per_token", cpt, cpt_src)
    tok = lambda chars: chars / cpt  # noqa: E731

    seed_n = _seed(cfg, fig)
    if cfg.corpus.max_segments is not None and corpus_segments is None:
        segments = cfg.corpus.max_segments
        fig.set("segments", segments, "corpus.max_segments (an upper bound: the filters may leave fewer)")
    elif corpus_segments is not None:
        segments = corpus_segments
        fig.set("segments", segments, "given (--corpus-segments)")
    else:
        raise ValueError("the corpus size is known only after the corpus stage: set corpus.max_segments or pass "
                         "--corpus-segments (the paper's corpus: 502,000 segments)")
    seg = fig.set("segment_chars", (cfg.corpus.min_chars + cfg.corpus.max_chars) / 2,
                  "assumed: midpoint of corpus.min_chars and max_chars (the news corpus measured 979 at 600-1200)")
    instr = fig.set("instruction_tokens", R.INSTRUCTION_TOKENS[0], R.INSTRUCTION_TOKENS[1])
    yield_ = fig.set("augment_yield", R.AUGMENT_YIELD[0], R.AUGMENT_YIELD[1])
    if cfg.select.k == "all":
        keep = fig.set("keep_rate", 1.0, "select.k: all (every augmented pair)")
    elif keep_rate is not None:
        keep = fig.set("keep_rate", keep_rate, "given (--keep-rate)")
    else:
        keep = fig.set("keep_rate", R.KEEP_RATE[0], R.KEEP_RATE[1])
    over = R.CHAT_OVERHEAD_TOKENS
    pair_tokens = tok(fig["seed_instruction_chars"] + fig["seed_response_chars"]) + over
    work = [
        Work("backward", "train", seed_n, train_tokens=_train_tokens(seed_n, pair_tokens, cfg.backward),
             method=cfg.backward.method, recompute=cfg.backward.gradient_checkpointing,
             note=f"{cfg.backward.epochs:g} epochs on {seed_n:,} seed pairs"),
        Work("augment", "generate", segments, prompt_tokens=segments * (tok(_template_chars("backward_v1") + seg) + over),
             new_tokens=segments * instr, note="one instruction per segment"),
        Work("iter_00/finetune", "train", seed_n, train_tokens=_train_tokens(seed_n, pair_tokens, cfg.finetune),
             method=cfg.finetune.method, recompute=cfg.finetune.gradient_checkpointing, note="M0: the seed alone"),
    ]
    candidates = round(segments * yield_)
    calibration = (cfg.curate.calibration_pairs or 0) * R.CALIBRATION_SOURCES * R.RATINGS_PER_CALIBRATION_PAIR
    smoke = cfg.curate.smoke_pairs or R.SMOKE_PAIRS
    rubric = tok(_template_chars(("curation_rubric_logprob_" + cfg.curate.template.rsplit("_", 1)[-1])
                                 if cfg.curate.mode == "logprob" else cfg.curate.template))
    labelled_tokens = tok(fig["seed_instruction_chars"] + fig["seed_response_chars"])
    selected = round(candidates * keep)
    if cfg.select.max_pairs is not None and selected > cfg.select.max_pairs:
        selected = cfg.select.max_pairs
    fig.set("selected", selected, f"{candidates:,} candidates x keep rate {keep:.3f}"
            + (f", capped at select.max_pairs {cfg.select.max_pairs}" if cfg.select.max_pairs is not None else ""))
    example_tokens = (seed_n * pair_tokens + selected * (instr + tok(seg) + over)) / max(1, seed_n + selected)
    for t in range(1, cfg.iterate.iterations + 1):
        rated = candidates + calibration + smoke
        prompt = candidates * (rubric + instr + tok(seg) + over) + (calibration + smoke) * (rubric + labelled_tokens + over)
        new = rated * cfg.curate.max_new_tokens if cfg.curate.mode == "generate" else 0.0
        work.append(Work(f"iter_{t:02d}/curate", "generate" if new else "score", rated, prompt_tokens=prompt,
                         new_tokens=new, note=f"{candidates:,} candidates + {calibration + smoke} labelled ratings"
                         + (f"; new tokens at the budget curate.max_new_tokens={cfg.curate.max_new_tokens} (an upper "
                            f"bound)" if new else "; logprob: one forward pass each")))
        n = seed_n + selected
        work.append(Work(f"iter_{t:02d}/finetune", "train", n, train_tokens=_train_tokens(n, example_tokens, cfg.finetune),
                         method=cfg.finetune.method, recompute=cfg.finetune.gradient_checkpointing,
                         note=f"M{t}: {seed_n:,} seed + {selected:,} curated pairs"))
    if cfg.eval.enabled:
        work.extend(_eval_work(cfg, fig, tok, warnings))
    return work, fig, warnings


def _eval_work(cfg: RunConfig, fig: Figures, tok, warnings: list[str]) -> list[Work]:
    texts = _eval_texts(cfg)
    if texts is None:
        warnings.append("no local evaluation data (eval.data_dir): evaluation prompts assumed 40 tokens each")
    sizes: dict[str, int] = {}
    prompt = new = 0.0
    tasks = ["alpaca_eval", *cfg.eval.heldout_tasks]
    for task in tasks:
        full = len(texts[task]) if texts else (FULL_ALPACA if task == "alpaca_eval" else 0)
        limit = cfg.eval.alpaca_subset if task == "alpaca_eval" else cfg.eval.heldout_limit
        n = full if limit is None else min(limit, full) if full else limit
        sizes[task] = n
        mean = tok(_mean_chars(texts[task])) if texts else 40.0
        fig.set(f"{task}_prompt_tokens", mean, "counted in the evaluation data (eval.data_dir)" if texts else "assumed")
        prompt += n * (mean + R.CHAT_OVERHEAD_TOKENS)
        if task in ("alpaca_eval", "ifeval", "gsm8k"):
            new += n * cfg.eval.max_new_tokens
    if cfg.eval.heldout_hub_tasks:
        warnings.append(f"hub tasks {', '.join(cfg.eval.heldout_hub_tasks)} are not counted: their sizes and prompts "
                        f"are not known without the hub")
    per_model = sum(sizes.values())
    models = ["base", *(f"iter_{t:02d}" for t in range(cfg.iterate.iterations + 1))]
    note = (", ".join(f"{k} {v:,}" for k, v in sizes.items())
            + f"; new tokens at the budget eval.max_new_tokens={cfg.eval.max_new_tokens} (an upper bound); "
              f"judging not included")
    return [Work(f"{m}/eval", "generate", per_model, prompt_tokens=prompt, new_tokens=new, note=note) for m in models]


def summary(work: list[Work]) -> dict[str, Any]:
    return {"items": sum(w.items for w in work), "prompt_tokens": sum(w.prompt_tokens for w in work),
            "new_tokens": sum(w.new_tokens for w in work), "train_tokens": sum(w.train_tokens for w in work)}
