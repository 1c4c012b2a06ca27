import dataclasses
import json

import pytest

from flextron.budgets import (
    budget_grid,
    budget_metric,
    budget_target,
    cost_table,
    select_subnet,
    smallest_fraction,
    uniform_candidates,
    uniform_subnet_for,
)
from flextron.cost import analytic_table, subnet_cost
from flextron.deployment import Deployment
from flextron.errors import FlextronError
from flextron.latency_table import LatencyTable
from flextron.space import Budget, Subnet
from helpers import make_elastic

FITTED = {"overhead": 1.0, "mlp": {"24": 0.0, "48": 0.1, "72": 0.2, "96": 0.3},
          "attn": {"1": 0.0, "2": 2.0, "3": 4.0, "4": 6.0}}


def test_uniform_budget_picks_largest_within():
    em = make_elastic("llama")
    full = subnet_cost(em).params_nonembed
    for fraction in (1.0, 0.75, 0.5):
        sub, value = uniform_subnet_for(em, Budget.parse(fraction))
        assert value == subnet_cost(em, sub).params_nonembed <= fraction * full
        # No uniform sub-network within the budget is bigger.
        for i in range(4):
            for j in range(4):
                c = subnet_cost(em, em.space.uniform(i, j)).params_nonembed
                assert c <= value or c > fraction * full
    assert uniform_subnet_for(em, Budget.parse("1.0"))[0] == em.space.full()


def test_uniform_budget_prefers_the_wider_of_equal_costs():
    """A fitted latency table may price a width step at 0 (timing noise, non-negative fit): the full
    model is then still the largest uniform sub-network at budget 1.0, not a narrower one of equal cost."""
    em = make_elastic("llama")
    flat = {**FITTED, "attn": {**FITTED["attn"], "4": FITTED["attn"]["3"]}}
    em.latency = LatencyTable({"decode_ms": flat, "prefill_ms": flat}, em)
    assert uniform_subnet_for(em, Budget(metric="latency_ms", fraction=1.0))[0] == em.space.full()


def test_budget_below_smallest_is_refused():
    with pytest.raises(FlextronError, match="below the smallest sub-network"):
        uniform_subnet_for(make_elastic("llama"), Budget.parse("0.01"))


def test_budget_grid_spans_the_feasible_range():
    em = make_elastic("llama")
    low = smallest_fraction(em, "params")
    grid = budget_grid(em, "params", points=5)
    assert grid[-1] == 1.0 and len(grid) == 5
    assert low <= grid[0] < low + 0.05 + 1e-9
    assert list(grid) == sorted(grid)
    for b in grid:  # every grid budget resolves
        uniform_subnet_for(em, Budget(fraction=b))


def test_uniform_budget_skips_layers_in_importance_order():
    em = make_elastic("llama", n_layers=4, min_layers=1)
    em.set_space(dataclasses.replace(em.space, skip_order={"mlp": [1, 2, 3, 0], "attn": [2, 1, 3, 0]}))
    full = subnet_cost(em).params_nonembed
    smallest = subnet_cost(em, em.space.smallest()).params_nonembed
    assert em.space.smallest() == Subnet(mlp=[24, 0, 0, 0], attn=[1, 0, 0, 0])
    for fraction in (0.9, 0.6, 0.3, smallest / full):
        sub, value = uniform_subnet_for(em, Budget(metric="params", fraction=fraction))
        assert value <= fraction * full * (1 + 1e-9)
        for kind, order in em.space.skip_order.items():
            skipped = [i for i in order if getattr(sub, kind)[i] == 0]
            assert skipped == order[: len(skipped)]  # always a prefix of the skip order
    assert uniform_subnet_for(em, Budget(metric="params", fraction=smallest / full))[0] == em.space.smallest()


