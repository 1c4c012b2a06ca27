import json
import math
from dataclasses import replace

import pytest
import torch

from conftest import make_elastic, make_model, make_tokenizer, word_text
from flextron import api
from flextron.budgets import cost_table, select_subnet, smallest_fraction, uniform_candidates, uniform_subnet_for
from flextron.checkpoint import load_checkpoint, save_checkpoint
from flextron.config import Budget, ElasticSpace, RouterConfig, Subnet
from flextron.data import PackedSequences, tokenize
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.routers import ROUTER_WEIGHTS, Routers, StaticRouter, decode, encode_budget, gumbel, project
from flextron.train.loop import kd_loss
from flextron.train.routers import guided_fraction, train_routers, warm_start


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
        sub = project(em.space, table, lm, la, fraction * full, slack=0.05)
        cost = table(em.space, sub)
        assert cost <= fraction * full
        # Not far below either, unless one more step of any layer would overshoot.
        assert cost >= fraction * full * 0.95 or all(
            table(em.space, s) > fraction * full for s in _one_step_up(em.space, sub))


def _one_step_up(space, sub):
    for kind in ("mlp", "attn"):
        for layer, value in enumerate(getattr(sub, kind)):
            choices = getattr(space, kind)[layer]
            i = choices.index(value)
            if i + 1 < len(choices):
                up = type(sub)(mlp=list(sub.mlp), attn=list(sub.attn))
                getattr(up, kind)[layer] = choices[i + 1]
                yield up


@pytest.fixture(scope="module")
def trained():
    em = make_elastic()
    teacher = ElasticModel(make_model("llama"))  # the original, as `flextron route` uses it
    teacher.requires_grad_(False)
    tok = make_tokenizer()
    data = PackedSequences(tokenize(tok, word_text(3000)), 16, seed=0)
    # Tiny random models tell architectures apart only a little: a loose threshold lets the
    # surrogate guide some steps and not others (its error hovers around 0.3-0.5 here).
    cfg = RouterConfig(budgets=(0.4, 0.6, 0.8, 1.0), metric="params", steps=100, joint_steps=4, seq_len=16,
                       micro_batch=2, dtype="fp32", router_lr=1e-2, surrogate_warmup=32, surrogate_threshold=0.4)
    routers, log = train_routers(em, teacher, data, cfg, progress=False)
    em.routers = routers
    return em, routers, log, tok


def test_temperature_anneals_and_stages_follow(trained):
    _, _, log, _ = trained
    taus = [r["tau"] for r in log if r["stage"] == "router"]
    assert taus[0] == pytest.approx(5.0) and taus[-1] == pytest.approx(0.3)
    assert all(a >= b for a, b in zip(taus, taus[1:]))
    assert [r["stage"] for r in log[-4:]] == ["joint"] * 4
    stages = [r["stage"] for r in log]
    assert stages[:4] == ["warm start"] * 4  # one row per grid budget, before anything else
    log = log[4:]
    assert stages[4:36] == ["warmup"] * 32 and not any(r["surrogate_used"] for r in log[:32])
    # A step follows the surrogate exactly when its error before the step was under the threshold.
    for before, row in zip(log[31:], log[32:]):
        if row["stage"] == "router":
            assert row["surrogate_used"] == (before["surrogate_error"] < 0.4)
    assert 0 < guided_fraction(log) < 1


def test_router_meets_its_budgets(trained):
    em, routers, _, _ = trained
    table = cost_table(em, "params")
    full = table.full
    raw_costs = []
    for fraction in (0.4, 0.6, 0.8, 1.0):
        mlp, attn = routers.static(fraction)
        raw_costs.append(table(em.space, _argmax(em.space, mlp, attn)))
        # The router's own choice, before projection (two layers: few costs are reachable).
        assert abs(raw_costs[-1] / (fraction * full) - 1) < 0.15, (fraction, raw_costs[-1] / (fraction * full))
        chosen = table(em.space, select_subnet(em, Budget(fraction=fraction))) / (fraction * full)
        assert 0.75 <= chosen <= 1.0  # coarse steps: projection stops where no single step fits
    assert raw_costs == sorted(raw_costs)


