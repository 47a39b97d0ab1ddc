"""AlpacaEval for this project: answers through our engine, judged and scored by alpaca_eval itself.

Four pieces:

* :func:`load_instruction_set` picks a seeded, reproducible subset of the 805 AlpacaEval
  instructions together with the reference model's answers to exactly those instructions, read
  from a local folder or the hub dataset ``tatsu-lab/alpaca_eval`` (:mod:`evals.sources`);
* :func:`generate_answers` writes the evaluated model's answers through the project's engine, as
  AlpacaEval records (``instruction``, ``output``, ``generator``, ``dataset``);
* :func:`score_alpaca_eval` has alpaca_eval's ``PairwiseAnnotator`` judge every pair (caching each
  judgment on disk, so a rerun re-judges nothing) and alpaca_eval's metrics turn the preferences
  into a win rate, its standard error and a length-controlled win rate (alpaca_eval 2's
  ``length_controlled_v1`` GLM where its hub data can be had, else alpaca_eval's
  ``length_controlled_minimal`` GLM, which needs nothing but the annotations);
* :func:`check_judge` measures a judge on pairs whose better answer is known, before its win
  rates are believed.

The judges. The default, ``humpback_local_logprob``, is an alpaca_eval annotator config shipped in
``evals/annotators/`` whose completion function asks a local model, through
:meth:`pipeline.engine.Engine.choice_probs`, for the probabilities of "m" and "M" as the next
token, the way alpaca_eval 2's ``weighted_alpaca_eval_gpt4_turbo`` reads GPT-4's logprobs; the
stock ``logprob_parser`` turns them into a preference. ``humpback_longest_fake`` is built the
same way but prefers the longer output without a model (tests). Any config that alpaca_eval
ships can be named too (its GPT-4 judges need ``OPENAI_API_KEY``).

How ours plug in. alpaca_eval resolves a config's ``fn_completions`` string with
``alpaca_eval.decoders.get_fn_completions``, which knows only its own names (it passes a
callable through, but a YAML config can only hold a string). Rather than patching that module,
we use the extension point alpaca_eval provides: a ``PairwiseAnnotator`` subclass whose
``SingleAnnotator`` property returns our subclass of ``SinglePairwiseAnnotator``, which maps the
names in :data:`COMPLETION_FNS` to our functions (bound to the :class:`Judge` that holds the
judge model) and leaves every other name to alpaca_eval. Our configs therefore work through
:class:`HarnessPairwiseAnnotator` (and ``alpaca_eval.main.evaluate(..., Annotator=...)``), not
through the ``alpaca_eval`` command line.

Offline. Nothing here lets alpaca_eval reach the Hugging Face hub: references, annotator
configs and caching paths are always passed explicitly (its defaults download), ``evaluate`` and
its leaderboards are not used, and the one hub download left on its path (the data of the
length-controlled GLM) is served from a local directory or the local hub cache only, see
:func:`_hub_files_offline`. The reference outputs come from the hub only when asked for
(``source="hub"``, or ``"auto"`` without a local file), through :mod:`evals.sources`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch

from evals import sources
from evals.sources import REFERENCES  # noqa: F401 (re-exported: the named references)
from pipeline.digests import file_digest, model_dir_digest, settings_digest
from pipeline.engine import Engine, SamplingParams, TransformersEngine
from pipeline.models import load_model, load_tokenizer, resolve_base
from pipeline.io import content_digest, read_text, write_json_atomic
from pipeline.prompts import forward_messages

# alpaca_eval sets the root logger to INFO when its annotators are imported, and its utils import
# the deprecated pkg_resources; neither should leak into the caller's process.
_root_level = logging.getLogger().level
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import alpaca_eval
    from alpaca_eval import constants as ae_constants
    from alpaca_eval import metrics as ae_metrics
    from alpaca_eval import utils as ae_utils
    from alpaca_eval.annotators import PairwiseAnnotator
    from alpaca_eval.annotators.pairwise_evaluator import SinglePairwiseAnnotator
logging.getLogger().setLevel(_root_level)

log = logging.getLogger(__name__)

ANNOTATORS_DIR = Path(__file__).resolve().parent / "annotators"
LOCAL_JUDGE = "humpback_local_logprob"
FAKE_JUDGE = "humpback_longest_fake"

RECORD_FIELDS = ("instruction", "output", "generator", "dataset")

# Corruptions whose answer is known to be worse than the reference answer (see check_judge).
CHECK_KINDS = ("truncated", "shuffled", "other_instruction")
TRUNCATE_SHARE = 0.3

# A probability of exactly 0 has no logarithm; this one is as good as zero after exp().
_MIN_LOGPROB = -1e4
_TIE_TOLERANCE = 1e-9

# Prompts judged by our completion functions, per function name (tests count re-judging with it).
JUDGE_CALLS: Counter[str] = Counter()

LC_GLMS = ("auto", "length_controlled_v1", "length_controlled_minimal")
LC_NOTES = {
    "length_controlled_v1": (
        "alpaca_eval's length-controlled GLM (length_controlled_v1) is fit together with annotations "
        "of gpt4_1106_preview by weighted_alpaca_eval_gpt4_turbo; it is comparable to the leaderboard "
        "only with that reference and judge"),
    "length_controlled_minimal": (
        "alpaca_eval's length_controlled_minimal GLM (a length term and the model's strength; no "
        "instruction difficulty, no regularization towards gamed baselines), fit on this model's "
        "annotations alone: it removes this judge's length preference between this model and the "
        "reference, but is not comparable with leaderboard LC numbers or with length_controlled_v1; "
        "its standard error comes from bootstrap refits over instructions"),
}
LC_BOOTSTRAP = 50
"""Refits behind the minimal GLM's standard error (its predictions are one constant per fit, so
the spread of predictions that length_controlled_v1 reports would be 0)."""


JUDGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class JudgeError(ValueError):
    """A judge cannot be set up: unknown config, missing judge model or credentials."""


# --------------------------------------------------------------------------- instruction sets


@dataclass(frozen=True)
class InstructionSet:
    """A reproducible subset of the AlpacaEval instructions and the reference's answers to it.

    Attributes:
        instructions: ``{"instruction", "dataset", "index"}`` per item, ``index`` being the
            position in the full AlpacaEval set (every AlpacaEval file has the same order).
        reference: the reference model's AlpacaEval records for the same items, same order.
        reference_name: a key of :data:`REFERENCES`, or the file's stem for another file.
        reference_path: the file the reference records were read from.
        subset_size: the size asked for (None: all).
        seed: the seed that drew the subset.
        source: where the reference file came from (:attr:`evals.sources.ReferenceFile.origin`):
            ``{"kind": "local", "path"}`` or ``{"kind": "hub", "repo_id", "filename", "revision",
            "commit"}``.
    """

    instructions: list[dict[str, Any]]
    reference: list[dict[str, Any]]
    reference_name: str
    reference_path: str
    subset_size: int | None
    seed: int
    source: dict[str, Any] = field(default_factory=lambda: {"kind": "local"})

    @property
    def indices(self) -> list[int]:
        return [r["index"] for r in self.instructions]

    def select(self, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The records of another AlpacaEval outputs file for this set's instructions, in order.

        Raises:
            ValueError: when ``records`` lacks one of the instructions.
        """
        by_instruction = {r["instruction"]: r for r in records}
        missing = [r["instruction"] for r in self.instructions if r["instruction"] not in by_instruction]
        if missing:
            raise ValueError(f"{len(missing)} instruction(s) of the set have no record, e.g. {missing[0][:80]!r}")
        return [by_instruction[r["instruction"]] for r in self.instructions]

    def provenance(self) -> dict[str, Any]:
        """What the set is, with the reference file identified by content and by origin:
        ``reference_source`` is ``local`` or ``hub``; a hub file adds ``reference_hub``
        (repo, filename, revision asked for and the snapshot commit, when known)."""
        hub = None
        if self.source.get("kind") == "hub":
            hub = {k: self.source.get(k) for k in ("repo_id", "filename", "revision", "commit")}
        return {
            "reference": self.reference_name,
            "reference_sha256": content_digest(self.reference_path),
            "reference_source": self.source.get("kind", "local"),
            "reference_hub": hub,
            "subset_size": self.subset_size,
            "subset_seed": self.seed,
            "n_instructions": len(self.instructions),
            "indices_digest": settings_digest(self.indices),
        }


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """AlpacaEval records from a JSON list, checked for the fields scoring needs."""
    records = json.loads(read_text(path))
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of AlpacaEval records")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("instruction"), str) or not isinstance(r.get("output"), str):
            raise ValueError(f"{path}: record {i} lacks a string 'instruction' or 'output'")
    return records