def test_uniform_candidates_are_the_maximal_uniform_sub_networks_within_a_budget():
    em = make_elastic("llama", n_layers=4, min_layers=1)
    table = cost_table(em, "params")
    space = em.space
    every = [space.uniform(i, j, sm, sa) for i in range(4) for j in range(4) for sm in range(4) for sa in range(4)]
    for fraction in (0.9, 0.6, 0.35):
        target = fraction * table.full
        found = uniform_candidates(em, table, target, skip_points=4)  # skip counts 0-3: every one
        fits = [s for s in every if table(s) <= target * (1 + 1e-9)]
        assert found and all(s in fits for s in found)
        assert uniform_subnet_for(em, Budget(metric="params", fraction=fraction))[0] in found
        # Maximal: no other uniform sub-network within the budget is at least as wide in every layer.
        for s in found:
            assert not any(o != s and all(a >= b for a, b in zip(o.mlp + o.attn, s.mlp + s.attn)) for o in fits)
        assert any(0 in s.mlp + s.attn for s in found) and any(0 not in s.mlp + s.attn for s in found)
    no_depth = make_elastic("llama", n_layers=4)
    assert all(0 not in s.mlp + s.attn for s in uniform_candidates(no_depth, cost_table(no_depth, "params"), 0.5 *
                                                                   cost_table(no_depth, "params").full))


def test_latency_budget_without_table_says_what_to_do():
    with pytest.raises(FlextronError, match="run `flextron profile CKPT` first"):
        budget_target(make_elastic(), Budget.parse("latency_ms=20"))
    assert budget_metric(make_elastic(), Budget.parse("0.5")) == "params"


def test_cost_table_is_the_measured_table_where_profiled_else_the_analytic_one():
    em = make_elastic()
    assert cost_table(em, "flops") == analytic_table(em, "flops")
    with pytest.raises(FlextronError, match="unknown cost metric 'joules'; use one of params, .*, prefill_ms"):
        cost_table(em, "joules")
    em.latency = LatencyTable({"decode_ms": FITTED, "prefill_ms": FITTED}, em)
    assert cost_table(em, "latency_ms") is em.latency.table("latency_ms")
    assert budget_metric(em, Budget.parse("0.5")) == "latency_ms"  # measured latency is the default


def test_a_budget_target_is_a_fraction_of_the_full_cost_in_its_metric():
    em = make_elastic()
    em.latency = LatencyTable({"decode_ms": FITTED, "prefill_ms": FITTED}, em)
    table, target = budget_target(em, Budget.parse("0.5"))
    assert table.metric == "latency_ms" and target == pytest.approx(0.5 * table.full)
    table, target = budget_target(em, Budget.parse("params=90%"))
    assert table.metric == "params" and target == pytest.approx(0.9 * table.full)
    assert select_subnet(em, Budget.parse("0.5")) == uniform_subnet_for(em, Budget.parse("0.5"))[0]


def test_a_small_params_budget_is_met_at_a_smaller_hidden_size():
    """Below the smallest uniform sub-network of the full hidden size only a smaller hidden size fits:
    prune-only budgets pick it (the costliest uniform sub-network within the budget, over every hidden
    size), and the feasible range reaches down to the smallest hidden size."""
    em = make_elastic("llama")
    em.set_space(em.space.with_hidden(em.hidden_size, (0.5, 0.75, 1.0), 16))
    table = cost_table(em, "params")
    floor_at_full = table.at_hidden(2).smallest  # smallest widths at hidden size 64
    assert smallest_fraction(em, "params") == table.smallest / table.full < floor_at_full / table.full
    every = [em.space.uniform(i, j, hidden_index=h) for i in range(4) for j in range(4) for h in range(3)]
    for fraction in (0.9 * floor_at_full / table.full, 0.5, 0.9):
        budget = Budget(metric="params", fraction=fraction)
        sub, value = uniform_subnet_for(em, budget)
        target = fraction * table.full
        assert value == table(sub) <= target and select_subnet(em, budget) == sub
        assert value == max(table(s) for s in every if table(s) <= target)
        found = uniform_candidates(em, table, target)
        assert sub in found and all(table(s) <= target for s in found)
        for s in found:  # maximal: neither a wider index nor a larger hidden size of it fits
            i, j, h = em.space.mlp[0].index(s.mlp[0]), em.space.attn[0].index(s.attn[0]), em.space.hidden_index(s)
            assert all(table(em.space.uniform(*k)) > target for k in ((i + 1, j, 0, 0, h), (i, j + 1, 0, 0, h),
                                                                        (i, j, 0, 0, h + 1)) if max(k) < 4 and k[4] < 3)
    assert uniform_subnet_for(em, Budget(metric="params", fraction=0.9 * floor_at_full / table.full))[0].hidden < 64
    assert budget_grid(em, "params")[0] < floor_at_full / table.full


