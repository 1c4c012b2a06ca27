import json

import pytest

from conftest import make_elastic, make_tokenizer
from flextron import api
from flextron.checkpoint import load_checkpoint, save_checkpoint
from flextron.config import Budget
from flextron.cost import budget_metric, budget_target
from flextron.errors import FlextronError
from flextron.latency import _fit, _trimmed_mean, latency_table, random_subnets


def test_fit_recovers_an_additive_cost_model():
    em = make_elastic()
    true_mlp = {24: 1.0, 48: 1.7, 72: 2.6, 96: 3.1}
    true_attn = {1: 0.4, 2: 0.9, 3: 1.1, 4: 1.5}
    nets = random_subnets(em, 20, seed=0)
    y = [5.0 + sum(true_mlp[w] for w in s.mlp) + sum(true_attn[a] for a in s.attn) for s in nets]
    table = _fit(em, nets, y)
    em.latency = {"decode_ms": table, "prefill_ms": table}
    predict = latency_table(em, "latency_ms")
    for s in random_subnets(em, 10, seed=1):
        exact = 5.0 + sum(true_mlp[w] for w in s.mlp) + sum(true_attn[a] for a in s.attn)
        assert predict(em.space, s) == pytest.approx(exact, rel=1e-9)
    assert min(table["mlp"].values()) == pytest.approx(0.0) and min(table["attn"].values()) == pytest.approx(0.0)


def test_trimmed_mean_drops_outliers():
    assert _trimmed_mean([1.0, 1.0, 1.0, 1.0, 100.0]) == 1.0


def test_profile_stores_a_validated_table_that_budgets_use(tmp_path):
    em = make_elastic()
    ckpt = save_checkpoint(em, make_tokenizer(), tmp_path / "ckpt", {"source_model": "tiny"})
    table = api.profile(ckpt, device="cpu", context=8, decode_steps=2, repeats=1, n_fit=6, n_validate=2,
                        progress=False)
    assert set(table["validation"]) == {"decode_ms", "prefill_ms"}
    assert table["validation"]["decode_ms"]["n"] == 2 and len(table["measurements"]) == 8
    assert json.loads((ckpt / "latency.json").read_text())["context"] == 8
    loaded, _, _ = load_checkpoint(ckpt)
    assert budget_metric(loaded, Budget.parse("0.5")) == "latency_ms"  # measured latency is the default
    table = latency_table(loaded, "latency_ms")
    # Timings this small are noisy: take whichever extreme the fit found slower as the budget.
    top = max(table(loaded.space, loaded.space.full()), table(loaded.space, loaded.space.smallest()))
    _, target = budget_target(loaded, Budget.parse(f"latency_ms={top * 1.001:.9f}"))
    assert target == pytest.approx(top * 1.001, rel=1e-6)
    with pytest.raises(FlextronError, match="below the smallest sub-network"):
        budget_target(loaded, Budget.parse("latency_ms=0.000001"))


def test_latency_budget_without_table_says_what_to_do():
    with pytest.raises(FlextronError, match="run `flextron profile CKPT` first"):
        budget_target(make_elastic(), Budget.parse("latency_ms=20"))
    assert budget_metric(make_elastic(), Budget.parse("0.5")) == "params"


def test_measure_times_prefill_and_decode():
    from flextron.latency import measure

    em = make_elastic()
    t = measure(em, em.space.smallest(), context=8, decode_steps=2, repeats=1)
    assert t["prefill_ms"] > 0 and t["decode_ms"] > 0
    assert em.subnet == em.space.smallest()


def test_fit_and_random_sub_networks_cover_skips_within_the_floor():
    em = make_elastic(n_layers=4, min_layers=2)
    true_mlp = {0: 0.0, 24: 1.0, 48: 1.7, 72: 2.6, 96: 3.1}
    true_attn = {0: 0.0, 1: 0.4, 2: 0.9, 3: 1.1, 4: 1.5}
    nets = random_subnets(em, 40, seed=0)
    assert any(0 in s.mlp for s in nets) and any(0 in s.attn for s in nets)
    for s in nets:
        em.space.validate(s)  # the floor holds
    y = [5.0 + sum(true_mlp[w] for w in s.mlp) + sum(true_attn[a] for a in s.attn) for s in nets]
    em.latency = {"decode_ms": (table := _fit(em, nets, y)), "prefill_ms": table}
    predict = latency_table(em, "latency_ms")
    for s in [em.space.smallest(), *random_subnets(em, 10, seed=1)]:
        exact = 5.0 + sum(true_mlp[w] for w in s.mlp) + sum(true_attn[a] for a in s.attn)
        assert predict(em.space, s) == pytest.approx(exact, rel=1e-9)


def test_profile_measures_a_depth_space(tmp_path):
    em = make_elastic(n_layers=4, min_layers=1)
    ckpt = save_checkpoint(em, make_tokenizer(), tmp_path / "ckpt", {"source_model": "tiny"})
    table = api.profile(ckpt, device="cpu", context=8, decode_steps=2, repeats=1, n_fit=12, n_validate=2,
                        progress=False)
    assert "0" in table["decode_ms"]["mlp"] and "0" in table["decode_ms"]["attn"]
    assert table["measurements"][1]["subnet"] == em.space.smallest().to_dict()
