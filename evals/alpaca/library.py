"""The alpaca_eval library, imported without side effects on the caller's process.

alpaca_eval sets the root logger to INFO when its annotators are imported, and its utils import
the deprecated pkg_resources; neither should leak into the caller's process. Every module of
this package takes alpaca_eval's pieces from here, so the first import, wherever it happens, is
the quiet one.
"""

from __future__ import annotations

import logging
import warnings

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

__all__ = ["alpaca_eval", "ae_constants", "ae_metrics", "ae_utils", "PairwiseAnnotator", "SinglePairwiseAnnotator"]
