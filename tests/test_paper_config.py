"""configs/paper-7b.yaml loads through the config loader, offline, with the paper's settings."""

import pytest

from harness.config import load_config

pytestmark = pytest.mark.usefixtures("no_network")


def test_paper_config_validates_offline_with_the_papers_settings():
    cfg = load_config("configs/paper-7b.yaml")
    assert cfg.model.base == "meta-llama/Llama-2-7b-hf"
    assert cfg.seed.limit == 3200 and cfg.seed.path == ["seed/oasst1_en_rank0.jsonl"]
    assert (cfg.corpus.min_chars, cfg.corpus.max_chars, cfg.corpus.max_segments) == (600, 3000, 502000)
    assert (cfg.augment.temperature, cfg.augment.top_p) == (0.7, 0.9)
    assert cfg.curate.mode == "generate" and cfg.select.k == 4.5 and cfg.select.max_pairs is None
    assert cfg.iterate.iterations == 2
    for section in (cfg.finetune, cfg.backward):
        assert section.method == "full" and section.learning_rate == 1e-5 and section.weight_decay == 0.1
        assert section.batch_size * section.grad_accum == 32  # global, whatever the process count
        assert section.lr_scheduler == "linear" and section.min_learning_rate == 9e-6
        assert section.distributed == "fsdp" and section.processes > 1
    assert cfg.finetune.seed_tag == "Answer in the style of an AI Assistant."
    assert cfg.finetune.web_tag == "Answer with knowledge from web search."
    assert cfg.finetune.inference_tag == "seed"
    assert cfg.eval.profile == "full" and cfg.eval.alpaca_subset is None
    assert cfg.eval.alpaca_reference == "text_davinci_003" and cfg.eval.judge == "alpaca_eval_gpt4"


def test_paper_config_takes_overrides_like_any_other():
    cfg = load_config("configs/paper-7b.yaml", ["model.base=mistralai/Mistral-7B-v0.1", "corpus.max_segments=1000"])
    assert cfg.model.base == "mistralai/Mistral-7B-v0.1" and cfg.corpus.max_segments == 1000
