"""Routers (flextron.routers): the budget encoding, Gumbel choices, the projection onto a budget,
static routers' shapes and priors, and trained routers as the budgets and checkpoints use them."""

import pytest
import torch

from flextron.budgets import cost_table, select_subnet, uniform_subnet_for
from flextron.checkpoint import load_checkpoint, save_checkpoint
from flextron.errors import FlextronError
from flextron.latency_table import LatencyTable
from flextron.options import RouteOptions
from flextron.routers import (
    ROUTER_WEIGHTS,
    Choices,
    Routers,
    StaticRouter,
    decode,
    encode_budget,
    expected_cost,
    gumbel,
    project,
)
from flextron.space import Budget, ElasticSpace, Subnet
from helpers import make_elastic


def test_budget_encoding_interpolates_between_grid_neighbours():
    grid = torch.tensor([0.4, 0.6, 0.8, 1.0], dtype=torch.float64)
    assert encode_budget(grid, 0.6).tolist() == [0, 1, 0, 0]
    assert torch.allclose(encode_budget(grid, 0.7), torch.tensor([0, 0.5, 0.5, 0]))
    assert torch.allclose(encode_budget(grid, 0.45), torch.tensor([0.75, 0.25, 0, 0]))
    assert encode_budget(grid, 0.1).tolist() == [1, 0, 0, 0]
    assert encode_budget(grid, 1.0).tolist() == [0, 0, 0, 1]


def test_gumbel_is_one_hot_forward_with_soft_gradient_and_skips_masked():
    logits = torch.tensor([[0.0, 1.0, float("-inf")], [2.0, 0.0, 0.0]], requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    y = gumbel(logits, 1.0, gen)
    assert ((y == 0) | (y == 1)).all() and (y.sum(-1) == 1).all() and y[0, 2] == 0
    (y * torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])).sum().backward()
    assert logits.grad is not None and logits.grad[:, :2].abs().sum() > 0
    # Low temperature follows the logits: a strongly preferred choice wins almost always.
    wins = sum(gumbel(torch.tensor([[5.0, 0.0]]), 0.1, gen)[0, 0].item() for _ in range(200))
    assert wins > 190


def test_projection_meets_the_budget():
    em = make_elastic()
    table = cost_table(em, "params")
    full = table.full
    gen = torch.Generator().manual_seed(3)
    for fraction in (0.3, 0.5, 0.7, 0.9):
        lm = torch.randn(2, 4, generator=gen).log_softmax(-1)
        la = torch.randn(2, 4, generator=gen).log_softmax(-1)
        sub = project(em.space, table, Choices(lm, la), fraction * full, slack=0.05)
        cost = table(sub)
        assert cost <= fraction * full
        # Not far below either, unless one more step of any layer would overshoot.
        assert cost >= fraction * full * 0.95 or all(
            table(s) > fraction * full for s in _one_step_up(em.space, sub))


def _one_step_up(space, sub):
    for kind in ("mlp", "attn"):
        for layer, value in enumerate(getattr(sub, kind)):
            choices = getattr(space, kind)[layer]
            i = choices.index(value)
            if i + 1 < len(choices):
                up = type(sub)(mlp=list(sub.mlp), attn=list(sub.attn))
                getattr(up, kind)[layer] = choices[i + 1]
                yield up


def test_routers_roundtrip_through_the_checkpoint(trained_routers, tmp_path):
    em, routers, _, tok = trained_routers
    save_checkpoint(em, tok, tmp_path / "ckpt", {"source_model": "tiny"})
    loaded, _, _ = load_checkpoint(tmp_path / "ckpt")
    assert loaded.routers is not None and loaded.routers.metric == "params"
    for f in (0.5, 0.8):
        assert select_subnet(loaded, Budget(fraction=f)) == select_subnet(em, Budget(fraction=f))
    # Without routers a budget falls back to the largest uniform sub-network.
    loaded.routers = None
    assert select_subnet(loaded, Budget(fraction=0.5)) == uniform_subnet_for(loaded, Budget(fraction=0.5))[0]


