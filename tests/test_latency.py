import json
from collections.abc import Callable

import numpy as np
import pytest
import torch

from flextron import api
from flextron.budgets import budget_metric, budget_target
from flextron.checkpoint import load_checkpoint, save_checkpoint
from flextron.errors import FlextronError
from flextron.latency import random_subnets, trimmed_mean
from flextron.latency_table import QUANTITY, LatencyTable, check_weight_type, design, fit, hidden_ratios
from flextron.space import Budget, Subnet
from helpers import make_elastic, make_tokenizer, two_graph_table


def test_fit_recovers_an_additive_cost_model():
    em = make_elastic()
    true_mlp = {24: 1.0, 48: 1.7, 72: 2.6, 96: 3.1}
    true_attn = {1: 0.4, 2: 0.9, 3: 1.1, 4: 1.5}
    nets = random_subnets(em, 20, seed=0)
    y = [5.0 + sum(true_mlp[w] for w in s.mlp) + sum(true_attn[a] for a in s.attn) for s in nets]
    table = fit(em.space, nets, y)
    em.latency = LatencyTable({"decode_ms": table.to_dict(), "prefill_ms": table.to_dict()}, em)
    predict = em.latency.table("latency_ms")
    for s in random_subnets(em, 10, seed=1):
        exact = 5.0 + sum(true_mlp[w] for w in s.mlp) + sum(true_attn[a] for a in s.attn)
        assert predict(s) == pytest.approx(exact, rel=1e-9)
    assert min(table.mlp.values()) == pytest.approx(0.0) and min(table.attn.values()) == pytest.approx(0.0)


@pytest.mark.parametrize("hidden", [False, True])
def test_the_fit_minimises_the_relative_error_by_default(hidden):
    """Weighted least squares by 1 / time, checked against numpy's unconstrained solution on timings whose
    best increments are all positive (so the non-negativity is not binding), and unlike plain least squares:
    noise of a few % on the large sub-networks must not move the price of the small ones as much."""
    em = make_elastic(hidden=hidden)
    space = em.space

    def columns(nets: list[Subnet]) -> np.ndarray:  # the fit's unknowns: overhead (c0, c1) and increments (u, v)
        x, r = design(space, nets), hidden_ratios(space, nets)[:, None]
        ones = np.ones((len(nets), 1))
        return np.hstack([ones, r, x, r * x] if hidden else [ones, x])

    nets = random_subnets(em, 40, seed=0, mode="spread")
    cols = columns(nets)
    n = design(space, nets).shape[1]
    truth = np.concatenate([[2.0, 3.0], np.linspace(0.2, 0.6, n), np.linspace(0.3, 0.9, n)] if hidden else
                           [[5.0], np.linspace(0.5, 1.5, n)])
    y = cols @ truth * (1 + 0.03 * np.sin(np.arange(len(nets)) * 1.7))  # a few % of deterministic noise
    w = 1 / y
    expected = np.linalg.lstsq(cols * w[:, None], y * w, rcond=None)[0]
    assert (expected > 0).all()
    relative, plain = fit(space, nets, y.tolist()), fit(space, nets, y.tolist(), relative=False)
    probes = random_subnets(em, 5, seed=3, mode="spread")
    for s, row in zip(probes, columns(probes)):
        assert relative.costs(space, "latency_ms")(s) == pytest.approx(row @ expected, rel=1e-9)
    smallest = space.smallest()
    assert relative.costs(space, "latency_ms")(smallest) != pytest.approx(plain.costs(space, "latency_ms")(smallest))


def test_trimmed_mean_drops_outliers():
    assert trimmed_mean([1.0, 1.0, 1.0, 1.0, 100.0]) == 1.0


def test_profile_stores_a_validated_table_that_budgets_use(elastic_ckpt):
    ckpt = elastic_ckpt()
    # Forced: a tiny model's microseconds on a shared machine need not pass the noise check (tested below).
    table = api.profile(ckpt, device="cpu", context=8, decode_steps=2, repeats=1, samples=6, validate=2,
                        progress=False, force=True)
    assert set(table.main.validation) == {"decode_ms", "prefill_ms"}
    assert table.main.validation["decode_ms"]["n"] == 2 and len(table.measurements) == 8
    stored = json.loads((ckpt / "latency.json").read_text())
    assert stored["context"] == 8
    assert len(stored["noise"]["full_model_ms"]) == 2  # 8 timings: the full model before and after them
    # A space without hidden sizes: latency.json as before (no proportional parts, no per-size errors).
    assert "validation_by_hidden" not in stored and "proportional" not in stored["decode_ms"]
    loaded, _, _ = load_checkpoint(ckpt)
    assert budget_metric(loaded, Budget.parse("0.5")) == "latency_ms"  # measured latency is the default
    table = loaded.latency.table("latency_ms")
    # Timings this small are noisy: take whichever extreme the fit found slower as the budget.
    top = max(table.full, table.smallest)
    _, target = budget_target(loaded, Budget.parse(f"latency_ms={top * 1.001:.9f}"))
    assert target == pytest.approx(top * 1.001, rel=1e-6)
    with pytest.raises(FlextronError, match="below the smallest sub-network"):
        budget_target(loaded, Budget.parse("latency_ms=0.000001"))


