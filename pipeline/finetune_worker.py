"""One process of data-parallel fine-tuning, started by :mod:`pipeline.finetune_launch`:

    python -m torch.distributed.run --nproc-per-node N -m pipeline.finetune_worker JOB.json

The job file names the base model, the chats (JSONL), the training section and the output
folders; the first process writes the model and its statistics (``stats``, JSON).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from pipeline.finetune import run_training
from pipeline.io import read_jsonl, write_json_atomic
from pipeline.settings import TrainSection


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    chats = [row["messages"] for row in read_jsonl(Path(job["chats"]))]
    stats = run_training(job["base"], chats, TrainSection(**job["train"]), Path(job["out_dir"]), Path(job["scratch"]),
                         job["seed"], job["chat_template"], job["resume"])
    if stats is not None:  # the first process
        write_json_atomic(Path(job["stats"]), stats)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(sys.argv[1])