def test_router_output_shapes_follow_the_space():
    space = ElasticSpace(mlp=[[8, 16, 96], [48, 96]], attn=[[1, 4], [2, 4]])
    router = StaticRouter(space, (0.5, 1.0))
    mlp, attn, hidden = router(0.7)
    assert mlp.shape == (2, 3) and attn.shape == (2, 2) and hidden is None
    assert torch.isinf(mlp[1, 2]) and torch.isfinite(mlp[0]).all()


def test_a_prior_sets_the_argmax_at_its_grid_budget_and_survives_a_reload(tmp_path):
    from safetensors.torch import load_file, save_file

    em = make_elastic("llama", n_layers=3, min_layers=1)
    router = StaticRouter(em.space, (0.5, 1.0))
    start = em.space.uniform(1, 2, 1, 0)
    router.set_prior(0.5, start, 3.0)
    assert decode(em.space, router(0.5)) == start
    assert router.prior[1].abs().sum() == 0  # the other grid budget keeps its own logits
    mlp = router(0.5).mlp
    # Logits fall with the distance from the start: the next width is a likelier draw than a skip.
    assert mlp[0, 2] > mlp[0, 3] > mlp[0, 0] and mlp[0, 2] - mlp[0, 0] > 5
    Routers(router, "params", RouteOptions(budgets=(0.5, 1.0))).save(tmp_path)
    loaded = Routers.load(tmp_path, em.space).static
    assert torch.equal(loaded.prior, router.prior) and decode(em.space, loaded(0.5)) == start
    # Routers saved before priors existed load with none: their logits are what they were.
    state = load_file(tmp_path / ROUTER_WEIGHTS)
    del state["prior"]
    save_file(state, tmp_path / ROUTER_WEIGHTS)
    old = Routers.load(tmp_path, em.space).static
    assert old.prior.abs().sum() == 0
    assert all(torch.equal(a, b) for a, b in zip(old(1.0)[:2], router(1.0)[:2]))


def test_projection_never_skips_below_the_floor():
    em = make_elastic(n_layers=4, min_layers=2)
    table = cost_table(em, "params")
    full = table.full
    smallest = table.smallest
    skip_first = torch.tensor([[0.0, -9, -9, -9, -9]] * 4)  # the router wants every sub-layer skipped
    for fraction in (smallest / full, 0.5, 0.9):
        sub = project(em.space, table, Choices(skip_first, skip_first), fraction * full)
        em.space.validate(sub)
        assert table(sub) <= fraction * full * (1 + 1e-9)
    assert decode(em.space, Choices(skip_first, skip_first)) == em.space.floor(Subnet(mlp=[0] * 4, attn=[0] * 4))


def test_budget_in_another_metric_starts_from_router_preferences_of_that_size(trained_routers):
    from flextron.budgets import router_fraction

    em, routers, _, _ = trained_routers
    # A latency table where attention dominates: 50% of the latency is not 50% of the params.
    mlp = {"24": 0.0, "48": 0.1, "72": 0.2, "96": 0.3}
    attn = {"1": 0.0, "2": 2.0, "3": 4.0, "4": 6.0}
    em.latency = LatencyTable({"decode_ms": {"overhead": 1.0, "mlp": mlp, "attn": attn}, "prefill_ms": {
        "overhead": 1.0, "mlp": mlp, "attn": attn}}, em)
    try:
        params = cost_table(em, "params")
        assert router_fraction(em, params, 0.6 * params.full) == pytest.approx(0.6)
        latency = cost_table(em, "latency_ms")
        full = latency.full
        for f in (0.5, 0.7):
            target = f * full
            r = router_fraction(em, latency, target)
            # The router's own choice at that budget fits the latency target, a slightly larger one does not.
            assert latency(decode(em.space, routers.static(r))) <= target
            assert r == 1.0 or latency(decode(em.space, routers.static(min(1.0, r + 0.02)))) > target
            chosen = select_subnet(em, Budget.parse(f"latency_ms={f:.0%}"))
            assert latency(chosen) <= target
    finally:
        em.latency = None