def test_profile_of_a_hidden_space_times_every_hidden_size_and_prices_them_from_the_fit(elastic_ckpt):
    ckpt = elastic_ckpt(hidden=True)
    # Three rounds: each timing the median of three, so that a slow spell of the shared machine (tiny models
    # take microseconds) cannot drag the fit (no assert below depends on the times themselves).
    table = api.profile(ckpt, device="cpu", context=8, decode_steps=2, repeats=1, rounds=3, samples=8, validate=3,
                        progress=False, force=True)
    assert {m["subnet"].get("hidden") for m in table.measurements if m["role"] == "fit"} == {32, 48, None}
    loaded, _, _ = load_checkpoint(ckpt)
    assert loaded.latency.hidden_pricing == "measured"
    for key in ("decode_ms", "prefill_ms"):
        fitted = loaded.latency.main.quantity(key)
        assert fitted.proportional is not None and fitted.ascending
        assert sum(e["n"] for e in loaded.latency.main.validation_by_hidden[key].values()) == 3
    for metric in ("latency_ms", "prefill_ms"):
        cost = loaded.latency.table(metric)
        fitted = loaded.latency.main.quantity(QUANTITY[metric])
        part = fitted.proportional
        # Each size's table is the fit's: the overhead's proportional part scaled by d / D, the rest kept.
        assert [t.const for t in cost.by_hidden] == pytest.approx(
            [fitted.overhead - part.overhead * (1 - d / 64) for d in (32, 48, 64)])
        for widths in (loaded.space.full(), loaded.space.smallest(), Subnet(mlp=[96, 24], attn=[1, 4])):
            by_size = [cost(Subnet(mlp=widths.mlp, attn=widths.attn, hidden=loaded.space.hidden_at(i)))
                       for i in range(3)]
            assert by_size == sorted(by_size) and by_size[0] > 0  # a smaller hidden size never costs more


def test_measure_times_prefill_and_decode():
    from flextron.latency import measure

    em = make_elastic()
    t = measure(em, em.space.smallest(), context=8, decode_steps=2, repeats=1)
    assert t["prefill_ms"] > 0 and t["decode_ms"] > 0
    assert em.current == em.space.full()  # timed inside a scope: the model is back as it was


def test_measure_runs_a_sub_network_at_its_hidden_size():
    from flextron.latency import measure

    em = make_elastic(hidden=True)
    widths = []
    norm = em.model.get_submodule(em.family.final_norm)
    handle = norm.register_forward_hook(lambda module, args, out: widths.append(out.shape[-1]))
    try:
        measure(em, Subnet(mlp=[48, 96], attn=[2, 4], hidden=32), context=8, decode_steps=2, repeats=1)
    finally:
        handle.remove()
    assert widths and set(widths) == {32}  # prefill and decode, every round, on the first 32 channels
    assert em.current == em.space.full()


# A known cost affine in the hidden size: r = d / 64; per layer a fixed and a proportional part.
FIXED_MLP, PART_MLP = {24: 0.0, 48: 0.1, 72: 0.15, 96: 0.3}, {24: 0.0, 48: 0.8, 72: 1.7, 96: 2.5}
FIXED_ATTN, PART_ATTN = {1: 0.0, 2: 0.2, 3: 0.3, 4: 0.5}, {1: 0.0, 2: 0.4, 3: 0.6, 4: 1.0}


def _every_subnet(space):
    from itertools import product

    for m in product(*space.mlp):
        for a in product(*space.attn):
            for h in range(len(space.hidden)):
                yield Subnet(mlp=list(m), attn=list(a), hidden=space.hidden_at(h))