def test_a_memory_budget_selects_the_largest_uniform_sub_network_within_it():
    """memory_mb=N: the largest uniform sub-network whose llama.cpp memory at the model's deployment is
    within N megabytes; the next larger one is not. Smaller weights fit more of the model in as much."""
    em = make_elastic("llama")
    every = [em.space.uniform(i, j) for i in range(4) for j in range(4)]
    chosen = {}
    for weight_type in ("f32", "q8_0"):
        em.deployment = Deployment(weight_type, 512)
        table = cost_table(em, "memory_mb")
        for k in range(5):
            n = table.smallest + (table.full - table.smallest) * k / 4
            sub = select_subnet(em, Budget.parse(f"memory_mb={n!r}"))
            assert table(sub) <= n and all(table(s) > n for s in every if table(s) > table(sub))
            assert sub == select_subnet(em, Budget.parse(f"memory={n * 1000!r}KB"))
        n = 0.5 * (analytic_table(em, "memory_mb", deployment=Deployment("f32", 512)).full + table.smallest)
        chosen[weight_type] = subnet_cost(em, select_subnet(em, Budget(metric="memory_mb", value=n))).params
    assert chosen["q8_0"] > chosen["f32"]  # q8_0 weights: a larger sub-network within the same megabytes
    em.deployment = Deployment("f32", 512)
    with pytest.raises(FlextronError, match=r"memory_mb at f32 weights, 512-token f16 KV cache, .*\(or memory_mb="):
        select_subnet(em, Budget(metric="memory_mb", value=cost_table(em, "memory_mb").smallest * 0.99))


def test_a_narrower_sub_network_that_costs_more_than_a_wider_one_within_the_budget_is_never_chosen():
    """At q4_0 an MLP width of 72 (rows not whole 32-blocks: f16) takes more memory than the full 96 (q4_0):
    a budget both fit serves the full model, which contains it."""
    em = make_elastic("llama")
    em.deployment = Deployment("q4_0", 512)
    table = cost_table(em, "memory_mb")
    narrower, full = em.space.uniform(2, 3), em.space.full()
    assert narrower.mlp == [72, 72] and table(narrower) > table(full)  # the premise
    assert select_subnet(em, Budget(metric="memory_mb", value=table(narrower))) == full


def test_routers_of_another_metric_serve_a_memory_budget(trained_routers):
    """Routers trained on params: a memory budget is one in another metric, served as such (what the check
    kept where it fits, else the router's choice projected onto it, in megabytes)."""
    em, routers, _, _ = trained_routers
    assert routers.metric == "params"
    em.deployment = Deployment("f32", 256)  # a short context: the tiny model's weights weigh the most
    try:
        table = cost_table(em, "memory_mb")
        for fraction in (0.8, 0.9, 1.0):
            for budget in (Budget.parse(f"memory_mb={fraction:.0%}"),
                           Budget(metric="memory_mb", value=fraction * table.full)):
                sub = select_subnet(em, budget)
                em.space.validate(sub)
                assert table(sub) <= fraction * table.full * (1 + 1e-9)
        assert table(select_subnet(em, Budget.parse("memory_mb=90%"))) > table(select_subnet(em, Budget.parse("0.4")))
    finally:
        em.deployment = Deployment()


def test_export_prices_a_memory_budget_at_the_weights_it_writes(elastic_ckpt, tmp_path):
    import gguf

    from flextron import api

    ckpt = elastic_ckpt(bpe=True)
    em = api.load(ckpt, "cpu")[0]
    f32 = analytic_table(em, "memory_mb", deployment=Deployment("f32", 512))
    n = (f32.smallest + f32.full) / 2
    written = {}
    for outtype in ("f32", "q8_0"):
        out = api.export(ckpt, f"memory={n!r}MB", tmp_path / f"{outtype}.gguf", format="gguf", outtype=outtype,
                         context=512)
        fields = gguf.GGUFReader(out).fields
        written[outtype] = Subnet(**json.loads(fields["flextron.subnet"].contents()))
        table = analytic_table(em, "memory_mb", deployment=Deployment(outtype, 512))
        assert table(written[outtype]) <= n
        recorded = Budget.parse(fields["flextron.budget"].contents())
        assert recorded.metric == "memory_mb" and recorded.value == pytest.approx(n)
    assert f32(written["q8_0"]) > f32(written["f32"])  # q8_0 weights: more of the model in as much memory
