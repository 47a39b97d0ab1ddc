"""Data-parallel fine-tuning: the job written to a folder, ``processes`` workers started with
``torch.distributed.run`` (the launcher ``accelerate launch`` uses for several GPUs; on a CPU
accelerate's own launcher starts one process only), their result read back.

Each worker (:mod:`pipeline.finetune_worker`) runs :func:`pipeline.finetune.run_training`; the
Trainer sets up DDP, FSDP or DeepSpeed through accelerate from the training arguments, with the
gloo backend on a CPU and NCCL on GPUs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from pipeline.io import write_json_atomic, write_jsonl
from pipeline.settings import TrainSection

log = logging.getLogger(__name__)

LOG_TAIL_CHARS = 4000


def launch(
    base: str,
    chats: Sequence[list[dict[str, str]]],
    cfg: TrainSection,
    out_dir: Path,
    scratch: Path,
    seed: int,
    chat_template: str | None,
    resume: str | None,
) -> dict[str, Any]:
    """Train in ``cfg.processes`` processes and return the first one's statistics."""
    n = cfg.processes
    if cfg.distributed == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ValueError("finetune.distributed is 'deepspeed' but the deepspeed package is not installed "
                         "(pip install deepspeed), or choose 'ddp' or 'fsdp'")
    if cfg.distributed != "ddp" and not torch.cuda.is_available():
        raise ValueError(f"finetune.distributed is '{cfg.distributed}', which accelerate runs on GPUs only; "
                         "on a CPU several processes train with 'ddp' (gloo)")
    if torch.cuda.is_available() and torch.cuda.device_count() < n:
        raise ValueError(f"{n} training processes need {n} GPUs; torch sees {torch.cuda.device_count()}")
    job_dir = scratch / "job"
    job_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(job_dir / "chats.jsonl", ({"messages": c} for c in chats))
    stats_path = job_dir / "stats.json"
    stats_path.unlink(missing_ok=True)
    job = {
        "base": base, "chats": str(job_dir / "chats.jsonl"),
        "train": {k: v for k, v in cfg.model_dump(mode="json").items() if k in TrainSection.model_fields},
        "out_dir": str(out_dir), "scratch": str(scratch), "seed": seed, "chat_template": chat_template,
        "resume": resume, "stats": str(stats_path),
    }
    write_json_atomic(job_dir / "job.json", job)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc-per-node={n}",
           "-m", "pipeline.finetune_worker", str(job_dir / "job.json")]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if not torch.cuda.is_available():  # the cores shared out, not each process taking them all
        env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // n)))
    log_path = job_dir / "launch.log"
    log.info("fine-tuning in %d processes (%s): %s", n, cfg.distributed, " ".join(cmd))
    with open(log_path, "w", encoding="utf-8") as out:
        rc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=root).returncode
    if rc != 0 or not stats_path.exists():
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL_CHARS:]
        raise RuntimeError(f"data-parallel fine-tuning ({n} processes) failed with exit status {rc}; "
                           f"the end of {log_path}:\n{tail}")
    return json.loads(stats_path.read_text(encoding="utf-8"))