@pytest.mark.parametrize("fixed", [0.0, 1.0], ids=["bilinear", "affine"])
def test_a_profile_over_hidden_sizes_recovers_a_cost_linear_in_the_hidden_size(fixed, tmp_path):
    """bilinear: the issue's rule, cost = c0 + r (c1 + sum of per-layer terms); affine: each per-layer term
    also has a part that does not change with the hidden size (attention over the context)."""
    from flextron.latency import profile
    from flextron.options import ProfileOptions

    em = make_elastic(hidden=True)

    def truth(s: Subnet) -> float:
        r = (s.hidden or 64) / 64
        return (2.0 + 3.0 * r + sum(fixed * FIXED_MLP[w] + r * PART_MLP[w] for w in s.mlp)
                + sum(fixed * FIXED_ATTN[a] + r * PART_ATTN[a] for a in s.attn))

    table = profile(em, ProfileOptions(samples=24, validate=6), progress=False,
                    timer=lambda s: {"decode_ms": truth(s), "prefill_ms": 10 * truth(s)})
    assert {m["subnet"].get("hidden") for m in table.measurements if m["role"] == "fit"} == {32, 48, None}
    assert table.hidden_pricing == "measured"
    part = table.main.decode_ms.proportional
    assert part.overhead == pytest.approx(3.0, rel=1e-6) and table.main.decode_ms.overhead == pytest.approx(5.0)
    for got, want in ((part.mlp, PART_MLP), (part.attn, PART_ATTN)):
        assert got == pytest.approx(want, abs=1e-6)
    for key in ("decode_ms", "prefill_ms"):
        assert table.main.validation[key]["max_pct"] < 1e-6 and table.main.validation[key]["n"] == 6
        per_size = table.main.validation_by_hidden[key]
        assert set(per_size) == {32, 48, 64} and sum(e["n"] for e in per_size.values()) == 6
    loaded = LatencyTable.load(table.save(tmp_path), em)
    for metric, scale in (("latency_ms", 1), ("prefill_ms", 10)):
        cost, again = table.table(metric), loaded.table(metric)
        for s in _every_subnet(em.space):
            assert cost(s) == pytest.approx(scale * truth(s), rel=1e-6) and again(s) == cost(s)
        # by_hidden holds each size's table: the fit's, not d / D.
        for i, d in enumerate(em.space.hidden):
            s = Subnet(mlp=[24, 96], attn=[4, 1])
            assert cost.at_hidden(i)(s) == cost(Subnet(mlp=s.mlp, attn=s.attn, hidden=em.space.hidden_at(i)))
            assert cost.at_hidden(i).const == pytest.approx(scale * (2.0 + 3.0 * d / 64), rel=1e-6)


def test_a_table_timed_at_the_full_hidden_size_only_prices_as_before():
    """Old tables (no hidden sizes timed) price exactly as before, and on a space with hidden sizes by
    the d / D model, labelled as modelled."""
    from flextron.latency_table import Fit

    em = make_elastic()
    data = _fitted_table(em)
    table = LatencyTable(data, em)
    assert table.to_dict() == _fitted_table(em) and table.hidden_pricing is None
    fitted = Fit.from_dict(data["decode_ms"], "decode_ms")
    assert fitted.proportional is None and fitted.to_dict() == data["decode_ms"]
    for s in _all_subnets(em.space):
        assert table.table("latency_ms")(s) == 5.0 + sum(fitted.mlp[w] for w in s.mlp) + sum(fitted.attn[a]
                                                                                             for a in s.attn)
    hidden = make_elastic(hidden=True)
    modelled = LatencyTable(_fitted_table(hidden), hidden)
    assert modelled.hidden_pricing == "modelled"
    cost = modelled.table("latency_ms")
    for s in _all_subnets(em.space):
        assert cost(Subnet(mlp=s.mlp, attn=s.attn, hidden=32)) == pytest.approx(table.table("latency_ms")(s) / 2)


def test_fit_and_random_sub_networks_cover_skips_within_the_floor():
    em = make_elastic(n_layers=4, min_layers=2)
    true_mlp = {0: 0.0, 24: 1.0, 48: 1.7, 72: 2.6, 96: 3.1}
    true_attn = {0: 0.0, 1: 0.4, 2: 0.9, 3: 1.1, 4: 1.5}
    nets = random_subnets(em, 40, seed=0)
    assert any(0 in s.mlp for s in nets) and any(0 in s.attn for s in nets)
    for s in nets:
        em.space.validate(s)  # the floor holds
    y = [5.0 + sum(true_mlp[w] for w in s.mlp) + sum(true_attn[a] for a in s.attn) for s in nets]
    table = fit(em.space, nets, y).to_dict()
    em.latency = LatencyTable({"decode_ms": table, "prefill_ms": table}, em)
    predict = em.latency.table("latency_ms")
    for s in [em.space.smallest(), *random_subnets(em, 10, seed=1)]:
        exact = 5.0 + sum(true_mlp[w] for w in s.mlp) + sum(true_attn[a] for a in s.attn)
        assert predict(s) == pytest.approx(exact, rel=1e-9)


def test_profile_measures_a_depth_space(tmp_path):
    em = make_elastic(n_layers=4, min_layers=1)
    ckpt = save_checkpoint(em, make_tokenizer(), tmp_path / "ckpt", {"source_model": "tiny"})
    table = api.profile(ckpt, device="cpu", context=8, decode_steps=2, repeats=1, samples=12, validate=2,
                        progress=False, force=True)
    assert 0 in table.main.decode_ms.mlp and 0 in table.main.decode_ms.attn
    assert table.measurements[1]["subnet"] == em.space.smallest().to_dict()


def _all_subnets(space):
    from itertools import product

    from flextron.space import Subnet

    for m in product(*space.mlp):
        for a in product(*space.attn):
            yield Subnet(mlp=list(m), attn=list(a))