def test_between_checked_budgets_what_the_check_below_kept_is_served(trained_routers):
    em, _, _, _ = trained_routers
    table = cost_table(em, "params")
    checked = uniform_subnet_for(em, Budget(fraction=0.5))[0]
    wider = uniform_subnet_for(em, Budget(fraction=0.9))[0]
    assert wider != checked and table(wider) > table(checked)
    try:
        for kept in ("uniform", "lower budget"):
            em.routers.checked = [{"budget": 0.5, "kept": kept, "subnet": checked.to_dict(), "calib_ppl": {}}]
            for f in (0.5, 0.7, 0.9):  # not the largest uniform at 90%: that shape was never measured
                assert select_subnet(em, Budget(fraction=f)) == checked
        em.routers.checked = None
        routed = select_subnet(em, Budget(fraction=0.5))  # the router's projection, as checked at 50%
        assert routed != select_subnet(em, Budget(fraction=0.9))
        em.routers.checked = [{"budget": 0.5, "kept": "router", "subnet": routed.to_dict(), "calib_ppl": {}}]
        for f in (0.5, 0.7, 0.9):  # not the router's projection at 90%: never measured either
            assert select_subnet(em, Budget(fraction=f)) == routed
        # Re-profiled since, the stored sub-network no longer fits: a kept uniform is the rule at the
        # checked budget; a lower budget's defers to the checks below (none: the baseline of the budget).
        em.routers.checked[0].update(kept="uniform", subnet=em.space.full().to_dict())
        assert select_subnet(em, Budget(fraction=0.9)) == checked
        em.routers.checked[0]["kept"] = "lower budget"
        assert select_subnet(em, Budget(fraction=0.9)) == wider
        # Below every checked budget: the largest uniform sub-network, the baseline itself.
        assert select_subnet(em, Budget(fraction=0.45)) == uniform_subnet_for(em, Budget(fraction=0.45))[0]
    finally:
        em.routers.checked = None


def test_a_budget_in_another_metric_gets_the_largest_checked_sub_network_that_fits_it(trained_routers):
    em, _, _, _ = trained_routers
    flops = cost_table(em, "flops")
    grid = (0.4, 0.6, 0.8, 1.0)
    kept = [select_subnet(em, Budget(fraction=f)) for f in grid]  # the router's projections, as checked
    unchecked = {f: select_subnet(em, Budget(metric="flops", fraction=f)) for f in (0.5, 0.7, 0.9)}
    try:
        em.routers.checked = [{"budget": f, "kept": "router", "subnet": s.to_dict(), "calib_ppl": {}}
                              for f, s in zip(grid, kept)]
        served = {f: select_subnet(em, Budget(metric="flops", fraction=f)) for f in unchecked}
        for f, subnet in served.items():
            # The kept perplexity never rises with the checked budget: the largest that fits is the best.
            assert subnet == [s for s in kept if flops(s) <= f * flops.full][-1]
        assert any(served[f] != unchecked[f] for f in served)  # projected in flops, they were never measured
        lowest = min(flops(s) for s in kept) / flops.full * 0.99  # below them all: the baseline of the budget
        budget = Budget(metric="flops", fraction=lowest)
        assert select_subnet(em, budget) == uniform_subnet_for(em, budget)[0]
    finally:
        em.routers.checked = None