def _argmax(space, mlp, attn):
    from flextron.routers import decode

    return decode(space, mlp, attn)


def test_routers_roundtrip_through_the_checkpoint(trained, tmp_path):
    em, routers, _, tok = trained
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
    mlp, attn = router(0.7)
    assert mlp.shape == (2, 3) and attn.shape == (2, 2)
    assert torch.isinf(mlp[1, 2]) and torch.isfinite(mlp[0]).all()


def test_a_prior_sets_the_argmax_at_its_grid_budget_and_survives_a_reload(tmp_path):
    from safetensors.torch import load_file, save_file

    em = make_elastic("llama", n_layers=3, min_layers=1)
    router = StaticRouter(em.space, (0.5, 1.0))
    start = em.space.uniform(1, 2, 1, 0)
    router.set_prior(0.5, start, 3.0)
    assert decode(em.space, *router(0.5)) == start
    assert router.prior[1].abs().sum() == 0  # the other grid budget keeps its own logits
    mlp, _ = router(0.5)
    # Logits fall with the distance from the start: the next width is a likelier draw than a skip.
    assert mlp[0, 2] > mlp[0, 3] > mlp[0, 0] and mlp[0, 2] - mlp[0, 0] > 5
    Routers(router, "params", RouterConfig(budgets=(0.5, 1.0))).save(tmp_path)
    loaded = Routers.load(tmp_path, em.space).static
    assert torch.equal(loaded.prior, router.prior) and decode(em.space, *loaded(0.5)) == start
    # Routers saved before priors existed load with none: their logits are what they were.
    state = load_file(tmp_path / ROUTER_WEIGHTS)
    del state["prior"]
    save_file(state, tmp_path / ROUTER_WEIGHTS)
    old = Routers.load(tmp_path, em.space).static
    assert old.prior.abs().sum() == 0
    assert all(torch.equal(a, b) for a, b in zip(old(1.0), router(1.0)))


def test_warm_start_begins_each_budget_where_the_loss_is_lowest():
    em = make_elastic("llama", n_layers=3, min_layers=1)
    teacher = ElasticModel(make_model("llama", n_layers=3))  # the same weights: the full model's kd is 0
    teacher.requires_grad_(False)
    ids = PackedSequences(tokenize(make_tokenizer(), word_text(600)), 16, seed=0).rows(0, 2)
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, use_cache=False).logits
    table = cost_table(em, "params")
    router = StaticRouter(em.space, (0.4, 0.7, 1.0))
    before = em.current
    rows = warm_start(em, router, table, ids, t_logits, 2.0, None, False)

    def kd(subnet):
        with em.subnet(subnet), torch.no_grad():
            return kd_loss(em(input_ids=ids, use_cache=False).logits, t_logits).item()

    assert [r["budget"] for r in rows] == pytest.approx([0.4, 0.7, 1.0]) and em.current == before
    for row in rows:
        chosen, target = Subnet(**row["subnet"]), row["budget"] * table.full
        assert table(em.space, chosen) <= target * (1 + 1e-9)
        assert row["kd"] == pytest.approx(kd(chosen), abs=1e-6)
        assert row["kd"] <= min(kd(c) for c in uniform_candidates(em, table, target)) + 1e-6
        assert decode(em.space, *router(row["budget"])) == chosen  # the router starts there
    assert rows[-1]["start"] == "uniform" and rows[-1]["kd"] == pytest.approx(0.0, abs=1e-6)