def load_instruction_set(
    data_dir: str | Path | None, reference: str = "text_davinci_003", subset_size: int | None = None, seed: int = 0,
    *, source: sources.Source = "local", hub_revision: str | None = None,
) -> InstructionSet:
    """A seeded subset of the AlpacaEval instructions with the reference's answers to them.

    Args:
        data_dir: the shared data directory or its ``alpaca_eval/`` folder (may be None or
            missing when the reference comes from the hub).
        reference: ``text_davinci_003`` (AlpacaEval 1), ``gpt4_turbo`` (AlpacaEval 2), a path to
            another AlpacaEval outputs JSON, or the name of one in ``model_outputs/``.
        subset_size: how many instructions; None (or at least the set's size) keeps all.
        seed: draws the subset; the same seed gives the same subset whatever the reference and
            wherever it was read from, because every AlpacaEval file lists the instructions in
            the same order.
        source: ``local``, ``hub`` (the Hugging Face dataset tatsu-lab/alpaca_eval) or ``auto``
            (local when ``data_dir`` has the file, else the hub); see :mod:`evals.sources`.
        hub_revision: the hub dataset's revision (None: main).

    Returns:
        The subset, in the set's original order.

    Raises:
        evals.sources.SourceError: the reference file can be had from neither place.
    """
    resolved = sources.resolve_reference(data_dir, reference, source, hub_revision)
    name, path = resolved.name, resolved.path
    records = read_records(path)
    if len({r["instruction"] for r in records}) != len(records):
        raise ValueError(f"{path}: instructions are not unique")
    if subset_size is not None and subset_size < 1:
        raise ValueError(f"subset_size must be at least 1, got {subset_size}")
    indices = list(range(len(records)))
    if subset_size is not None and subset_size < len(records):
        indices = sorted(random.Random(seed).sample(indices, subset_size))
    instructions = [
        {"instruction": records[i]["instruction"], "dataset": records[i].get("dataset", ""), "index": i} for i in indices
    ]
    reference_records = [{k: records[i].get(k, "") for k in RECORD_FIELDS} for i in indices]
    return InstructionSet(instructions, reference_records, name, str(path), subset_size, seed, dict(resolved.origin))


# --------------------------------------------------------------------------- answers