def test_noisy_timings_give_a_monotone_table_and_feasible_projections():
    import numpy as np
    import torch

    from flextron.cost import CostTable
    from flextron.routers import Choices, project

    em = make_elastic()
    # Nearly flat first steps (24 -> 48 neurons, 1 -> 2 units) under timer noise ten times larger.
    true_mlp = {24: 0.0, 48: 0.02, 72: 1.0, 96: 2.0}
    true_attn = {1: 0.0, 2: 0.01, 3: 0.5, 4: 1.0}
    nets = random_subnets(em, 24, seed=0)
    noise = np.random.default_rng(6).normal(0, 0.2, len(nets))
    y = [5.0 + sum(true_mlp[w] for w in s.mlp) + sum(true_attn[a] for a in s.attn) + e for s, e in zip(nets, noise)]
    every = list(_all_subnets(em.space))
    # The unconstrained least squares of earlier versions: the smallest sub-network is not the
    # cheapest, so feasible budgets were refused and projection ended over budget.
    counts = np.asarray([[1.0] + [s.mlp.count(w) for w in true_mlp] + [s.attn.count(a) for a in true_attn]
                         for s in nets])
    coef = np.linalg.lstsq(counts, np.asarray(y), rcond=None)[0]
    old = CostTable("latency_ms", coef[0], [list(coef[1:5])] * 2, [list(coef[5:])] * 2, em.space)
    assert old(em.space.smallest()) > min(old(s) for s in every) + 0.1

    fitted = fit(em.space, nets, y)
    for kind in ("mlp", "attn"):
        values = [getattr(fitted, kind)[k] for k in sorted(getattr(fitted, kind))]
        assert values == sorted(values) and values[0] == 0.0
    fitted = fitted.to_dict()
    em.latency = LatencyTable({"decode_ms": fitted, "prefill_ms": fitted}, em)
    table = em.latency.table("latency_ms")
    cheapest = min(table(s) for s in every)
    assert table.smallest == pytest.approx(cheapest)
    gen = torch.Generator().manual_seed(0)
    full = table.full
    for target in np.linspace(cheapest, full, 25):
        lm, la = (torch.randn(2, 4, generator=gen).log_softmax(-1) for _ in range(2))
        assert table(project(em.space, table, Choices(lm, la), target)) <= target * (1 + 1e-9)
    # A table stored by an earlier version (inverted) is refitted from its own measurements.
    old = {"decode_ms": {**fitted, "mlp": {"24": 0.0, "48": 1.2, "72": 1.0, "96": 2.0}}, "prefill_ms": fitted,
           "measurements": [{"role": "fit", "subnet": s.to_dict(), "decode_ms": v, "prefill_ms": v}
                            for s, v in zip(nets, y)]}
    assert LatencyTable(old, em).table("latency_ms") == table


def test_rounds_interleave_sub_networks_so_a_slow_spell_hits_one_round_of_each():
    from flextron.latency import profile
    from flextron.options import ProfileOptions

    em = make_elastic()
    true_mlp = {24: 1.0, 48: 1.7, 72: 2.6, 96: 3.1}
    calls = []

    def timer(subnet):
        calls.append(subnet)
        ms = 5.0 + sum(true_mlp[w] for w in subnet.mlp)
        slow = 10.0 if 6 <= len(calls) < 14 else 1.0  # the machine is busy for 8 consecutive timings
        return {"decode_ms": ms * slow, "prefill_ms": ms * slow}

    table = profile(em, ProfileOptions(samples=6, validate=2, rounds=3), timer=timer, progress=False)
    # 8 sub-networks and the full model's noise check before and after them, round after round, in one order.
    assert len(calls) == 3 * 10 and calls[:10] == calls[10:20] and calls[0] == calls[9] == em.space.full()
    assert table.settings["rounds"] == 3 and table.main.validation["decode_ms"]["max_pct"] < 1e-6
    # The slow spell spoilt no median (it hit the noise check's timings too), so the check passes.
    assert table.noise.passed and table.noise.spread_pct == {"decode_ms": 0.0, "prefill_ms": 0.0}
    assert [m["decode_ms"] for m in table.measurements] == [
        5.0 + sum(true_mlp[w] for w in m["subnet"]["mlp"]) for m in table.measurements]


