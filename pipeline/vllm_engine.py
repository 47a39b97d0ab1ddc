"""The :class:`~pipeline.engine.Engine` interface served by vLLM, running in its own environment.

vLLM pins an older transformers than this project, so it is installed into a virtualenv of its
own (``make vllm-env`` creates ``.venv-vllm``; any interpreter that imports vllm will do) and
runs there as a child process (:mod:`pipeline.vllm_worker`). This side renders and tokenizes
prompts with the project's tokenizer and chat template, exactly as :class:`TransformersEngine`
does, sends token ids, and reads tokens back through the same :func:`completion_from_tokens`, so
the two engines differ only in the arithmetic of their kernels.

What vLLM brings: continuous batching (a finished sequence's slot is refilled at once), prefix
caching (the curation rubric and the judge template are computed once), paged KV memory, tensor
parallelism on GPUs, and LoRA adapters served on the base model (``LoRARequest``) instead of a
merged fp32 copy of the base for every stage.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from transformers import GenerationConfig, PreTrainedTokenizerBase

from pipeline.engine import Chat, Completion, PromptSide, SamplingParams, completion_from_tokens, split_choices

log = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("vllm_worker.py")
DEFAULT_ENV = Path(__file__).resolve().parent.parent / ".venv-vllm"


class VllmUnavailable(RuntimeError):
    """No interpreter with vLLM was found, or it could not start the model."""


def find_python(configured: str | None = None) -> str:
    """The interpreter that runs vLLM: ``configured`` (``engine.vllm_python``), else
    ``$HUMPBACK_VLLM_PYTHON``, else ``.venv-vllm/bin/python`` beside the project, else this
    interpreter when it imports vllm itself. Raises :class:`VllmUnavailable` naming what was tried."""
    tried = []
    for candidate in (configured, os.environ.get("HUMPBACK_VLLM_PYTHON"), str(DEFAULT_ENV / "bin" / "python")):
        if candidate:
            tried.append(candidate)
            if Path(candidate).is_file() or shutil.which(candidate):
                return candidate
    try:
        import importlib.util

        if importlib.util.find_spec("vllm") is not None:
            return sys.executable
    except (ImportError, ValueError):
        pass
    tried.append(f"{sys.executable} (no vllm module)")
    raise VllmUnavailable("no Python with vLLM found (tried: " + ", ".join(tried) + "); run `make vllm-env` "
                          "or set engine.vllm_python")


def worker_env(python: str, device: str, kv_cache_gib: float | None) -> dict[str, str]:
    """The child's environment: on a CPU, vLLM's build needs its bundled OpenMP runtime preloaded
    (``libiomp5.so`` in the environment's ``lib``) and takes its KV-cache size from
    ``VLLM_CPU_KVCACHE_SPACE`` (GiB)."""
    env = dict(os.environ)
    if device == "cpu":
        # The environment's prefix: a venv's bin/python is a symlink to the base interpreter, so
        # it is not resolved (that would look for the library beside the base Python).
        located = shutil.which(python) or python
        prefix = Path(located).absolute().parent.parent if Path(located).is_file() else None
        lib = (prefix / "lib" / "libiomp5.so") if prefix else None
        if lib is not None and lib.is_file():
            env["LD_PRELOAD"] = ":".join(p for p in (str(lib), env.get("LD_PRELOAD", "")) if p)
        if kv_cache_gib:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(kv_cache_gib)))
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "auto")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


@dataclass
class VllmEngine(PromptSide):
    """Generation and choice probabilities through vLLM in a child process.

    ``model`` is a base model directory (or hub id); ``adapter`` a PEFT LoRA directory served on
    it. ``dtype`` is vLLM's (``auto``, ``bfloat16``, ``float32``)."""

    model: str
    tokenizer: PreTrainedTokenizerBase
    adapter: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    python: str | None = None
    kv_cache_gib: float | None = None
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    max_num_seqs: int | None = None
    enforce_eager: bool = False
    seed: int = 0
    startup_timeout_s: float = 900.0
    stats: dict[str, float] = field(
        default_factory=lambda: {"prompt_tokens": 0, "new_tokens": 0, "prefix_tokens_reused": 0})
    """As :class:`TransformersEngine`'s; ``prefix_tokens_reused`` counts vLLM's prefix-cache hits."""

    def __post_init__(self) -> None:
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._eos = self._read_eos()
        self.python = find_python(self.python)
        self._log = tempfile.NamedTemporaryFile("w+", prefix="humpback-vllm-", suffix=".log", delete=False)
        self._proc = subprocess.Popen(
            [self.python, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            text=True, env=worker_env(self.python, self.device, self.kv_cache_gib))
        self._finalizer = weakref.finalize(self, _stop, self._proc)
        config = {"model": self.model, "tokenizer": self.model, "dtype": self.dtype, "seed": self.seed,
                  "adapter": self.adapter, "max_lora_rank": self._adapter_rank(),
                  "tensor_parallel_size": self.tensor_parallel_size, "max_model_len": self.max_model_len,
                  "gpu_memory_utilization": self.gpu_memory_utilization, "max_num_seqs": self.max_num_seqs,
                  "enforce_eager": self.enforce_eager,
                  # vLLM's CPU build cannot rewind a seeded sampler when a prompt's prefill is
                  # split over steps (it needs a CUDA generator's offset): whole prompts only.
                  "chunked_prefill": self.device != "cpu"}
        reply = self._call(config)
        if not reply.get("ready"):
            raise VllmUnavailable(f"vLLM could not start {self.model}: {reply.get('error')}\n{self._log_tail()}")
        self.version = reply.get("vllm")
        log.info("vLLM %s serving %s%s (%s, log %s)", self.version, self.model,
                 f" with adapter {self.adapter}" if self.adapter else "", self.dtype, self._log.name)

    # ------------------------------------------------------------------ the Engine interface

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Completion]:
        ids = self._encode([self.render(c) for c in chats])
        stops = self._stops(params)
        return [completion_from_tokens(self.tokenizer, tokens, self._eos, stops)
                for tokens in self.generate_tokens(ids, params)]

    def generate_tokens(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        """Each prompt's new token ids, ending with the EOS token where one was drawn."""
        ids = [list(p) for p in prompts]
        if any(not p for p in ids):
            raise ValueError("every prompt needs at least one token")
        if not ids:
            return []
        request = {"max_new_tokens": params.max_new_tokens, "min_new_tokens": params.min_new_tokens,
                   "temperature": params.temperature, "top_p": params.top_p, "seed": params.seed,
                   "stop": list(self._stops(params)), "stop_token_ids": self._eos}
        outputs = self._request({"op": "generate", "prompts": ids, "params": request})["outputs"]
        tokens = []
        for out in outputs:
            new = out["token_ids"]
            self.stats["prompt_tokens"] += out["prompt_tokens"]
            self.stats["prefix_tokens_reused"] += out.get("cached_tokens", 0)
            self.stats["new_tokens"] += len(new) - (1 if new and new[-1] in self._eos else 0)
            tokens.append(new)
        return tokens

    def choice_probs(self, chats: Sequence[Chat], prefix: str, choices: Sequence[str]) -> list[list[float]]:
        """Each choice's probability as the next token, read as the log probability of that
        token appended to the prompt (vLLM's prompt log probabilities: exact, not a top-k list)."""
        split = [split_choices(self.tokenizer, self.render(c), prefix, choices) for c in chats]
        prompts = [feed + [head] for feed, heads in split for head in heads]
        if not prompts:
            return []
        logprobs = self._request({"op": "prompt_logprobs", "prompts": prompts})["logprobs"]
        self.stats["prompt_tokens"] += sum(len(p) for p in prompts)
        k = len(choices)
        return [[math.exp(v) for v in logprobs[i * k:(i + 1) * k]] for i in range(len(chats))]

    # ------------------------------------------------------------------ the child process

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> "VllmEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read_eos(self) -> list[int]:
        ids: set[int] = set()
        try:
            eos = GenerationConfig.from_pretrained(self.model).eos_token_id
            ids |= set(eos if isinstance(eos, (list, tuple)) else [eos])
        except (OSError, ValueError):
            pass
        ids.add(self.tokenizer.eos_token_id)
        return sorted(i for i in ids if i is not None)

    def _adapter_rank(self) -> int:
        if not self.adapter:
            return 0
        rank = json.loads((Path(self.adapter) / "adapter_config.json").read_text()).get("r", 16)
        return max(8, 1 << (int(rank) - 1).bit_length())  # vLLM takes powers of two

    def _call(self, obj: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc
        try:
            proc.stdin.write(json.dumps(obj) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            code = proc.poll()
            raise VllmUnavailable(f"the vLLM process ended (exit {code}) \n{self._log_tail()}")
        return json.loads(line)

    def _request(self, obj: dict[str, Any]) -> dict[str, Any]:
        reply = self._call(obj)
        if "error" in reply:
            raise RuntimeError(f"vLLM {obj.get('op')} failed: {reply['error']}\n{reply.get('traceback', '')}"
                               f"{self._log_tail()}")
        return reply

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = Path(self._log.name).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "vLLM log (" + self._log.name + "):\n" + "\n".join(text[-lines:])


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.stdin.write(json.dumps({"op": "close"}) + "\n")
        proc.stdin.flush()
        proc.wait(timeout=60)
    except (BrokenPipeError, OSError, subprocess.TimeoutExpired, ValueError):
        proc.kill()
        proc.wait()