def generate_answers(
    engine: Engine,
    instructions: Sequence[dict[str, Any]],
    *,
    generator: str,
    system_prompt: str | None,
    max_new_tokens: int,
    seed: int,
    temperature: float = 0.0,
) -> list[dict[str, Any]]:
    """The evaluated model's answers, as AlpacaEval records.

    Args:
        engine: the project's generation engine holding the evaluated model.
        instructions: items with ``instruction`` (and ``dataset``), e.g. ``InstructionSet.instructions``.
        generator: the model's name in the records (AlpacaEval's ``generator``).
        system_prompt: the system turn, e.g. the fine-tuning tag the model was trained with; None
            for no system turn.
        max_new_tokens: the answer length limit.
        seed: sampling seed (greedy decoding, the default, does not use it).
        temperature: 0 for greedy decoding.

    Returns:
        ``{"instruction", "output", "generator", "dataset"}`` per instruction, in order.
    """
    chats = [forward_messages(r["instruction"], system_prompt) for r in instructions]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    completions = engine.generate(chats, params)
    return [
        {"instruction": r["instruction"], "output": c.text, "generator": generator, "dataset": r.get("dataset", "")}
        for r, c in zip(instructions, completions)
    ]


# --------------------------------------------------------------------------- judges


def _logprob_completion(choices: Sequence[str], probs: Sequence[float]) -> dict[str, Any]:
    """One completion in the OpenAI chat format with logprobs, which alpaca_eval's
    ``logprob_parser`` reads: the chosen token and the log-probability of each choice."""
    logprobs = [math.log(p) if p > 0 else _MIN_LOGPROB for p in probs]
    best = max(range(len(choices)), key=lambda i: probs[i])
    top = [{"token": c, "logprob": lp} for c, lp in zip(choices, logprobs)]
    return {
        "text": choices[best],
        "logprobs": {"content": [{"token": choices[best], "logprob": logprobs[best], "top_logprobs": top}]},
        "choice_probs": [float(p) for p in probs],
        "choice_mass": float(sum(probs)),
    }


def _completions_result(completions_all: list[dict[str, Any]], seconds: float) -> dict[str, list]:
    n = max(1, len(completions_all))
    return {
        "completions": [c["text"] for c in completions_all],
        "completions_all": completions_all,
        "price_per_example": [0.0] * len(completions_all),
        "time_per_example": [seconds / n] * len(completions_all),
    }


def engine_choice_completions(
    prompts: Sequence[str], *, judge: "Judge", choices: Sequence[str] = ("m", "M"), prefix: str = "", **_: Any
) -> dict[str, list]:
    """alpaca_eval completion function of the local judge: one forward pass per prompt.

    Each prompt is alpaca_eval's rendered template in ChatML; it becomes a chat for our engine,
    which renders it with the judge model's own chat template and returns the probability of
    each choice as the first token of the answer.
    """
    start = time.perf_counter()
    chats = [ae_utils.prompt_to_chatml(p) for p in prompts]
    chats = [[{"role": m["role"], "content": m["content"]} for m in chat] for chat in chats]
    probs = judge.get_engine().choice_probs(chats, prefix, list(choices)) if chats else []
    JUDGE_CALLS["humpback_engine_choice_completions"] += len(prompts)
    return _completions_result([_logprob_completion(choices, p) for p in probs], time.perf_counter() - start)


_FAKE_OUTPUTS = re.compile(r"<output_m>\n(.*)\n</output_m>\n<output_M>\n(.*)\n</output_M>", re.DOTALL)


def longest_completions(
    prompts: Sequence[str], *, choices: Sequence[str] = ("m", "M"), judge: "Judge | None" = None, **_: Any
) -> dict[str, list]:
    """alpaca_eval completion function of the fake judge: certain of the longer output (in
    characters), and of the first one on a tie. Reads both outputs back from its template."""
    start = time.perf_counter()
    out = []
    for prompt in prompts:
        match = _FAKE_OUTPUTS.search(prompt)
        if match is None:
            raise ValueError("prompt does not follow the humpback_longest_fake template")
        first, second = match.groups()
        out.append(_logprob_completion(choices, [1.0, 0.0] if len(first) >= len(second) else [0.0, 1.0]))
    JUDGE_CALLS["humpback_longest_completions"] += len(prompts)
    return _completions_result(out, time.perf_counter() - start)


COMPLETION_FNS: dict[str, Callable[..., dict[str, list]]] = {
    "humpback_engine_choice_completions": engine_choice_completions,
    "humpback_longest_completions": longest_completions,
}
ENGINE_FNS = frozenset({"humpback_engine_choice_completions"})


class HarnessSinglePairwiseAnnotator(SinglePairwiseAnnotator):
    """alpaca_eval's single pairwise annotator, which also knows our completion functions."""

    def __init__(self, *args: Any, fn_completions: str | Callable = "openai_completions",
                 judge: "Judge | None" = None, **kwargs: Any):
        if isinstance(fn_completions, str) and fn_completions in COMPLETION_FNS:
            fn_completions = functools.partial(COMPLETION_FNS[fn_completions], judge=judge)
        super().__init__(*args, fn_completions=fn_completions, **kwargs)


class HarnessPairwiseAnnotator(PairwiseAnnotator):
    """alpaca_eval's ``PairwiseAnnotator`` (JSON caching included) with our single annotator."""

    @property
    def SingleAnnotator(self):  # noqa: N802 (alpaca_eval's name)
        return HarnessSinglePairwiseAnnotator

    def load_(self, path: Any = None) -> None:
        """Read the cache with preferences as floats: ``pd.read_json`` makes a column of only 1.0
        and 2.0 integers, and pandas 3 then refuses alpaca_eval's assignment of 1.5 to it."""
        super().load_(path)
        if self.df_annotations is not None and self.annotation_key in self.df_annotations.columns:
            self.df_annotations[self.annotation_key] = self.df_annotations[self.annotation_key].astype(float)


