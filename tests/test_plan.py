"""``humpback plan``: work per stage from the config, priced with marked throughputs."""

import json

import pytest

from harness.cli import main
from harness.config import load_config
from harness.plan import make_plan, render

pytestmark = pytest.mark.usefixtures("no_network")

DEMO = "configs/demo.yaml"
PAPER = "configs/paper-7b.yaml"


def _row(plan, stage):
    return next(r for r in plan.rows if r.work.stage == stage)


@pytest.mark.parametrize("config", [DEMO, PAPER])
def test_both_configs_print_a_table_with_every_stage(config, capsys):
    assert main(["plan", "--config", config]) == 0
    out = capsys.readouterr().out
    iterations = load_config(config).iterate.iterations
    stages = ["backward", "augment", "iter_00/finetune", "base/eval", "iter_00/eval"]
    stages += [f"iter_{t:02d}/{s}" for t in range(1, iterations + 1) for s in ("curate", "finetune", "eval")]
    for stage in stages:
        assert any(line.startswith(stage + " ") for line in out.splitlines()), stage
    assert "1 GPU" in out and "8 GPUs" in out and "64 GPUs" in out
    # nothing at 7B or on an H100 was measured here: every rate must say so
    rates = out.split("\nstage")[0]
    assert rates.count("ASSUMED:") == 3 and "measured:" not in rates


def test_the_demo_on_the_reference_cpu_uses_measured_rates(capsys):
    assert main(["plan", "--config", DEMO, "--hardware", "cpu", "--gpus", "1"]) == 0
    out = capsys.readouterr().out
    assert "MEASURED" in out and "ASSUMED" not in out.split("stage")[0]
    assert out.count("measured: ") >= 3 and "benchmarks/README.md" in out
    # another model size on the same CPU: the rates are carried, so no longer measured
    assert main(["plan", "--config", DEMO, "--hardware", "cpu", "model.base=Qwen/Qwen2.5-0.5B"]) == 0
    assert "carried from" in capsys.readouterr().out


def test_wall_time_divides_by_devices_and_device_hours_stay():
    cfg = load_config(PAPER)
    plan = make_plan(cfg, devices=[1, 2, 8, 64])
    augment = _row(plan, "augment")
    assert augment.wall_seconds(8) == pytest.approx(augment.seconds / 8)
    assert augment.device_hours(64) == pytest.approx(augment.device_hours(1))
    assert plan.total_wall(64) == pytest.approx(plan.total_wall(8) / 8)
    # a 7B full fine-tuning does not fit one 80 GB GPU: no total on one
    assert _row(plan, "iter_01/finetune").min_devices == 2 and plan.total_wall(1) is None
    # never faster than one item per device: the demo evaluates 14 items per model
    demo = make_plan(load_config(DEMO), devices=[1, 64])
    ev = _row(demo, "base/eval")
    assert ev.work.items < 64 and ev.wall_seconds(64) == pytest.approx(ev.seconds / ev.work.items)


def test_work_follows_the_config_sizes():
    small = make_plan(load_config(DEMO, ["corpus.max_segments=100"]), hardware="cpu")
    large = make_plan(load_config(DEMO, ["corpus.max_segments=300"]), hardware="cpu")
    a, b = _row(small, "augment"), _row(large, "augment")
    assert (a.work.items, b.work.items) == (100, 300)
    assert b.work.prompt_tokens == pytest.approx(3 * a.work.prompt_tokens)
    assert b.seconds == pytest.approx(3 * a.seconds)
    longer = make_plan(load_config(DEMO, ["corpus.max_segments=100", "corpus.max_chars=3000"]), hardware="cpu")
    assert _row(longer, "augment").work.prompt_tokens > a.work.prompt_tokens
    more_eval = make_plan(load_config(DEMO, ["eval.alpaca_subset=60"]), hardware="cpu")
    assert _row(more_eval, "iter_00/eval").work.items == _row(small, "iter_00/eval").work.items + 54
    fewer = make_plan(load_config(DEMO, ["iterate.iterations=1"]), hardware="cpu")
    assert [r.work.stage for r in fewer.rows if "iter_02" in r.work.stage] == []
    epochs = make_plan(load_config(DEMO, ["finetune.epochs=3"]), hardware="cpu")
    assert _row(epochs, "iter_00/finetune").work.train_tokens == pytest.approx(
        3 * _row(small, "iter_00/finetune").work.train_tokens)


def test_seconds_are_tokens_over_the_rates_and_a_given_throughput_is_used():
    cfg = load_config(PAPER)
    plan = make_plan(cfg, throughput={"decode": 5000.0})
    aug = _row(plan, "augment")
    assert plan.rates["decode"].tokens_per_s == 5000.0 and plan.rates["decode"].source.startswith("given")
    expected = aug.work.prompt_tokens / plan.rates["prefill"].tokens_per_s + aug.work.new_tokens / 5000.0
    assert aug.seconds == pytest.approx(expected)
    ft = _row(plan, "iter_01/finetune")
    assert ft.work.recompute  # gradient checkpointing: the forward pass twice
    assert ft.seconds == pytest.approx(ft.work.train_tokens / plan.rates["train"].tokens_per_s * 8 / 6)
    plain = _row(make_plan(load_config(PAPER, ["finetune.gradient_checkpointing=false"])), "iter_01/finetune")
    assert plain.seconds == pytest.approx(ft.work.train_tokens / plan.rates["train"].tokens_per_s)
    # the paper's selection grows the fine-tuning data with the keep rate
    more = make_plan(cfg, keep_rate=0.2)
    assert _row(more, "iter_01/finetune").work.items > ft.work.items
    # a model twice as large takes twice as long on assumed rates
    base = make_plan(cfg)
    big = make_plan(cfg, params=2 * base.params)
    assert _row(big, "augment").seconds == pytest.approx(2 * _row(base, "augment").seconds)


def test_unknown_corpus_size_is_an_error_naming_the_fix(capsys):
    assert main(["plan", "--config", DEMO, "corpus.max_segments=null"]) == 2
    assert "--corpus-segments" in capsys.readouterr().err
    assert main(["plan", "--config", DEMO, "corpus.max_segments=null", "--corpus-segments", "502000"]) == 0
    assert "502,000" in capsys.readouterr().out
    assert main(["plan", "--config", DEMO, "--throughput", "speed=3"]) == 2


def test_json_holds_the_same_numbers(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", PAPER, "--gpus", "8", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    plan = make_plan(load_config(PAPER), devices=[8])
    assert data["total"]["wall_seconds"]["8"] == pytest.approx(plan.total_wall(8))
    assert {s["stage"] for s in data["stages"]} == {r.work.stage for r in plan.rows}
    assert all(not r["measured"] for r in data["rates"].values())
    assert render(plan).splitlines()[0].startswith("plan:")
