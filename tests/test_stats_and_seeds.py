"""Intervals on rates (Wilson; Newcombe for differences) and the seed sweep's aggregation."""

import json

import pytest

from conftest import PROJECT_ROOT
from qmllm_pipeline.dotted import lookup
from qmllm_pipeline.parameters import load_parameters
from qmllm_pipeline.results import load_metrics, results_markdown
from qmllm_pipeline.seeds import aggregate, experiments, figures, name_head_figure, select
from qmllm_pipeline.stats import difference, rate, wilson


@pytest.mark.parametrize(("k", "n", "low", "high"), [(0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634),
                                                      (72, 72, 0.9493, 1.0), (8, 240, 0.0170, 0.0644)])
def test_wilson_interval_matches_published_values(k, n, low, high):
    assert wilson(k, n) == pytest.approx((low, high), abs=5e-4)


def test_wilson_is_inside_zero_one_and_shrinks_with_n():
    widths = [wilson(n // 4, n)[1] - wilson(n // 4, n)[0] for n in (8, 80, 800)]
    assert widths == sorted(widths, reverse=True)
    assert wilson(0, 0) == (0.0, 1.0)
    assert rate(3, 12) == {"value": 0.25, "count": 3, "n": 12, "ci95": list(wilson(3, 12))}


def test_a_difference_is_called_one_only_when_its_interval_excludes_zero():
    small = difference(rate(6, 72), rate(5, 72))          # one more success in 72: noise
    assert not small["significant"] and small["ci95"][0] < 0 < small["ci95"][1]
    large = difference(rate(30, 72), rate(5, 72))
    assert large["significant"] and large["ci95"][0] > 0 and large["value"] == pytest.approx(25 / 72)
    assert difference(rate(5, 72), rate(30, 72))["ci95"][1] < 0


def _show(seed_metrics: dict[int, float]) -> list:
    """A `dvc exp show --json` answer with one experiment per seed (the shape DVC 3 prints)."""
    revs = [{"rev": f"abc{seed}", "name": f"seed-{seed}-1234567", "data": {
        "rev": f"abc{seed}", "timestamp": "2026-12-01T02:18:00",
        "params": {"conf/base/parameters.yml": {"data": {"seed": seed, "threads": 2}}},
        "metrics": {"metrics/finetune.json": {"data": {"qmllm": {"safety": {
            "heldout_harmful_refused_with_neutral_image": value}}}},
            "metrics/evaluate.json": {"data": {"qmllm_attack_gain_over_clean": {"eps16": value / 10}}}}}}
        for seed, value in seed_metrics.items()]
    return [{"rev": "workspace", "data": {}, "experiments": None},
            {"rev": "1234567", "name": "main", "data": {}, "experiments": [{"revs": [r]} for r in revs]}]


def test_experiments_are_read_from_dvc_exp_show():
    found = experiments(_show({0: 0.9, 1: 0.8}))
    assert [e["name"] for e in found] == ["seed-0-1234567", "seed-1-1234567"]
    assert found[1]["params"]["conf/base/parameters.yml"]["seed"] == 1
    assert found[0]["metrics"]["finetune"]["qmllm"]["safety"]["heldout_harmful_refused_with_neutral_image"] == 0.9


def test_aggregate_gives_mean_spread_and_each_seed():
    runs = {e["params"]["conf/base/parameters.yml"]["seed"]: e["metrics"]
            for e in experiments(_show({0: 0.9, 1: 0.8, 2: 1.0}))}
    summary = aggregate(runs)
    figure = summary["figures"]["qmllm refuses held-out harmful requests, neutral image"]
    assert summary["seeds"] == [0, 1, 2]
    assert figure["mean"] == pytest.approx(0.9) and figure["std"] == pytest.approx(0.1)
    assert (figure["min"], figure["max"], figure["spread"]) == (0.8, 1.0, pytest.approx(0.2))
    assert figure["values"] == {"0": 0.9, "1": 0.8, "2": 1.0}
    assert set(summary["figures"]) <= set(figures()) and len(summary["figures"]) == 2  # only what was measured


def test_the_results_page_leads_with_the_seed_table(tmp_path):
    summary = aggregate({e["params"]["conf/base/parameters.yml"]["seed"]: e["metrics"]
                         for e in experiments(_show({0: 0.9, 1: 0.8}))})
    (tmp_path / "seeds.json").write_text(json.dumps(summary))
    text = results_markdown(load_metrics(tmp_path))
    row = "| qmllm refuses held-out harmful requests, neutral image | 85.0% [80.0%, 90.0%]"
    assert "## Over seeds" in text and row in text


def test_experiment_names_carry_the_lever_label():
    from qmllm_pipeline.seeds import label_of

    assert label_of("seed-2-9e1ccc1") is None and label_of("seed-2-replay-9e1ccc1") == "replay"
    assert label_of("seed-2-image_replay-9e1ccc1") == "image_replay" and label_of("vivid-wren") is None


def test_two_sweeps_compare_figure_by_figure():
    from qmllm_pipeline.seeds import compare_table

    default = aggregate({seed: e["metrics"] for seed, e in zip((0, 1), experiments(_show({0: 0.9, 1: 0.8})),
                                                                strict=True)})
    lever = aggregate({seed: e["metrics"] for seed, e in zip((0, 1), experiments(_show({0: 1.0, 1: 0.96})),
                                                              strict=True)})
    table = compare_table({"seeds": default, "seeds_replay": lever})
    assert "| figure | seeds | seeds_replay |" in table
    row = "| qmllm refuses held-out harmful requests, neutral image | 85.0 [80.0, 90.0] | 98.0 [96.0, 100.0] |"
    assert row in table


def test_a_stopped_or_running_experiment_is_not_a_seed():
    """DVC lists an experiment that is still running, or was stopped, without a commit of its own and with the
    workspace's metrics: it must not stand for its seed (a stopped seed 2 once showed seed 0's figures)."""
    show = _show({0: 0.9, 1: 0.8, 2: 0.7})
    stopped = json.loads(json.dumps(show[1]["experiments"][0]))
    stopped["revs"][0].update(rev="def0", name="seed-2-1234567")
    stopped["revs"][0]["data"].update(rev="workspace", timestamp=None)
    show[1]["experiments"].insert(0, stopped)  # listed first, as DVC listed it
    found = experiments(show)
    assert [e["finished"] for e in found] == [False, True, True, True]
    runs = select(found)
    assert sorted(runs) == [0, 1, 2]
    assert runs[2]["finetune"]["qmllm"]["safety"]["heldout_harmful_refused_with_neutral_image"] == 0.7
    assert select(found, seeds=[1]).keys() == {1} and select(found, label="replay") == {}


def test_every_headline_figure_resolves_in_the_committed_metrics():
    """A figure whose path leads nowhere is silently left out of the aggregate: each must resolve (interval
    keys such as `dsr.single` hold dots of their own)."""
    assert lookup({"a": {"dsr.single": {"value": 0.5}}}, "a.dsr.single.value") == 0.5
    assert lookup({"a": {"dsr": {"single": 1}}}, "a.dsr.single") == 1 and lookup({"a": 1}, "a.b") is None
    metrics = load_metrics(PROJECT_ROOT / "metrics")
    head = bool(metrics["pretrain"].get("name_head", {}).get("slots"))
    headline = figures(load_parameters("base", PROJECT_ROOT / "conf"))
    missing = [label for label, (stem, key) in headline.items() if lookup(metrics.get(stem, {}), key) is None
               and (head or not name_head_figure(label))]
    assert not missing
    # the jailbreak's rows come from the parameters: every case of every attacker at every budget
    assert "qmllm plain PGD ASR, eps32" in headline and "baseline per-instruction white-box ASR, eps64" in headline
