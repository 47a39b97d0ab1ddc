"""Instruments measured against outside labels: the AlpacaEval judge (:mod:`.judge_eval`) and the
curator (:mod:`.curator_eval`) on answer pairs labelled by people or by GPT-4 (:mod:`.pairs`),
beside trivial baselines, with bootstrap intervals (:mod:`.intervals`)."""