@functools.lru_cache(maxsize=8)
def _weights_digest(resolved: str) -> str:
    path = Path(resolved)
    if not path.is_dir():
        return resolved  # a hub id: its name is all we know offline
    return model_dir_digest(path)


@dataclass
class Judge:
    """An alpaca_eval annotator config and, for the local judges, the model behind it.

    Attributes:
        annotators_config: a config name in ``evals/annotators/`` (ours), a config name that
            alpaca_eval ships (e.g. ``weighted_alpaca_eval_gpt4_turbo``), or a path to a config
            directory or ``configs.yaml``.
        model: the judge model for local configs: a directory, ``.gguf`` file or
            ``pkg:<distribution>/<file>`` (see :func:`pipeline.models.resolve_base`).
        batch_size: forward-pass batch size of the judge engine.
        device: where the judge model runs (``cpu``, ``cuda``, ``cuda:N``).
        dtype: the judge model's weights, ``float32`` (default: judgments do not move with the
            hardware's preferred dtype) or ``bfloat16`` (half the memory; part of :meth:`identity`,
            so its judgments are cached apart).
        engine: an engine already built, used instead of loading ``model``.
    """

    annotators_config: str = LOCAL_JUDGE
    model: str | None = None
    batch_size: int = 4
    device: str = "cpu"
    dtype: str = "float32"
    engine: Engine | None = None
    _resolved: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.dtype not in JUDGE_DTYPES:
            raise JudgeError(f"judge dtype {self.dtype!r}: choose from {sorted(JUDGE_DTYPES)}")

    @property
    def config_path(self) -> Path:
        """The config's ``configs.yaml``."""
        spec = Path(self.annotators_config)
        candidates = [spec] if spec.exists() else []
        candidates += [ANNOTATORS_DIR / self.annotators_config, ae_constants.EVALUATORS_CONFIG_DIR / self.annotators_config]
        for path in candidates:
            if path.is_dir() and (path / "configs.yaml").is_file():
                return path / "configs.yaml"
            if path.is_file() and path.suffix in (".yaml", ".yml"):
                return path
        ours = sorted(p.name for p in ANNOTATORS_DIR.iterdir() if (p / "configs.yaml").is_file())
        raise JudgeError(
            f"annotator config {self.annotators_config!r} not found: not a path, not one of ours {ours}, "
            f"and not in alpaca_eval's {ae_constants.EVALUATORS_CONFIG_DIR}"
        )

    @property
    def name(self) -> str:
        return self.config_path.parent.name

    def configs(self) -> dict[str, dict[str, Any]]:
        return ae_utils.load_configs(self.config_path)

    def needs_engine(self) -> bool:
        return any(c.get("fn_completions") in ENGINE_FNS for c in self.configs().values())

    def resolved_model(self) -> str:
        if self._resolved is None:
            if self.model is None:
                raise JudgeError(f"annotator config {self.name!r} judges with a local model: pass the judge model path")
            self._resolved = resolve_base(self.model)
        return self._resolved

    def get_engine(self) -> Engine:
        """The judge engine, loaded on first use (a rerun that finds every judgment cached never loads it)."""
        if self.engine is None:
            path = self.resolved_model()
            log.info("loading judge model %s", path)
            model = load_model(path, dtype=JUDGE_DTYPES[self.dtype]).to(self.device)
            self.engine = TransformersEngine(model, load_tokenizer(path), batch_size=self.batch_size)
        return self.engine

    def config_digest(self) -> str:
        """Digest of ``configs.yaml`` and every prompt template it names."""
        path = self.config_path
        files = {"configs.yaml": file_digest(path)}
        for name, cfg in self.configs().items():
            template = cfg.get("prompt_template")
            if isinstance(template, str):
                template_path = path.parents[1] / template
                if template_path.is_file():
                    files[f"{name}:{template}"] = file_digest(template_path)
        return settings_digest(files)

    def model_digest(self) -> str | None:
        if not self.needs_engine():
            return None
        if self.model is None and self.engine is not None:
            return f"engine:{getattr(getattr(self.engine, 'model', None), 'name_or_path', 'unknown')}"
        return _weights_digest(self.resolved_model())

    def provenance(self) -> dict[str, Any]:
        return {
            "annotators_config": self.name,
            "annotators_config_path": str(self.config_path),
            "annotators_config_digest": self.config_digest(),
            "judge_model": self.model,
            "judge_model_digest": self.model_digest(),
            "judge_dtype": self.dtype if self.needs_engine() else None,
            "alpaca_eval_version": alpaca_eval.__version__,
        }

    def identity(self) -> str:
        """What a cached judgment depends on: the config's files and the judge's weights."""
        what = {"config": self.config_digest(), "model": self.model_digest()}
        if self.dtype != "float32":  # absent at the default: judgments cached before keep their key
            what["dtype"] = self.dtype
        return settings_digest(what)[:12]

    def check_credentials(self) -> None:
        """Fail before any work when a config calls the OpenAI API without a key."""
        uses_openai = any(c.get("fn_completions") == "openai_completions" for c in self.configs().values())
        have_key = any(os.environ.get(k) for k in ("OPENAI_API_KEY", "OPENAI_API_KEYS", "OPENAI_CLIENT_CONFIG_PATH"))
        if uses_openai and not have_key:
            raise JudgeError(f"annotator config {self.name!r} calls the OpenAI API: set OPENAI_API_KEY")

    def annotator(self, caching_path: Path | None, **kwargs: Any) -> HarnessPairwiseAnnotator:
        """alpaca_eval's pairwise annotator for this judge, caching every judgment at ``caching_path``."""
        self.check_credentials()
        if self.needs_engine() and self.engine is None:
            self.resolved_model()  # a missing judge model fails here, not in the middle of a run
        return HarnessPairwiseAnnotator(
            annotators_config=str(self.config_path),
            caching_path=str(caching_path) if caching_path is not None else None,
            judge=self,
            **kwargs,
        )