def test_refine_fits_the_kind_of_sub_network_routers_serve_where_random_ones_misprice_it():
    """Where nearly full sub-networks run 5 % faster than the sum of their parts (not additive), a table fitted on
    random sub-networks over-prices the ones routers serve; refitted with them, it prices them closer, and the
    unseen random ones about as well as before. The profile's rows, validation and
    noise record stay; a second refinement with nothing new and a busy one are refused."""
    from flextron.latency import profile, refine
    from flextron.options import ProfileOptions

    em = make_elastic(n_layers=4, min_layers=1)  # MLP 0 (skipped) to 96, attention 0 to 4 units
    mlp_ms, attn_ms = {0: 0.0, **MLP_MS}, {0: 0.0, **ATTN_MS}
    calls, busy_from = [], []

    def timer(s):
        calls.append(s)
        ms = 5.0 + sum(mlp_ms[w] + attn_ms[a] for w, a in zip(s.mlp, s.attn))
        ms *= 0.95 if sum(w == 96 for w in s.mlp) >= 3 else 1.0
        ms *= 3.0 if busy_from and len(calls) > busy_from[0] else 1.0
        return {"decode_ms": ms, "prefill_ms": 10 * ms}

    table = profile(em, ProfileOptions(samples=12, validate=4), timer=timer, progress=False)
    served = [Subnet(mlp=[96, 96, 0, 96], attn=[4, 0, 0, 4]), Subnet(mlp=[96, 96, 96, 48], attn=[4, 4, 0, 4]),
              Subnet(mlp=[96, 0, 96, 96], attn=[4, 0, 4, 2]), Subnet(mlp=[96, 96, 96, 96], attn=[4, 0, 4, 4]),
              Subnet(mlp=[72, 96, 0, 96], attn=[4, 4, 0, 3])]
    refined = refine(em, table, served + served[:1], timer, ProfileOptions(), progress=False)
    (record,) = refined.data["refined"]
    before, after = record["error_before"]["decode_ms"], record["error_after"]["decode_ms"]
    assert record["subnets"] == before["n"] == 5 and before["median_signed_pct"] > 2  # over-priced
    assert after["median_pct"] < 0.6 * before["median_pct"]
    assert abs(after["median_signed_pct"]) < 0.5 * before["median_signed_pct"]
    val = [fitted.validation["decode_ms"]["median_pct"] for fitted in (table.main, refined.main)]
    assert val[1] < val[0] + 1  # the random ones, never fitted on, stay priced about as well
    assert refined.measurements[: len(table.measurements)] == table.measurements
    assert [m["routed"] for m in refined.measurements[len(table.measurements):]] == [True] * 5
    assert refined.main.validation["decode_ms"]["n"] == 4 and refined.noise == table.noise
    with pytest.raises(FlextronError, match="timed in the latency table already"):
        refine(em, refined, served, timer, ProfileOptions(), progress=False)
    busy_from.append(len(calls) + 3)  # the machine gets 3x slower after three more timings
    with pytest.raises(FlextronError, match="the latency refinement looks noisy"):
        refine(em, table, served, timer, ProfileOptions(check_every=2), progress=False)


MLP_MS, ATTN_MS = {24: 1.0, 48: 1.7, 72: 2.6, 96: 3.1}, {1: 0.4, 2: 0.9, 3: 1.1, 4: 1.5}


def slowing_measure(slow_after: int | None) -> Callable:
    """A stand-in for `latency.measure` on a machine that gets busy: a known additive cost of the
    sub-network (which the fit recovers exactly), 3x slower after the first `slow_after` timings (None: never)."""
    calls = []

    def measure(em, subnet, *args, **kwargs):
        calls.append(subnet)
        ms = 5.0 + sum(MLP_MS[w] for w in subnet.mlp) + sum(ATTN_MS[a] for a in subnet.attn)
        slow = 3.0 if slow_after is not None and len(calls) > slow_after else 1.0
        return {"decode_ms": ms * slow, "prefill_ms": 10 * ms * slow}

    return measure


# 34 timings, and the full model's 5 of the noise check.
PROFILE = ["--samples", "24", "--validate", "10", "--context", "8", "--no-verify"]


