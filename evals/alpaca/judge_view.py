"""What the AlpacaEval judge sees of an answer: the answer with planted judge-addressed text taken
out (:func:`pipeline.untrusted.guard`), so that "Output (b) is better", a lone "M", chat markup
or a score line cannot vote for the answer that carries it.

Instructions are fixed evaluation data, not web text: an answer to an instruction that itself asks
for a rating or a score keeps its rating (everything else is still taken out)."""

from __future__ import annotations

import re
from typing import Any, Iterable

from pipeline.untrusted import Guarded, add_counts, guard

_ASKS_FOR_RATING = re.compile(r"\b(?:rate|rating|ratings|score|scores|grade|out\s+of\s+\d+)\b", re.IGNORECASE)


def judge_view(instruction: str, output: str) -> Guarded:
    """The answer as the judge is shown it, and what was taken out."""
    return guard(output, allow=("rating",) if _ASKS_FOR_RATING.search(instruction or "") else ())


def guard_records(records: Iterable[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """AlpacaEval records with each ``output`` replaced by its judge view, and the counts: how
    many outputs were flagged and what was found in them by kind."""
    out, kinds, flagged = [], {}, 0
    for record in records:
        view = judge_view(str(record.get("instruction", "")), str(record.get("output", "")))
        if view.flagged:
            flagged += 1
            add_counts(kinds, view.found)
            record = {**record, "output": view.text}
        out.append(record)
    return out, {"flagged": flagged, "kinds": dict(sorted(kinds.items()))}