def _cache_path(out_dir: Path, judge: Judge, kind: str) -> Path:
    # One cache file per judge identity: a changed prompt or judge model never reuses old judgments.
    path = out_dir / "judge_cache" / f"{kind}-{judge.name}-{judge.identity()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _cached_keys(annotator: PairwiseAnnotator) -> set[tuple[str, str, str]]:
    cached = annotator.df_annotations
    if cached is None or cached.empty:
        return set()
    return set(zip(cached["instruction"], cached["output_1"], cached["output_2"]))


# --------------------------------------------------------------------------- scoring


def _check_outputs(model_outputs: Sequence[dict[str, Any]], reference_outputs: Sequence[dict[str, Any]]) -> None:
    model_instructions = [r["instruction"] for r in model_outputs]
    reference_instructions = [r["instruction"] for r in reference_outputs]
    if len(set(model_instructions)) != len(model_instructions):
        raise ValueError("model outputs repeat an instruction")
    if set(model_instructions) != set(reference_instructions):
        missing = set(reference_instructions) - set(model_instructions)
        extra = set(model_instructions) - set(reference_instructions)
        raise ValueError(f"model and reference outputs differ: {len(missing)} instruction(s) without a model "
                         f"output, {len(extra)} not in the reference")


def _number(value: Any, digits: int = 6) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else round(value, digits)


def win_rate_metrics(annotations: pd.DataFrame | Sequence[dict[str, Any]]) -> dict[str, Any]:
    """alpaca_eval's ``get_winrate`` on preferences (1: reference wins, 2: model wins, 1.5 or 0:
    draw), as plain numbers: win rates in percent, counts, and ``n`` judged pairs."""
    raw = ae_metrics.get_winrate(ae_utils.convert_to_dataframe(annotations))
    return {
        "win_rate": _number(raw["win_rate"]),
        "standard_error": _number(raw["standard_error"]),
        "discrete_win_rate": _number(raw["discrete_win_rate"]),
        "n_wins": int(raw["n_wins"]),
        "n_wins_base": int(raw["n_wins_base"]),
        "n_draws": int(raw["n_draws"]),
        "n": int(raw["n_total"]),
    }


@contextlib.contextmanager
def _hub_files_offline(lc_data_dir: str | Path | None, allow_download: bool = False):
    """While active, alpaca_eval's GLM reads its hub files (``df_gamed.csv``,
    ``instruction_difficulty.csv`` of the dataset ``tatsu-lab/alpaca_eval``) from ``lc_data_dir``
    or the local hub cache, and never from the network; a missing file raises FileNotFoundError."""
    import alpaca_eval.metrics.glm_winrate as glm
    from huggingface_hub import try_to_load_from_cache

    def local_only(repo_id: str, filename: str, repo_type: str | None = None, **_: Any) -> str:
        if lc_data_dir is not None and (Path(lc_data_dir) / filename).is_file():
            return str(Path(lc_data_dir) / filename)
        cached = try_to_load_from_cache(repo_id, filename, repo_type=repo_type)
        if isinstance(cached, str):
            return cached
        if allow_download:
            return original(repo_id=repo_id, filename=filename, repo_type=repo_type)
        raise FileNotFoundError(
            f"{filename} of the {repo_type} {repo_id} (Hugging Face hub) is needed by alpaca_eval's "
            f"length-controlled GLM and is not available offline: put it in lc_data_dir"
        )

    original = glm.hf_hub_download
    glm.hf_hub_download = local_only
    try:
        yield
    finally:
        glm.hf_hub_download = original