def test_route_end_to_end_through_the_cli(tmp_path, capsys):
    from flextron.cli import main
    from flextron.options import read_yaml

    em = make_elastic()
    tok = make_tokenizer()
    ckpt = save_checkpoint(em, tok, tmp_path / "ckpt", {"source_model": "tiny"})
    data = tmp_path / "data.txt"
    data.write_text(word_text(3000))
    assert main(["route", str(ckpt), "--out", str(tmp_path / "routed"), "--data", str(data), "--steps", "20",
                 "--joint-steps", "2", "--seq-len", "16", "--micro-batch", "2", "--eval-limit", "1",
                 "--budgets", "0.5,1.0", "--metric", "params", "--dtype", "fp32", "--device", "cpu"]) == 0
    shown = capsys.readouterr().out
    assert "Routed sub-networks" in shown and "uniform" in shown and "kept" in shown and "The surrogate guided" in shown
    routed, _, manifest = load_checkpoint(tmp_path / "routed")
    assert routed.routers is not None and manifest["routing"]["steps"] == 20
    assert 0 <= manifest["routing"]["surrogate_guided"] <= 1
    report = json.loads((tmp_path / "routed" / "routing.json").read_text())
    recorded = read_yaml(tmp_path / "routed" / "routing.yaml")  # the resolved options, for `route --config`
    assert recorded["steps"] == 20 and recorded["budgets"] == [0.5, 1.0] and recorded["data"] == [str(data)]
    assert [r["budget"] for r in report["budgets"]] == [0.5, 0.75, 1.0]  # grid + the unseen midpoint
    assert all(r["cost_ratio"] <= 1.0 + 1e-9 for r in report["budgets"])
    assert all(r["calib_ppl"][r["kept"]] == min(r["calib_ppl"].values()) for r in report["budgets"])
    assert [c["budget"] for c in routed.routers.checked] == [0.5, 0.75, 1.0]
    assert not (ckpt / "routers.json").exists()  # --out left the source untouched


def test_projection_never_skips_below_the_floor():
    em = make_elastic(n_layers=4, min_layers=2)
    table = cost_table(em, "params")
    full = table.full
    smallest = table.smallest
    skip_first = torch.tensor([[0.0, -9, -9, -9, -9]] * 4)  # the router wants every sub-layer skipped
    for fraction in (smallest / full, 0.5, 0.9):
        sub = project(em.space, table, skip_first, skip_first, fraction * full)
        em.space.validate(sub)
        assert table(em.space, sub) <= fraction * full * (1 + 1e-9)
    assert decode(em.space, skip_first, skip_first) == em.space.floor(Subnet(mlp=[0] * 4, attn=[0] * 4))


def test_budget_in_another_metric_starts_from_router_preferences_of_that_size(trained):
    from flextron.budgets import router_fraction

    em, routers, _, _ = trained
    # A latency table where attention dominates: 50% of the latency is not 50% of the params.
    mlp = {"24": 0.0, "48": 0.1, "72": 0.2, "96": 0.3}
    attn = {"1": 0.0, "2": 2.0, "3": 4.0, "4": 6.0}
    em.latency = {"decode_ms": {"overhead": 1.0, "mlp": mlp, "attn": attn}, "prefill_ms": {
        "overhead": 1.0, "mlp": mlp, "attn": attn}}
    try:
        params = cost_table(em, "params")
        assert router_fraction(em, params, 0.6 * params.full) == pytest.approx(0.6)
        latency = cost_table(em, "latency_ms")
        full = latency.full
        for f in (0.5, 0.7):
            target = f * full
            r = router_fraction(em, latency, target)
            # The router's own choice at that budget fits the latency target, a slightly larger one does not.
            assert latency(em.space, decode(em.space, *routers.static(r))) <= target
            assert r == 1.0 or latency(em.space, decode(em.space, *routers.static(min(1.0, r + 0.02)))) > target
            chosen = select_subnet(em, Budget.parse(f"latency_ms={f:.0%}"))
            assert latency(em.space, chosen) <= target
    finally:
        em.latency = None