@pytest.mark.parametrize("damage, message", [
    (lambda c: c.update(metric="joules"), "metric 'joules' is not one of params"),
    (lambda c: c.pop("metric"), "metric None is not one of"),
    (lambda c: c.update(budgets=[]), "--budgets needs at least one value"),
    (lambda c: c.update(steps="many"), "--steps must be an integer"),
    (lambda c: c.update(checked=[{"budget": 0.5, "kept": "uniform", "subnet": {"mlp": [999, 96], "attn": [4, 4]}}]),
     r"checked\[0\]: layer 0 MLP width 999 is not in the elastic space"),
    (lambda c: c.update(checked=[{"budget": "half", "kept": "router", "subnet": {}}]), r"checked\[0\] needs a budget"),
    (lambda c: c.update(checked={"a": 1}), "checked must be a list"),
])
def test_damaged_routers_are_refused_in_one_line_when_loaded(tmp_path, damage, message):
    import json

    em = make_elastic("llama")
    Routers(StaticRouter(em.space, (0.5, 1.0)), "params", RouteOptions(budgets=(0.5, 1.0))).save(tmp_path)
    cfg = json.loads((tmp_path / "routers.json").read_text())
    damage(cfg)
    (tmp_path / "routers.json").write_text(json.dumps(cfg))
    with pytest.raises(FlextronError, match=message) as e:
        Routers.load(tmp_path, em.space)
    assert "re-run `flextron route`" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "routers.json").write_text("[" * 100_000)  # nested past the parser's recursion limit
    with pytest.raises(FlextronError, match="unreadable"):
        Routers.load(tmp_path, em.space)


def hidden_elastic():
    em = make_elastic()
    em.set_space(em.space.with_hidden(em.hidden_size, (0.5, 0.75, 1.0), 16))  # 32, 48, 64 channels
    return em


def test_a_router_over_hidden_sizes_outputs_and_keeps_a_hidden_choice(tmp_path):
    em = hidden_elastic()
    router = StaticRouter(em.space, (0.5, 1.0))
    assert router(0.7).hidden.shape == (3,) and router.n_choices == 2 * 4 + 2 * 4 + 3
    start = em.space.uniform(1, 2, hidden_index=0)
    router.set_prior(0.5, start, 3.0)
    assert decode(em.space, router(0.5)) == start and start.hidden == 32
    Routers(router, "params", RouteOptions(budgets=(0.5, 1.0))).save(tmp_path)
    assert decode(em.space, Routers.load(tmp_path, em.space).static(0.5)) == start


def test_expected_cost_prices_the_hidden_choice_with_its_own_table():
    em = hidden_elastic()
    table = cost_table(em, "params")
    for sub in (em.space.smallest(), em.space.uniform(2, 1, hidden_index=1), em.space.full()):
        onehot = Choices(*(torch.nn.functional.one_hot(torch.tensor([c.index(x) for c, x in zip(choices, taken)]),
                                                       4).float() for choices, taken in ((em.space.mlp, sub.mlp),
                                                                                         (em.space.attn, sub.attn))),
                         torch.nn.functional.one_hot(torch.tensor(em.space.hidden_index(sub)), 3).float())
        assert expected_cost(table, onehot).item() == pytest.approx(table(sub))
    assert table(em.space.uniform(3, 3, hidden_index=0)) < table(em.space.full())


def test_projection_moves_the_hidden_size_like_any_choice():
    em = hidden_elastic()
    table = cost_table(em, "params")
    full, wide = table.full, torch.tensor([[-9.0, -9, -9, 0]] * 2)
    narrow_stream = Choices(wide, wide, torch.tensor([0.0, -9, -9]))  # full widths, the smallest hidden size
    wide_stream = Choices(torch.tensor([[0.0, -9, -9, -9]] * 2), torch.tensor([[0.0, -9, -9, -9]] * 2),
                          torch.tensor([-9.0, -9, 0]))  # narrow widths, the full hidden size
    for fraction in (0.5, 0.7, 0.9):
        for logp in (narrow_stream, wide_stream):
            sub = project(em.space, table, logp, fraction * full)
            assert table(sub) <= fraction * full * (1 + 1e-9)
    # Full widths at the smallest hidden size fit half the model: the router's choice stays.
    assert project(em.space, table, narrow_stream, 0.5 * full) == em.space.uniform(3, 3, hidden_index=0)
    # Where even the narrowest widths at the full hidden size do not fit, the hidden size steps down.
    assert project(em.space, table, wide_stream, table(em.space.uniform(0, 0)) * 0.9).hidden is not None