def length_controlled_metrics(
    annotations: pd.DataFrame, indices: Sequence[int] | None, lc_data_dir: str | Path | None = None,
    allow_download: bool = False, glm: str = "auto", bootstrap: int = LC_BOOTSTRAP, seed: int = 0,
) -> dict[str, Any]:
    """alpaca_eval's length-controlled win rate, or None with the reason it cannot be had.

    Args:
        annotations: alpaca_eval's annotations (``preference``, ``output_1``, ``output_2``,
            ``generator_1``, ``generator_2``), one row per instruction.
        indices: each row's position in the full AlpacaEval set; length_controlled_v1 looks up
            each instruction's difficulty by it.
        lc_data_dir: a directory holding length_controlled_v1's hub files, if not in the hub cache.
        allow_download: fetch those files from the hub when neither place has them.
        glm: ``length_controlled_v1`` (alpaca_eval 2's, needs its hub files),
            ``length_controlled_minimal`` (needs nothing but the annotations), or ``auto``: v1
            where its files can be had, else minimal, with the reason v1 was not used.
        bootstrap: refits behind the minimal GLM's standard error.
        seed: draws the bootstrap samples.

    Returns:
        ``length_controlled_win_rate``, ``lc_standard_error`` (percent), ``lc_glm`` (the GLM
        used), ``lc_unavailable_reason`` (why there is no value, or why v1 was not used).
    """
    if glm not in LC_GLMS:
        raise ValueError(f"unknown length-controlled GLM {glm!r}; one of {', '.join(LC_GLMS)}")
    none = {"length_controlled_win_rate": None, "lc_standard_error": None, "lc_glm": None}
    df = annotations.copy()
    if indices is not None:
        df.index = pd.Index(list(indices))
    df = df[df["preference"].notna()]
    v1_reason = None
    if glm in ("auto", "length_controlled_v1"):
        if indices is None:
            v1_reason = "AlpacaEval indices of the instructions are unknown"
        else:
            try:
                with _hub_files_offline(lc_data_dir, allow_download), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    raw = ae_metrics.get_length_controlled_winrate(
                        df, save_weights_dir=None, is_add_glm_preference_inplace=False)
                return {
                    "length_controlled_win_rate": _number(raw["length_controlled_winrate"]),
                    "lc_standard_error": _number(raw.get("lc_standard_error")),
                    "lc_glm": "length_controlled_v1",
                    "lc_unavailable_reason": None,
                }
            except FileNotFoundError as exc:
                v1_reason = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # alpaca_eval raises anything from sklearn's errors on tiny sets
                return {**none, "lc_unavailable_reason": f"{type(exc).__name__}: {exc}"}
        if glm == "length_controlled_v1":
            return {**none, "lc_unavailable_reason": v1_reason}
    try:
        value, stderr = _minimal_lc(df, bootstrap, seed)
    except Exception as exc:  # sklearn on too few or degenerate annotations
        reason = f"length_controlled_minimal: {type(exc).__name__}: {exc}"
        return {**none, "lc_unavailable_reason": "; ".join(r for r in (v1_reason, reason) if r)}
    return {
        "length_controlled_win_rate": _number(value),
        "lc_standard_error": _number(stderr),
        "lc_glm": "length_controlled_minimal",
        "lc_unavailable_reason": None if v1_reason is None else f"length_controlled_v1 not used: {v1_reason}",
    }


@contextlib.contextmanager
def _c_output_silenced():
    """liblinear writes a warning straight to the process's stderr for every fold in which a hard
    0/1 preference leaves one class without weight; those lines say nothing about the result.
    (Python-level errors still raise as exceptions.)"""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _minimal_lc(df: pd.DataFrame, bootstrap: int, seed: int) -> tuple[float, float | None]:
    """alpaca_eval's ``length_controlled_minimal`` GLM on these annotations, fit by alpaca_eval's
    own design-matrix and cross-validated logistic-regression helpers, and predicted at zero
    length difference; its standard error is the spread of ``bootstrap`` refits on instructions
    drawn with replacement."""
    import numpy as np
    from alpaca_eval.metrics import glm_winrate as ae_glm

    info = ae_glm.GLM_INFO["length_controlled_minimal"]
    n_splits = info["kwargs"].get("n_splits", 5)
    if len(df) < n_splits:
        raise ValueError(f"{len(df)} judged pairs; the GLM's {n_splits}-fold cross-validation needs at least {n_splits}")
    # Same features as alpaca_eval's _get_featurized_data, without its hub-only difficulty column.
    delta = (df["output_1"].str.len() - df["output_2"].str.len()).astype(float).to_numpy()
    pref = (df["preference"].astype(float).replace({0.0: 1.5}) - 1).to_numpy()

    def fit(rows) -> float:
        d = delta[rows]
        spread = d.std(ddof=1)
        train = pd.DataFrame({"preference": pref[rows], "std_delta_len": d / spread if spread > 0 else 0.0,
                              "not_gamed_baseline": True})
        test = pd.DataFrame({"std_delta_len": [0.0], "not_gamed_baseline": [True]})
        xy, x_test = ae_glm.make_dmatrix_for_model(train, test, formula=info["formula"])
        with warnings.catch_warnings(), _c_output_silenced():
            warnings.simplefilter("ignore")
            model = ae_glm.fit_LogisticRegressionCV(xy, "preference", is_ytrue_proba=True, **info["kwargs"])
        return float(model.predict_proba(x_test)[0, 1]) * 100

    everything = np.arange(len(df))
    value = fit(everything)
    rng = np.random.default_rng(seed)
    refits = []
    for _ in range(bootstrap):
        rows = rng.choice(everything, size=len(everything), replace=True)
        try:
            refits.append(fit(rows))
        except ValueError:  # a draw with too few distinct rows for the folds
            continue
    stderr = float(np.std(refits, ddof=1)) if len(refits) >= 2 else None
    return value, stderr


def _records(outputs: Sequence[dict[str, Any]], default_generator: str) -> pd.DataFrame:
    df = pd.DataFrame([{k: r.get(k, "") for k in RECORD_FIELDS} for r in outputs])
    df["generator"] = df["generator"].replace("", default_generator)
    return df


