"""Shared fixtures: a tiny random Llama with a tokenizer built offline, saved like a real model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _training_text() -> list[str]:
    rows = [json.loads(x) for x in (REPO / "pipeline" / "resources" / "demo_seed.jsonl").read_text().splitlines()]
    text = [r["instruction"] + "\n" + r["response"] for r in rows]
    text += ["Score: 1 2 3 4 5", "system user assistant", "Text: Instruction: Answer:"]
    return text


def build_tiny_model(path: Path, hidden_size: int = 32, heads: int = 4, kv_heads: int = 2) -> Path:
    """A 2-layer Llama (hidden size 32) and a byte-level BPE tokenizer trained on the packaged
    seed text: no download, a few seconds. vLLM's CPU attention needs heads of at least 32
    dimensions (``hidden_size=64, heads=2, kv_heads=1``)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pipeline.models import CHATML_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_training_text(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHATML_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        initializer_range=0.3,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    fast.save_pretrained(path)
    return path


def write_file(path: Path, obj) -> None:
    """Write a test fixture file: a list as JSONL, a string as is, anything else as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, list):
        path.write_text("".join(json.dumps(r) + "\n" for r in obj), encoding="utf-8")
    else:
        path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Model conversions go to a per-session cache, never the user's."""
    monkeypatch.setenv("HUMPBACK_CACHE", str(tmp_path_factory.getbasetemp() / "humpback-cache"))


@pytest.fixture(scope="session")
def eval_data() -> Path:
    """The evaluation data shipped inside the package (evals/data): real files, always present."""
    from evals import bundled

    return bundled.packaged_dir()


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test (local sockets still work).
    Test modules that must stay offline use it with ``pytestmark = pytest.mark.usefixtures("no_network")``."""
    import socket

    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access attempted: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
