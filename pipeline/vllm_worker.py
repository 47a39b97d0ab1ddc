"""The vLLM side of :class:`pipeline.vllm_engine.VllmEngine`: a process in vLLM's own environment.

vLLM pins an older transformers than the project's, so it lives in its own virtualenv
(``make vllm-env``) and this file runs there as a script. It imports nothing from the project:
only the standard library and vLLM. Requests and replies are JSON lines; the replies go to the
process's original stdout, and everything else vLLM or its libraries print goes to stderr.

Requests (one JSON object per line, after the first line that configures the engine):

- ``{"op": "generate", "prompts": [[ids]], "params": {...}}``: new token ids, text and finish
  reason per prompt.
- ``{"op": "prompt_logprobs", "prompts": [[ids]]}``: each prompt's last token's log probability
  given the tokens before it (how the engine reads out the probability of a choice).
- ``{"op": "close"}``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def _reply(stream, obj) -> None:
    stream.write(json.dumps(obj) + "\n")
    stream.flush()


def _build(config: dict):
    from vllm import LLM

    kwargs = dict(
        model=config["model"],
        tokenizer=config.get("tokenizer") or config["model"],
        dtype=config.get("dtype", "auto"),
        seed=int(config.get("seed", 0)),
        enable_prefix_caching=bool(config.get("prefix_caching", True)),
        tensor_parallel_size=int(config.get("tensor_parallel_size", 1)),
        trust_remote_code=False,
    )
    if config.get("max_model_len"):
        kwargs["max_model_len"] = int(config["max_model_len"])
    if config.get("gpu_memory_utilization"):
        kwargs["gpu_memory_utilization"] = float(config["gpu_memory_utilization"])
    if config.get("max_num_seqs"):
        kwargs["max_num_seqs"] = int(config["max_num_seqs"])
    if config.get("adapter"):
        kwargs["enable_lora"] = True
        kwargs["max_lora_rank"] = int(config.get("max_lora_rank", 64))
        kwargs["max_loras"] = 1
    if config.get("chunked_prefill") is False:
        kwargs["enable_chunked_prefill"] = False
    if config.get("enforce_eager"):
        kwargs["enforce_eager"] = True
    return LLM(**kwargs)


def _lora(config: dict):
    if not config.get("adapter"):
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest("adapter", 1, config["adapter"])


def _generate(llm, lora, prompts: list[list[int]], p: dict) -> list[dict]:
    from vllm import SamplingParams

    base = dict(
        max_tokens=int(p["max_new_tokens"]),
        min_tokens=int(p.get("min_new_tokens", 0)),
        temperature=float(p.get("temperature", 0.0)),
        top_p=float(p.get("top_p", 1.0)),
        stop=list(p.get("stop", [])) or None,
        stop_token_ids=list(p.get("stop_token_ids", [])) or None,
        skip_special_tokens=True,
        include_stop_str_in_output=False,
    )
    seed = int(p.get("seed", 0))
    # One seed per prompt (its position in the request): a prompt's sample does not depend on
    # which other prompts share its batch.
    params = [SamplingParams(seed=seed + i, **base) for i in range(len(prompts))]
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False, lora_request=lora)
    replies = []
    for out in outs:
        o = out.outputs[0]
        replies.append({"token_ids": list(o.token_ids), "text": o.text, "finish_reason": o.finish_reason,
                        "prompt_tokens": len(out.prompt_token_ids or []),
                        "cached_tokens": int(getattr(out, "num_cached_tokens", 0) or 0)})
    return replies


def _prompt_logprobs(llm, lora, prompts: list[list[int]]) -> list[float]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False, lora_request=lora)
    values = []
    for ids, out in zip(prompts, outs):
        last = out.prompt_logprobs[-1]
        values.append(float(last[ids[-1]].logprob))
    return values


def main() -> int:
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # whatever else prints goes to stderr, never into the reply stream
    sys.stdout = sys.stderr
    config = json.loads(sys.stdin.readline())
    try:
        import vllm

        llm = _build(config)
        lora = _lora(config)
    except Exception as exc:  # noqa: BLE001 - the parent shows it
        _reply(replies, {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        return 1
    _reply(replies, {"ready": True, "vllm": vllm.__version__})
    for line in sys.stdin:
        request = json.loads(line)
        op = request.get("op")
        try:
            if op == "close":
                _reply(replies, {"closed": True})
                return 0
            if op == "generate":
                _reply(replies, {"outputs": _generate(llm, lora, request["prompts"], request["params"])})
            elif op == "prompt_logprobs":
                _reply(replies, {"logprobs": _prompt_logprobs(llm, lora, request["prompts"])})
            else:
                _reply(replies, {"error": f"unknown op {op!r}"})
        except Exception as exc:  # noqa: BLE001 - the parent shows it
            _reply(replies, {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