def score_alpaca_eval(
    model_outputs: Sequence[dict[str, Any]] | str | Path,
    reference_outputs: InstructionSet | Sequence[dict[str, Any]] | str | Path,
    out_dir: str | Path,
    *,
    annotators_config: str = LOCAL_JUDGE,
    judge_model: str | None = None,
    judge: Judge | None = None,
    lc_data_dir: str | Path | None = None,
    chunksize: int = 32,
    cache_dir: str | Path | None = None,
    lc_download: bool = False,
    lc_glm: str = "auto",
) -> dict[str, Any]:
    """Judge the model's outputs against the reference's with alpaca_eval and score them.

    Every judgment is cached in ``out_dir/judge_cache/`` (one file per judge identity, through
    alpaca_eval's ``caching_path``), written after every ``chunksize`` pairs: a rerun, or an
    interrupted run resumed, judges only what is not there yet.

    Args:
        model_outputs: AlpacaEval records of the evaluated model, or a JSON file of them.
        reference_outputs: an :class:`InstructionSet` (its provenance is recorded), records, or a
            JSON file; the same instructions as ``model_outputs``.
        out_dir: where the cache, ``annotations.json`` and ``alpaca_eval.json`` go.
        annotators_config: the judge config (see :class:`Judge`); the local judge by default.
        judge_model: the judge model for local configs.
        judge: a :class:`Judge` already set up (its engine is reused); overrides the two above.
        lc_data_dir: where alpaca_eval's length-controlled GLM files are, if not in the hub cache.
        chunksize: pairs judged between two writes of the cache.
        lc_download: let alpaca_eval fetch its length-controlled GLM files from the hub.
        lc_glm: which length-controlled GLM (see :func:`length_controlled_metrics`).
        cache_dir: where the judge cache lives, if not in ``out_dir`` (a run keeps one cache for
            all its evaluations, so re-evaluating a model re-judges nothing already judged).

    Returns:
        ``win_rate`` and ``standard_error`` (percent), ``discrete_win_rate``, counts, ``n``,
        ``length_controlled_win_rate``, ``lc_standard_error`` and ``lc_glm`` (or None and
        ``lc_unavailable_reason``), ``judged_now``, ``reused_from_cache`` and ``provenance``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    judge = judge or Judge(annotators_config, judge_model)
    instruction_set = reference_outputs if isinstance(reference_outputs, InstructionSet) else None
    if instruction_set is not None:
        reference_records = instruction_set.reference
    elif isinstance(reference_outputs, (str, Path)):
        reference_records = read_records(reference_outputs)
    else:
        reference_records = list(reference_outputs)
    model_records = read_records(model_outputs) if isinstance(model_outputs, (str, Path)) else list(model_outputs)
    _check_outputs(model_records, reference_records)
    reference_df = _records(reference_records, "reference")
    model_df = _records(model_records, "model")

    annotator = judge.annotator(_cache_path(Path(cache_dir) if cache_dir else out_dir, judge, "score"))
    cached = _cached_keys(annotator)
    pairs = pd.merge(reference_df, model_df, on="instruction", suffixes=("_1", "_2"))
    reused = sum((i, o1, o2) in cached for i, o1, o2 in zip(pairs["instruction"], pairs["output_1"], pairs["output_2"]))
    start = time.perf_counter()
    annotations = pd.DataFrame(annotator.annotate_head2head(outputs_1=reference_df, outputs_2=model_df, chunksize=chunksize))
    seconds = time.perf_counter() - start

    result: dict[str, Any] = win_rate_metrics(annotations)
    result["n_missing"] = int(annotations["preference"].isna().sum())
    order = {r["instruction"]: i for i, r in enumerate(reference_records)}
    annotations = annotations.sort_values("instruction", key=lambda s: s.map(order)).reset_index(drop=True)
    if instruction_set is not None:
        indices = instruction_set.indices
    elif len(reference_records) == 805:
        indices = list(range(805))  # the full set, in AlpacaEval's order
    else:
        indices = None
    result.update(length_controlled_metrics(annotations, indices, lc_data_dir, lc_download, lc_glm))
    result.update(
        avg_length=int(model_df["output"].str.len().mean()) if len(model_df) else 0,
        judged_now=len(pairs) - reused,
        reused_from_cache=reused,
        seconds=round(seconds, 3),
    )
    generators = sorted(set(model_df["generator"]))
    result["provenance"] = {
        **judge.provenance(),
        **(instruction_set.provenance() if instruction_set is not None else
           {"reference": sorted(set(reference_df["generator"])), "subset_size": None, "subset_seed": None,
            "n_instructions": len(reference_records)}),
        "generator": generators[0] if len(generators) == 1 else generators,
        "model_outputs_digest": settings_digest(model_records),
        "caching_path": str(annotator.caching_path),
        "lc_note": LC_NOTES.get(result.get("lc_glm") or "", None),
    }
    annotations.to_json(out_dir / "annotations.json", orient="records", indent=2)
    write_json_atomic(out_dir / "alpaca_eval.json", result)
    return result


# --------------------------------------------------------------------------- judge check


def _truncate(text: str, share: float = TRUNCATE_SHARE) -> str:
    """The text up to the end of its first ``share`` of words (at least one), formatting kept."""
    spans = [m.end() for m in re.finditer(r"\S+", text)]
    keep = max(1, math.ceil(len(spans) * share))
    return text[: spans[keep - 1]]


def _shuffle_words(text: str, rng: random.Random) -> str:
    words = text.split()
    for _ in range(10):
        shuffled = words[:]
        rng.shuffle(shuffled)
        if shuffled != words:
            break
    return " ".join(shuffled)


def _corrupt(kind: str, record: dict[str, Any], pool: Sequence[dict[str, Any]], rng: random.Random) -> str:
    if kind == "truncated":
        return _truncate(record["output"])
    if kind == "shuffled":
        return _shuffle_words(record["output"], rng)
    if kind == "other_instruction":
        others = [r for r in pool if r["instruction"] != record["instruction"] and r["output"] != record["output"]]
        return rng.choice(others)["output"]
    raise ValueError(f"unknown corruption {kind!r}; known: {CHECK_KINDS}")


def _decision(p: float) -> float:
    """1 if p favours, 0.5 on a tie, 0 otherwise."""
    return 0.5 if abs(p - 0.5) <= _TIE_TOLERANCE else float(p > 0.5)


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None


def _check_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    judged = [r for r in rows if r["p_first"] is not None]
    by_pair: dict[int, list[dict[str, Any]]] = {}
    for r in judged:
        by_pair.setdefault(r["pair"], []).append(r)
    both = [v for v in by_pair.values() if len(v) == 2]
    consistent = [float(a["correct"] == b["correct"] and a["correct"] != 0.5) for a, b in both]
    return {
        "accuracy": _mean([r["correct"] for r in judged]),
        "mean_p_correct": _mean([r["p_correct"] for r in judged]),
        "position_bias": None if not judged else round(_mean([_decision(r["p_first"]) for r in judged]) - 0.5, 6),
        "mean_p_first_minus_half": None if not judged else round(_mean([r["p_first"] for r in judged]) - 0.5, 6),
        "order_consistency": _mean(consistent),
        "n_pairs": len(by_pair),
        "n_judgments": len(judged),
        "n_missing": len(rows) - len(judged),
    }


def check_judge(
    judge: Judge,
    reference_records: Sequence[dict[str, Any]],
    n: int = 20,
    seed: int = 0,
    *,
    min_accuracy: float = 0.75,
    kinds: Sequence[str] = CHECK_KINDS,
    out_dir: str | Path | None = None,
    min_words: int = 8,
) -> dict[str, Any]:
    """Measure a judge on pairs whose better answer is known, before trusting its win rates.

    For ``n`` reference records (drawn with ``seed`` among those of at least ``min_words``
    words), the real answer is paired with each corruption in ``kinds``: ``truncated`` (its first
    30% of words), ``shuffled`` (its words in random order; nearly the same length) and
    ``other_instruction`` (the answer of another instruction). Each pair is judged in both
    orders, with alpaca_eval's own order randomization off, through the same annotator that
    scoring uses.

    Definitions, over all judgments (a pair in one order): a judgment is correct (1) when it gives
    the real answer more than half the probability, a tie (0.5) when exactly half, wrong (0)
    otherwise. ``accuracy`` is the mean of that; ``mean_p_correct`` the mean probability given to
    the real answer. ``position_bias`` is the share of judgments that pick the first shown
    output (ties count half) minus 0.5: 0 is unbiased, +0.5 always picks the first, -0.5 always
    the second; since the real answer is first in exactly half the judgments, a perfect judge has
    0. ``order_consistency`` is the share of pairs on which both orders pick the same answer.

    Args:
        judge: the judge to check.
        reference_records: AlpacaEval records whose answers are taken as the good ones.
        n: how many reference records.
        seed: draws the records and the corruptions.
        min_accuracy: ``trusted`` is ``accuracy >= min_accuracy``.
        kinds: which corruptions.
        out_dir: caches the judgments there (``judge_cache/``); None: no cache.
        min_words: records with fewer words are not drawn (too short to corrupt).

    Returns:
        The numbers above overall and ``by_kind``, ``trusted``, ``seconds_per_judgment``, and the
        judge's provenance.
    """
    rng = random.Random(seed)
    pool = [r for r in reference_records if len(r["output"].split()) >= min_words]
    chosen = rng.sample(pool, min(n, len(pool)))
    rows: list[dict[str, Any]] = []
    for record in chosen:
        for kind in kinds:
            bad = _corrupt(kind, record, reference_records, rng)
            if bad == record["output"]:
                continue
            pair = len(rows) // 2
            for good_first in (True, False):
                first, second = (record["output"], bad) if good_first else (bad, record["output"])
                rows.append({"pair": pair, "kind": kind, "good_first": good_first,
                             "instruction": record["instruction"], "output_1": first, "output_2": second})

    caching_path = _cache_path(Path(out_dir), judge, "check") if out_dir is not None else None
    annotator = judge.annotator(caching_path, is_randomize_output_order=False)
    cached = _cached_keys(annotator)
    judged_now = len({(r["instruction"], r["output_1"], r["output_2"]) for r in rows} - cached)
    start = time.perf_counter()
    annotated = annotator.annotate_pairs(pd.DataFrame(rows)[["instruction", "output_1", "output_2"]]) if rows else []
    seconds = time.perf_counter() - start

    preference = {(a["instruction"], a["output_1"], a["output_2"]): a.get("preference") for a in annotated}
    masses = [a["preference_raw_completion"].get("choice_mass") for a in annotated
              if isinstance(a.get("preference_raw_completion"), dict)]
    for r in rows:
        pref = preference.get((r["instruction"], r["output_1"], r["output_2"]))
        if pref is None or (isinstance(pref, float) and math.isnan(pref)):
            r.update(p_first=None, p_correct=None, correct=None)
            continue
        p_first = 2.0 - float(pref)  # alpaca_eval: 1 means output_1 preferred, 2 output_2
        p_correct = p_first if r["good_first"] else 1.0 - p_first
        r.update(p_first=p_first, p_correct=p_correct, correct=_decision(p_correct))

    summary = _check_summary(rows)
    by_kind = {kind: _check_summary([r for r in rows if r["kind"] == kind]) for kind in kinds}
    return {
        **summary,
        "trusted": summary["accuracy"] is not None and summary["accuracy"] >= min_accuracy,
        "min_accuracy": min_accuracy,
        "by_kind": by_kind,
        "mean_choice_mass": _mean([m for m in masses if m is not None]),
        "judged_now": judged_now,
        "seconds_per_judgment": round(seconds / judged_now, 4) if judged_now else None,
        "seed": seed,
        "n_records": len(chosen),
        "judge": judge.provenance(),
    }
