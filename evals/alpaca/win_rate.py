"""alpaca_eval's win rate on judged pairs, as plain numbers."""

from __future__ import annotations

import math
from typing import Any, Sequence

import pandas as pd

from evals.alpaca.library import ae_metrics, ae_utils


def plain_number(value: Any, digits: int = 6) -> float | None:
    """A float rounded to ``digits``, or None for a missing or NaN value."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else round(value, digits)


def win_rate_metrics(annotations: pd.DataFrame | Sequence[dict[str, Any]]) -> dict[str, Any]:
    """alpaca_eval's ``get_winrate`` on preferences (1: reference wins, 2: model wins, 1.5 or 0:
    draw), as plain numbers: win rates in percent, counts, and ``n`` judged pairs."""
    raw = ae_metrics.get_winrate(ae_utils.convert_to_dataframe(annotations))
    return {
        "win_rate": plain_number(raw["win_rate"]),
        "standard_error": plain_number(raw["standard_error"]),
        "discrete_win_rate": plain_number(raw["discrete_win_rate"]),
        "n_wins": int(raw["n_wins"]),
        "n_wins_base": int(raw["n_wins_base"]),
        "n_draws": int(raw["n_draws"]),
        "n": int(raw["n_total"]),
    }