def test_route_keeps_the_better_of_routed_and_uniform_and_quality_is_monotone(trained, tmp_path):
    from flextron.evaluate import perplexity
    from flextron.train.routers import check_against_uniform

    em, _, _, tok = trained
    held = PackedSequences(tokenize(tok, word_text(2000, seed=7)), 16, seed=1).rows(0, 8)
    table = cost_table(em, "params")
    full = table.full
    try:
        checks = check_against_uniform(em, held, [0.4, 0.5, 0.6, 0.8, 1.0], progress=False)
        assert [c["budget"] for c in checks] == [0.4, 0.5, 0.6, 0.8, 1.0]
        kept = []
        for c in checks:
            assert {"router", "uniform"} <= set(c["calib_ppl"])
            assert c["calib_ppl"][c["kept"]] == min(c["calib_ppl"].values())
            chosen = select_subnet(em, Budget(fraction=c["budget"]))  # what every command now uses
            assert chosen.to_dict() == c["subnet"] and table(em.space, chosen) <= c["budget"] * full * (1 + 1e-9)
            with em.subnet(chosen):
                kept.append(perplexity(em, held, progress=False))
            assert kept[-1] == pytest.approx(c["calib_ppl"][c["kept"]], rel=1e-5)
            assert kept[-1] <= c["calib_ppl"]["uniform"] * (1 + 1e-6)  # never worse than the baseline
        assert kept == sorted(kept, reverse=True)  # a larger budget is never worse
        # The checks travel with the routers.
        save_checkpoint(em, tok, tmp_path / "ckpt", {"source_model": "tiny"})
        loaded, _, _ = load_checkpoint(tmp_path / "ckpt")
        assert loaded.routers.checked == checks
        assert select_subnet(loaded, Budget(fraction=0.7)) == select_subnet(em, Budget(fraction=0.7))
    finally:
        em.routers.checked = None


def test_between_grid_budgets_a_kept_uniform_or_lower_sub_network_is_served_as_checked(trained):
    em, _, _, _ = trained
    table = cost_table(em, "params")
    checked = uniform_subnet_for(em, Budget(fraction=0.5))[0]
    wider = uniform_subnet_for(em, Budget(fraction=0.9))[0]
    assert wider != checked and table(em.space, wider) > table(em.space, checked)
    try:
        for kept in ("uniform", "lower budget"):
            em.routers.checked = [{"budget": 0.5, "kept": kept, "subnet": checked.to_dict(), "calib_ppl": {}}]
            for f in (0.5, 0.7, 0.9):  # not the largest uniform at 90%: that shape was never measured
                assert select_subnet(em, Budget(fraction=f)) == checked
        em.routers.checked[0].update(kept="uniform", subnet=em.space.full().to_dict())  # re-profiled since
        assert select_subnet(em, Budget(fraction=0.9)) == wider
        em.routers.checked[0]["kept"] = "router"
        routed = select_subnet(em, Budget(fraction=0.9))
        em.routers.checked = None
        assert routed == select_subnet(em, Budget(fraction=0.9))
    finally:
        em.routers.checked = None


def test_default_grid_starts_at_the_smallest_sub_network_when_it_is_above_the_grid(tmp_path):
    from flextron.config import ElasticSpace
    from flextron.options import read_yaml

    em = make_elastic()
    em.set_space(ElasticSpace(mlp=[[72, 96]] * 2, attn=[[3, 4]] * 2))  # the smallest keeps most parameters
    ckpt = save_checkpoint(em, make_tokenizer(), tmp_path / "ckpt", {"source_model": "tiny"})
    data = tmp_path / "data.txt"
    data.write_text(word_text(2000))
    lowest = smallest_fraction(em, "params")
    assert lowest > 0.6
    cfg = RouterConfig(metric="params", steps=2, joint_steps=0, seq_len=16, micro_batch=2, eval_limit=1,
                       check_sequences=0, surrogate=False, dtype="fp32")
    result = api.route(ckpt, cfg, [str(data)], device="cpu", progress=False)
    grid = read_yaml(ckpt / "routing.yaml")["budgets"]
    assert grid[0] == math.ceil(lowest * 100) / 100 and grid[-3:] == [0.8, 0.9, 1.0]
    assert all(r.budget.fraction >= lowest for r in result["budgets"])
    with pytest.raises(FlextronError, match="smallest sub-network"):  # a grid the user chose is not moved
        api.route(ckpt, replace(cfg, budgets=(0.5, 1.0)), [str(data)], device="cpu", progress=False)