def test_a_profile_on_a_busy_machine_is_refused_and_latency_json_left_as_it_was_unless_forced(
        elastic_ckpt, monkeypatch, capsys):
    from flextron import latency
    from flextron.cli import main

    ckpt = elastic_ckpt()
    monkeypatch.setattr(latency, "measure", slowing_measure(None))  # a steady machine passes
    assert main(["profile", str(ckpt), *PROFILE]) == 0
    assert "Noise check" in capsys.readouterr().out
    before = (ckpt / "latency.json").read_bytes()
    noise = json.loads(before)["noise"]
    assert noise["passed"] and not noise["forced"] and noise["spread_pct"] == {"decode_ms": 0.0, "prefill_ms": 0.0}
    # Timed at the start, after every 10 of the 34 other timings and at the end (each the median over rounds).
    assert len(noise["full_model_ms"]) == 5 and (noise["max_spread_pct"], noise["max_error_pct"]) == (50.0, 15.0)

    # The machine gets busy halfway (20 of 39 timings): everything after runs 3x slower.
    monkeypatch.setattr(latency, "measure", slowing_measure(20))
    assert main(["profile", str(ckpt), *PROFILE]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (above it: the progress bar)
    assert err.startswith("error: the latency profile looks noisy")
    assert "the full model's 5 timings from start to end spread decode 200.0%, prefill 200.0%" in err
    assert "threshold 50%" in err and "the table's median error on 10 unseen sub-networks is decode" in err
    assert "threshold 15%" in err and "add --force" in err
    assert (ckpt / "latency.json").read_bytes() == before

    monkeypatch.setattr(latency, "measure", slowing_measure(20))
    assert main(["profile", str(ckpt), *PROFILE, "--force"]) == 0
    assert "Stored although" in capsys.readouterr().out
    noise = json.loads((ckpt / "latency.json").read_text())["noise"]
    assert noise["forced"] and not noise["passed"] and noise["spread_pct"]["decode_ms"] == pytest.approx(200.0)
    loaded, _, _ = load_checkpoint(ckpt)
    assert loaded.latency.noise.forced and len(loaded.latency.noise_problems) == 2  # the spread and the error


@pytest.mark.parametrize("lifted, left", [("--max-error", "spread"), ("--max-spread", "median error")])
def test_each_half_of_the_noise_check_refuses_alone(elastic_ckpt, monkeypatch, capsys, lifted, left):
    from flextron import latency
    from flextron.cli import main

    ckpt = elastic_ckpt()
    monkeypatch.setattr(latency, "measure", slowing_measure(20))
    assert main(["profile", str(ckpt), *PROFILE, lifted, "1000"]) == 2
    err = capsys.readouterr().err
    assert [part in err for part in ("spread", "median error")] == [left == "spread", left == "median error"]
    assert not (ckpt / "latency.json").exists()


def test_the_fit_design_predicts_uniform_sub_networks_better_than_independent_draws():
    # A 30-layer space like SmolLM2's; a known additive cost with 5% multiplicative timing noise.
    import types

    import numpy as np

    from flextron.latency import design_subnets
    from flextron.space import ElasticSpace

    space = ElasticSpace.default(30, 1536, 3, multiple=384)
    em = types.SimpleNamespace(space=space)

    def truth(s):
        return 8.0 + sum(0.9 * (m / 1536) ** 1.1 + 0.25 * a / 3 for m, a in zip(s.mlp, s.attn))

    uniform = [space.uniform(i, j) for i in range(4) for j in range(3)]
    rng = np.random.default_rng(0)
    worst = {"design": [], "independent": []}
    for seed in range(30):
        for name, draws in (("design", design_subnets(em, 10, seed)), ("independent", random_subnets(em, 10, seed))):
            nets = [space.full(), space.smallest(), *draws]
            y = [truth(s) * (1 + 0.05 * rng.standard_normal()) for s in nets]
            table = fit(space, nets, y).costs(space, "latency_ms")
            worst[name].append(max(abs(table(s) - truth(s)) / truth(s) for s in uniform))
    assert np.median(worst["design"]) < 0.7 * np.median(worst["independent"])
    assert sum(s in uniform for s in design_subnets(em, 10, 0)) >= 5  # half are uniform draws


def test_a_depth_space_fits_its_stock_graph_on_every_unskipped_uniform_sub_network():
    """With skips, few random draws are uniform and unskipped (what the stock graph holds): the stock fit
    takes all 16 of them rather than a cover of 7 validated on the rest, one by one."""
    em = make_elastic(min_layers=1)
    table, _, own = two_graph_table(em, samples=16)
    fitted = {json.dumps(m["subnet"]) for m in table.measurements if m["role"] == "fit-stock"}
    uniform = [Subnet(mlp=[w] * 2, attn=[a] * 2) for w in (24, 48, 72, 96) for a in (1, 2, 3, 4)]
    assert fitted == {json.dumps(s.to_dict()) for s in uniform}
    assert not any(m["role"] == "validate-stock" for m in table.measurements)
    error, which = table.stock.error("decode_ms")
    assert which == "fitted" and error["n"] == 16 and error["max_pct"] < 1e-6
    em.latency = table
    assert table.table("latency_ms")(uniform[5]) == pytest.approx(own(uniform[5])["decode_ms"])


def test_a_stock_graph_prices_the_sub_networks_the_runtime_runs_there():
    """llama.cpp can run uniform sub-networks (the full model included) in the family's own graph as
    well as in deci, and runs the others as deci: a uniform one is priced in the graph the table says
    decodes it faster, which is the graph export writes, and budgets are fractions of the full model
    in that graph."""
    from flextron.budgets import uniform_subnet_for
    from flextron.cost import fits
    from flextron.gguf import per_layer_graph
    from flextron.routers import Choices, project

    em = make_elastic()
    table, deci, own = two_graph_table(em)

    def best(s):
        return min(own(s)["decode_ms"], deci(s)["decode_ms"])

    assert table.stock_graph == "llama"
    stock_rows = [m for m in table.measurements if m["role"].endswith("-stock")]
    assert stock_rows and all(len(set(m["subnet"]["mlp"])) == 1 for m in stock_rows)
    for fitted in (table.main, table.stock):
        assert fitted.validation["decode_ms"]["max_pct"] < 1e-6
    em.latency = table
    cost = table.table("latency_ms")
    full, small, mixed = em.space.full(), em.space.smallest(), Subnet(mlp=[96, 48], attn=[4, 2])
    assert own(small)["decode_ms"] < deci(small)["decode_ms"] and deci(full)["decode_ms"] < own(full)["decode_ms"]
    assert table.runs_in_stock(small) and not table.deci_faster(small)
    assert table.deci_faster(full) and not table.runs_in_stock(full)
    assert not table.deci_faster(mixed) and not table.runs_in_stock(mixed)  # only deci holds it
    assert [per_layer_graph(em, s, "auto") for s in (small, full)] == [False, True]
    assert per_layer_graph(em, small, "deci") and not per_layer_graph(em, full, "own")
    with pytest.raises(FlextronError, match="graph cannot hold this sub-network"):
        per_layer_graph(em, mixed, "own")
    assert cost.full == pytest.approx(deci(full)["decode_ms"])  # a budget's 100% is the full model as deci
    assert cost.smallest == pytest.approx(own(small)["decode_ms"])
    assert cost(mixed) == pytest.approx(deci(mixed)["decode_ms"])
    # Every metric prices a uniform sub-network in the graph export writes (chosen by decode).
    prefill = table.table("prefill_ms")
    assert prefill(full) == pytest.approx(deci(full)["prefill_ms"])
    assert prefill(small) == pytest.approx(own(small)["prefill_ms"])
    # The largest uniform sub-network within a budget is chosen by its time in its faster graph.
    target = own(Subnet(mlp=[48, 48], attn=[3, 3]))["decode_ms"]
    chosen, chosen_ms = uniform_subnet_for(em, Budget(metric="latency_ms", value=target))
    assert chosen_ms == pytest.approx(best(chosen)) and chosen_ms <= target + 1e-9
    assert all(best(em.space.uniform(i, j)) > target for i in range(4) for j in range(4)
               if em.space.uniform(i, j).mlp[0] > chosen.mlp[0] and em.space.uniform(i, j).attn[0] >= chosen.attn[0])
    # Projection never widens onto a sub-network whose time in its graph breaks the budget.
    for w in (24, 48, 72, 96):
        logits = torch.full((2, 4), -5.0)
        logits[:, [24, 48, 72, 96].index(w)] = 0.0
        target = deci(Subnet(mlp=[w, w], attn=[4, 4]))["decode_ms"] + 1.0
        assert fits(cost(project(em.space, cost, Choices(logits, torch.zeros(2, 4)), target)), target)


NOISE = {"full_model_ms": [{"decode_ms": 10.0, "prefill_ms": 50.0}] * 2, "spread_pct": {"decode_ms": 0.0,
          "prefill_ms": 0.0}, "max_spread_pct": 30.0, "max_error_pct": 15.0, "passed": True, "forced": False}


def _fitted_table(em) -> dict:
    fitted = {"overhead": 5.0, "mlp": {"24": 0.0, "48": 1.0, "72": 2.0, "96": 3.0},
              "attn": {"1": 0.0, "2": 0.5, "3": 1.0, "4": 1.5}}
    return {"runtime": "hf-eager", "decode_ms": fitted, "prefill_ms": json.loads(json.dumps(fitted)),
            "validation": {"decode_ms": {"median_pct": 1.0, "max_pct": 2.0, "n": 2}}}


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.pop("decode_ms"), "decode_ms is missing"),
    (lambda t: t["decode_ms"].update(overhead="5"), "decode_ms.overhead must be a finite number"),
    (lambda t: t["prefill_ms"].update(mlp={}), "prefill_ms.mlp must map each choice"),
    (lambda t: t["decode_ms"]["mlp"].pop("96"), "lacks choice 96"),
    (lambda t: t["decode_ms"]["attn"].update({"x": 1.0}), "decode_ms.attn must map each choice"),
    (lambda t: t.update(stock={"graph": "llama"}), "stock.decode_ms is missing"),
    (lambda t: t.update(stock={"decode_ms": {}}), "stock.graph must name"),
    (lambda t: t["decode_ms"].update(overhead=-1e6), "prices the full model at"),
    (lambda t: t.update(measurements=[{"role": "fit"}]), r"measurements\[0\].subnet is missing"),
    (lambda t: t.update(validation={"decode_ms": {"n": "2"}}), "validation.decode_ms.n must be a whole number"),
    (lambda t: t["decode_ms"].update(proportional={"overhead": 1.0, "mlp": {"24": 0.0}, "attn": {"1": 0.0}}),
     "decode_ms.proportional.mlp must price the same choices as decode_ms.mlp"),
    # More of a wider choice proportional to the hidden size than the choice costs: dearer at a smaller size.
    (lambda t: t["decode_ms"].update(proportional={"overhead": 1.0, "mlp": {"24": 0.0, "48": 2.0, "72": 2.0, "96": 3.0},
                                                   "attn": {"1": 0.0, "2": 0.5, "3": 1.0, "4": 1.5}}),
     r"decode_ms decreases with width \(or hidden size\)"),
    (lambda t: t.update(measurements=[{"role": "fit", "subnet": {"mlp": [24], "attn": [1], "hidden": "32"},
                                       "decode_ms": 1.0, "prefill_ms": 1.0}]), "needs a role and a subnet"),
    (lambda t: t.update(measurements=[{"role": "fit", "subnet": {"mlp": [24], "attn": [1]}, "decode_ms": 0.0,
                                       "prefill_ms": 1.0}]), r"measurements\[0\].decode_ms must be a positive time"),
    (lambda t: t.update(validation_by_hidden={"decode_ms": {"half": {"n": 1}}}),
     "validation_by_hidden.decode_ms must map each hidden size"),
    (lambda t: t.update(noise={**NOISE, "full_model_ms": []}), "noise.full_model_ms must be a non-empty list"),
    (lambda t: t.update(noise={**NOISE, "spread_pct": {"decode_ms": 1.0}}), "noise.spread_pct.prefill_ms must be"),
    (lambda t: t.update(noise={**NOISE, "forced": "yes"}), "noise.passed and noise.forced must be true or false"),
    (lambda t: t.update(outtype="q3"), "outtype must be one of f32, .*, q4_k_m, q4_0, not 'q3'"),
    (lambda t: t.update(reference={"decode_ms": 20.0}), "reference.prefill_ms must be a finite number, not None"),
])
def test_a_damaged_table_is_refused_in_one_line_naming_the_file(tmp_path, damage, message):
    em = make_elastic()
    table = _fitted_table(em)
    damage(table)
    path = tmp_path / "latency.json"
    path.write_text(json.dumps(table))
    with pytest.raises(FlextronError, match=message) as e:
        LatencyTable.load(tmp_path, em)
    assert str(path) in str(e.value) and "re-run `flextron profile`" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("{x", "not readable JSON"),
    ("null", "the table is missing or not a JSON object"),
])
def test_an_unreadable_table_is_refused_in_one_line(tmp_path, text, message):
    (tmp_path / "latency.json").write_text(text)
    with pytest.raises(FlextronError, match=message):
        LatencyTable.load(tmp_path, make_elastic())


