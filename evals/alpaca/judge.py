"""The AlpacaEval judge: an alpaca_eval annotator config and, for local judges, the model behind it.

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

Caching. Every judgment is cached through alpaca_eval's ``caching_path``, in one file per judge
identity (:meth:`Judge.identity`, see :func:`cache_path`): a changed prompt, judge model or
dtype never reuses old judgments.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from evals.alpaca.library import PairwiseAnnotator, SinglePairwiseAnnotator, ae_constants, ae_utils, alpaca_eval
from pipeline.digests import file_digest, model_dir_digest, settings_digest
from pipeline.engine import Engine, TransformersEngine
from pipeline.io import write_text_atomic
from pipeline.models import load_model, load_tokenizer, resolve_base

log = logging.getLogger(__name__)

ANNOTATORS_DIR = Path(__file__).resolve().parent.parent / "annotators"
"""Our annotator configs (``evals/annotators/``, shipped as package data)."""
LOCAL_JUDGE = "humpback_local_logprob"
FAKE_JUDGE = "humpback_longest_fake"

# A probability of exactly 0 has no logarithm; this one is as good as zero after exp().
_MIN_LOGPROB = -1e4

JUDGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class JudgeError(ValueError):
    """A judge cannot be set up: unknown config, missing judge model or credentials."""


# --------------------------------------------------------------------------- completion functions


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
    return _completions_result(out, time.perf_counter() - start)


RUBRIC_TEMPLATE = "curation_rubric_logprob_v1"
_RUBRIC_TAGS = ("humpback_instruction", "humpback_output_m", "humpback_output_M")


def split_rubric_prompt(prompt: str) -> tuple[str, str, str] | None:
    """Instruction and the two outputs from a ``humpback_local_rubric`` prompt, or None when any
    delimiter line occurs more than once (an output carrying the delimiters cannot be split
    safely, so it is not judged)."""
    parts = []
    rest = prompt
    for tag in _RUBRIC_TAGS:
        opening, closing = f"<{tag}>\n", f"\n</{tag}>"
        if prompt.count(opening) != 1 or prompt.count(closing) != 1:
            return None
        start = rest.find(opening)
        end = rest.find(closing, start)
        if start < 0 or end < 0:
            return None
        parts.append(rest[start + len(opening):end])
        rest = rest[end + len(closing):]
    return parts[0], parts[1], parts[2]


def p_first_better(first: Sequence[float], second: Sequence[float]) -> float:
    """P(X1 > X2) + P(X1 = X2) / 2 for independent scores with these (unnormalized) distributions."""
    a, b = sum(first), sum(second)
    if a <= 0 or b <= 0:
        return 0.5
    p = [x / a for x in first]
    q = [x / b for x in second]
    greater = sum(p[i] * q[j] for i in range(len(p)) for j in range(len(q)) if i > j)
    equal = sum(p[i] * q[i] for i in range(len(p)))
    return greater + equal / 2


def engine_rubric_completions(
    prompts: Sequence[str], *, judge: "Judge", choices: Sequence[str] = ("m", "M"), **_: Any
) -> dict[str, list]:
    """alpaca_eval completion function of the pointwise judge: each output rated on its own
    with the curation rubric (one forward pass per output), the preference from the two score
    distributions (see ``evals/annotators/humpback_local_rubric``)."""
    from pipeline.prompts import render

    start = time.perf_counter()
    split = [split_rubric_prompt(p) for p in prompts]
    chats, where = [], []
    for k, parts in enumerate(split):
        if parts is None:
            continue
        instruction, first, second = parts
        for output in (first, second):
            chats.append([{"role": "user", "content": render(RUBRIC_TEMPLATE, instruction=instruction, response=output)}])
        where.append(k)
    scores = judge.get_engine().choice_probs(chats, "Score:", [f" {s}" for s in "12345"]) if chats else []
    out: list[dict[str, Any]] = [{"text": None, "logprobs": None, "unjudged": "delimiters repeated"}] * len(prompts)
    for n, k in enumerate(where):
        first, second = scores[2 * n], scores[2 * n + 1]
        p = p_first_better(first, second)
        completion = _logprob_completion(choices, [p, 1.0 - p])
        completion["score_probs"] = [[float(x) for x in first], [float(x) for x in second]]
        out[k] = completion
    return _completions_result(out, time.perf_counter() - start)


COMPLETION_FNS: dict[str, Callable[..., dict[str, list]]] = {
    "humpback_engine_choice_completions": engine_choice_completions,
    "humpback_engine_rubric_completions": engine_rubric_completions,
    "humpback_longest_completions": longest_completions,
}
ENGINE_FNS = frozenset({"humpback_engine_choice_completions", "humpback_engine_rubric_completions"})
SYMMETRIC_FNS = frozenset({"humpback_engine_rubric_completions"})
"""Completion functions whose preference for (a, b) is exactly one minus that for (b, a): judging
both orders would only repeat the work."""


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
        and 2.0 integers, and pandas 3 then refuses alpaca_eval's assignment of 1.5 to it.

        A cache that cannot be read (cut short by a crash before caches were written atomically,
        or damaged by hand) is moved aside as ``<name>.unreadable-<time>`` and judging starts from
        an empty cache: the judgments are redone, nothing is lost silently."""
        try:
            super().load_(path)
        except ValueError as err:
            broken = Path(path or self.caching_path)
            aside = broken.with_name(f"{broken.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}")
            os.replace(broken, aside)
            log.warning("judge cache %s cannot be read (%s); moved to %s, judging from an empty cache",
                        broken, str(err)[:200], aside)
            self.df_annotations = None
        if self.df_annotations is not None and self.annotation_key in self.df_annotations.columns:
            self.df_annotations[self.annotation_key] = self.df_annotations[self.annotation_key].astype(float)

    def save(self, path: Any = None) -> None:
        """alpaca_eval's save, written atomically (:func:`pipeline.io.write_text_atomic`), so a crash
        or a full disk mid-write leaves the previous cache whole."""
        path = path or self.caching_path
        if path is None:
            return
        self._refresh_annotations_()
        if not self.is_store_missing_annotations:
            self.df_annotations = self.df_annotations[~self.df_annotations[self.annotation_key].isna()]
        write_text_atomic(Path(path), self.df_annotations.to_json(orient="records", indent=2))


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

    def is_symmetric(self) -> bool:
        """Whether the order in which the outputs are shown cannot change its preference."""
        return all(c.get("fn_completions") in SYMMETRIC_FNS for c in self.configs().values())

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
        """What a cached judgment depends on: the config's files, the judge's weights and their dtype."""
        return settings_digest({"config": self.config_digest(), "model": self.model_digest(), "dtype": self.dtype})[:12]

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


# --------------------------------------------------------------------------- judgment cache


def cache_path(out_dir: Path, judge: Judge, kind: str) -> Path:
    """``out_dir/judge_cache/<kind>-<judge>-<identity>.json``: one cache file per judge identity,
    so a changed prompt or judge model never reuses old judgments."""
    path = out_dir / "judge_cache" / f"{kind}-{judge.name}-{judge.identity()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def cached_keys(annotator: PairwiseAnnotator) -> set[tuple[str, str, str]]:
    """The ``(instruction, output_1, output_2)`` pairs already in the annotator's cache."""
    cached = annotator.df_annotations
    if cached is None or cached.empty:
        return set()
    return set(zip(cached["instruction"], cached["output_1"], cached["output_2"]))

