"""AlpacaEval for this project: answers through our engine, judged and scored by alpaca_eval itself.

The pieces, one module each:

* :mod:`~evals.alpaca.instructions`: :func:`load_instruction_set` picks a seeded, reproducible
  subset of the 805 AlpacaEval instructions together with the reference model's answers to
  exactly those instructions, read from a local folder or the hub dataset
  ``tatsu-lab/alpaca_eval`` (:mod:`evals.sources`);
* :mod:`~evals.alpaca.answers`: :func:`generate_answers` writes the evaluated model's answers
  through the project's engine, as AlpacaEval records (``instruction``, ``output``,
  ``generator``, ``dataset``);
* :mod:`~evals.alpaca.judge`: :class:`Judge`, an alpaca_eval annotator config (ours in
  ``evals/annotators/``, or alpaca_eval's own) with the local judge model behind it, plugged into
  alpaca_eval's ``PairwiseAnnotator`` (:class:`HarnessPairwiseAnnotator`), and the judgment cache;
* :mod:`~evals.alpaca.scoring`: :func:`score_alpaca_eval` has the judge rate every pair (caching
  each judgment on disk, so a rerun re-judges nothing) and alpaca_eval's metrics turn the
  preferences into a win rate and its standard error (:mod:`~evals.alpaca.win_rate`) and a
  length-controlled win rate (:mod:`~evals.alpaca.length_control`: alpaca_eval 2's
  ``length_controlled_v1`` GLM where its hub data can be had, else alpaca_eval's
  ``length_controlled_minimal`` GLM, which needs nothing but the annotations);
* :mod:`~evals.alpaca.judge_check`: :func:`check_judge` measures a judge on pairs whose better
  answer is known, before its win rates are believed.

alpaca_eval itself is imported through :mod:`~evals.alpaca.library`, which keeps its logging and
warnings from leaking into the caller's process.

Offline. Nothing here lets alpaca_eval reach the Hugging Face hub: references, annotator
configs and caching paths are always passed explicitly (its defaults download), ``evaluate`` and
its leaderboards are not used, and the one hub download left on its path (the data of the
length-controlled GLM) is served from a local directory or the local hub cache only, see
:func:`evals.alpaca.length_control._hub_files_offline`. The reference outputs come from the hub
only when asked for (``source="hub"``, or ``"auto"`` without a local file), through
:mod:`evals.sources`.

This package re-exports the names its callers use (``from evals import alpaca;
alpaca.Judge(...)``); each is defined, and looked up, in the module named above.
"""

from __future__ import annotations

from evals.alpaca.answers import generate_answers
from evals.alpaca.instructions import REFERENCES, RECORD_FIELDS, InstructionSet, load_instruction_set, read_records
from evals.alpaca.judge import (
    ANNOTATORS_DIR,
    COMPLETION_FNS,
    ENGINE_FNS,
    FAKE_JUDGE,
    JUDGE_DTYPES,
    LOCAL_JUDGE,
    HarnessPairwiseAnnotator,
    HarnessSinglePairwiseAnnotator,
    Judge,
    JudgeError,
    engine_choice_completions,
    longest_completions,
)
from evals.alpaca.judge_check import CHECK_KINDS, TRUNCATE_SHARE, check_judge
from evals.alpaca.length_control import LC_BOOTSTRAP, LC_GLMS, LC_NOTES, length_controlled_metrics
from evals.alpaca.scoring import score_alpaca_eval
from evals.alpaca.win_rate import win_rate_metrics

__all__ = [
    "ANNOTATORS_DIR", "CHECK_KINDS", "COMPLETION_FNS", "ENGINE_FNS", "FAKE_JUDGE", "JUDGE_DTYPES",
    "LC_BOOTSTRAP", "LC_GLMS", "LC_NOTES", "LOCAL_JUDGE", "RECORD_FIELDS", "REFERENCES", "TRUNCATE_SHARE",
    "HarnessPairwiseAnnotator", "HarnessSinglePairwiseAnnotator", "InstructionSet", "Judge", "JudgeError",
    "check_judge", "engine_choice_completions", "generate_answers", "length_controlled_metrics",
    "load_instruction_set", "longest_completions", "read_records", "score_alpaca_eval", "win_rate_metrics",
]