def test_a_loaded_table_prices_by_one_cost_table_per_metric_and_round_trips(tmp_path):
    em = make_elastic()
    table = LatencyTable(_fitted_table(em), em)
    assert table.table("latency_ms") is table.table("latency_ms")  # built once, not per budget lookup
    assert table.table("latency_ms")(em.space.full()) == pytest.approx(5.0 + 2 * (3.0 + 1.5))
    assert LatencyTable.load(table.save(tmp_path), em).to_dict() == table.to_dict()
    assert LatencyTable.load(tmp_path / "none", em) is None
    # A table profiled before the noise check has no record of it, and nothing fails it.
    assert table.noise is None and table.noise_problems == []
    checked = LatencyTable({**_fitted_table(em), "noise": NOISE}, em)
    assert checked.noise.to_dict() == NOISE and checked.noise_problems == []
    assert LatencyTable.load(checked.save(tmp_path), em).noise == checked.noise


def test_latency_budgets_hold_at_the_weight_type_their_llamacpp_table_was_timed_at(tmp_path):
    """A llama.cpp table records its weight type; GGUF weights of another type are refused for budgets it
    prices, in one line naming both fixes. Analytic budgets and HF tables (no weight type, as every table
    profiled in HF) take any type."""
    em = make_elastic()
    table = LatencyTable({**_fitted_table(em), "runtime": "llama.cpp (llama-cpp-python 0.3)", "outtype": "q4_k_m"}, em)
    assert LatencyTable.load(table.save(tmp_path), em).outtype == "q4_k_m"
    for metric in QUANTITY:
        check_weight_type(table, metric, "q4_k_m")
        with pytest.raises(FlextronError) as refused:
            check_weight_type(table, metric, "f32")
        message = str(refused.value)
        assert f"the {metric} budgets are priced by the llama.cpp latency table timed at q4_k_m weights, not f32" \
            in message and "--outtype q4_k_m" in message and "--runtime llama.cpp --outtype f32" in message
        assert "\n" not in message
    check_weight_type(table, "params", "f32")
    check_weight_type(table, "latency_ms", None)
    hf = LatencyTable(_fitted_table(em), em)
    assert hf.outtype is None
    check_weight_type(hf, "latency_ms", "q4_k_m")
    check_weight_type(None, "latency_ms", "q4_k_m")


def test_no_module_reads_the_latency_table_by_key_outside_latency_table():
    """Readers go through `LatencyTable` (its fits, errors, settings); only it parses latency.json."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    by_key = re.compile(r"""(latency|table)\[["'](decode_ms|prefill_ms|stock|validation|fit_error|measurements|"""
                        r"""overhead|runtime|threads|outtype|device|dtype|batch|context)["']\](?!\s*=[^=])|\.latency\.get\(""")
    offenders = [f"{path.relative_to(root)}:{i}" for folder in ("src", "benchmarks")
                 for path in sorted((root / folder).rglob("*.py")) if path.name != "latency_table.py"
                 for i, line in enumerate(path.read_text().splitlines(), 1) if by_key.search(line)]
    assert not offenders, offenders
