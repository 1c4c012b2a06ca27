"""Router training (flextron.train.routers): static routers trained towards their budgets, the warm
start, the check against uniform sub-networks and `flextron route`; input-adaptive routers trained and
checked against static routing."""

import json
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from flextron import api
from flextron.adaptive import AdaptiveLM, AdaptiveRouting, calibrate
from flextron.budgets import cost_table, select_subnet, smallest_fraction, uniform_candidates, uniform_subnet_for
from flextron.checkpoint import load_checkpoint, save_checkpoint
from flextron.cli import main
from flextron.data import PackedSequences, tokenize
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.evaluate import perplexity
from flextron.latency_table import LatencyTable
from flextron.options import RouteOptions, read_yaml
from flextron.routers import ADAPTIVE_WEIGHTS, AdaptiveRouters, Routers, StaticRouter, decode
from flextron.space import Budget, ElasticSpace, Subnet
from flextron.train.losses import kd_loss
from flextron.train.routers import (
    check_against_static,
    check_against_uniform,
    check_fractions,
    guided_fraction,
    train_adaptive,
    train_routers,
    warm_start,
)
from helpers import TINY_TEMPLATE, make_elastic, make_model, make_tokenizer, two_graph_table, word_text

GRID = (0.4, 0.7, 1.0)  # the input-adaptive routers' budget grid


def test_temperature_anneals_and_stages_follow(trained_routers):
    _, _, log, _ = trained_routers
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


def test_router_meets_its_budgets(trained_routers):
    em, routers, _, _ = trained_routers
    table = cost_table(em, "params")
    full = table.full
    raw_costs = []
    for fraction in (0.4, 0.6, 0.8, 1.0):
        raw_costs.append(table(decode(em.space, routers.static(fraction))))
        # The router's own choice, before projection (two layers: few costs are reachable).
        assert abs(raw_costs[-1] / (fraction * full) - 1) < 0.15, (fraction, raw_costs[-1] / (fraction * full))
        chosen = table(select_subnet(em, Budget(fraction=fraction))) / (fraction * full)
        assert 0.75 <= chosen <= 1.0  # coarse steps: projection stops where no single step fits
    assert raw_costs == sorted(raw_costs)


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
        assert table(chosen) <= target * (1 + 1e-9)
        assert row["kd"] == pytest.approx(kd(chosen), abs=1e-6)
        assert row["kd"] <= min(kd(c) for c in uniform_candidates(em, table, target)) + 1e-6
        assert decode(em.space, router(row["budget"])) == chosen  # the router starts there
    assert rows[-1]["start"] == "uniform" and rows[-1]["kd"] == pytest.approx(0.0, abs=1e-6)


def test_route_end_to_end_through_the_cli(elastic_ckpt, tmp_path, capsys, monkeypatch):
    ckpt = elastic_ckpt()
    data = tmp_path / "data.txt"
    data.write_text(word_text(3000))
    monkeypatch.chdir(tmp_path)  # --data given relative to here; routing.yaml must replay from anywhere
    assert main(["route", str(ckpt), "--out", str(tmp_path / "routed"), "--data", "data.txt", "--steps", "20",
                 "--joint-steps", "2", "--seq-len", "16", "--micro-batch", "2", "--eval-limit", "1",
                 "--budgets", "0.5,1.0", "--metric", "params", "--dtype", "fp32", "--device", "cpu",
                 "--surrogate"]) == 0
    shown = capsys.readouterr().out
    assert "Routed sub-networks" in shown and "uniform" in shown and "kept" in shown and "The surrogate guided" in shown
    routed, _, manifest = load_checkpoint(tmp_path / "routed")
    assert routed.routers is not None and manifest["routing"]["steps"] == 20
    assert 0 <= manifest["routing"]["surrogate_guided"] <= 1
    report = json.loads((tmp_path / "routed" / "routing.json").read_text())
    recorded = read_yaml(tmp_path / "routed" / "routing.yaml")  # the resolved options, for `route --config`
    assert recorded["steps"] == 20 and recorded["budgets"] == [0.5, 1.0] and recorded["data"] == [str(data.resolve())]
    assert recorded["check_budgets"] == [0.75]
    assert [r["budget"] for r in report["budgets"]] == [0.5, 0.75, 1.0]  # grid + the unseen midpoint
    assert all(r["cost_ratio"] <= 1.0 + 1e-9 for r in report["budgets"])
    # The report's one window holds the model's 256 positions (the default --eval-seq-len is 1,024).
    assert all(r["tokens"] == 255 for r in report["budgets"])
    assert all(r["calib_ppl"][r["kept"]] == min(r["calib_ppl"].values()) for r in report["budgets"])
    assert [c["budget"] for c in routed.routers.checked] == check_fractions([0.5, 0.75, 1.0], 0.03)
    assert not (ckpt / "routers.json").exists()  # --out left the source untouched
    # Adaptive routers take the static routers' metric: another one is refused, not recorded beside it.
    assert main(["route", str(tmp_path / "routed"), "--adaptive", "--metric", "flops", "--data", "data.txt"]) == 2
    assert "take the budgets of the static routers (params), not flops" in capsys.readouterr().err


def test_joint_steps_with_full_weight_also_distil_the_full_model():
    """A teacher unlike the student: the full model's distillation loss falls by the anchor's own pull, far more
    than the routed 40 % sub-network's steps move it alone (fails if the anchor ran at the routed widths)."""
    data = PackedSequences(tokenize(make_tokenizer(), word_text(3000)), 16, seed=0)
    teacher = ElasticModel(make_model("llama", seed=1))
    teacher.requires_grad_(False)
    held = data.rows(400, 8)
    with torch.no_grad():
        t_logits = teacher(input_ids=held).logits
    drops = []
    for weight in (0.0, 8.0):
        em = make_elastic()
        with torch.no_grad():
            before = kd_loss(em(input_ids=held).logits, t_logits).item()
        cfg = RouteOptions(budgets=(0.4,), metric="params", steps=1, joint_steps=10, seq_len=16, micro_batch=2,
                           dtype="fp32", llm_lr=1e-2, full_weight=weight, check_sequences=0)
        train_routers(em, teacher, data, cfg, progress=False)
        with torch.no_grad():
            drops.append(before - kd_loss(em(input_ids=held).logits, t_logits).item())
    assert drops[1] > 2 * max(drops[0], 0.0), drops


def test_route_on_an_instruct_model_reads_its_own_answers_beside_the_text(tmp_path, monkeypatch):
    """--chat auto on a tokenizer with a chat template: the routed model (the teacher) answers the prompts once
    (cached), and every other row the routers and their joint fine-tuning read is one of those conversations;
    --chat none reads the text alone."""
    import flextron.train.routers as routing

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    tok = make_tokenizer()
    tok.chat_template = TINY_TEMPLATE
    ckpt = save_checkpoint(make_elastic(), tok, tmp_path / "ckpt", {"source_model": "tiny"})
    data, prompts = tmp_path / "data.txt", tmp_path / "prompts.txt"
    data.write_text(word_text(3000))
    prompts.write_text("".join(f"w{i} w{i + 1}\n" for i in range(10, 90)))
    read = []

    def train_routers(em, teacher, rows, cfg, progress):
        read.append(rows.rows(0, 4))
        return train_of(em, teacher, rows, cfg, progress)

    train_of = routing.train_routers
    monkeypatch.setattr(routing, "train_routers", train_routers)
    cfg = RouteOptions(budgets=(0.6, 1.0), metric="params", steps=2, joint_steps=1, seq_len=16, micro_batch=2,
                       eval_limit=1, check_sequences=2, dtype="fp32", chat_prompts=str(prompts), chat_tokens=6)
    api.route(ckpt, cfg, [str(data)], out=tmp_path / "routed", device="cpu", progress=False)
    answers = [json.loads(line) for line in next((tmp_path / "cache" / "flextron" / "chat").glob("*.jsonl"))
               .read_text().splitlines()]
    assert 0 < len(answers) < 80 and answers[0]["prompt"] == "w10 w11"  # enough for the rows read, in order
    eos = tok.convert_tokens_to_ids("[EOS]")
    assert [bool((row == eos).any()) for row in read[0]] == [False, True, False, True]  # the text has no turn ends
    api.route(ckpt, replace(cfg, chat="none"), [str(data)], out=tmp_path / "plain", overwrite=True, device="cpu",
              progress=False)
    assert not (read[1] == eos).any()


def test_routers_record_the_weight_type_of_their_latency_budgets(tmp_path, capsys):
    """Latency budgets priced by a llama.cpp table hold at its weight type: route refuses another `--outtype`
    in one line before training, and the routers record the table's (router config, manifest, report)."""
    em = make_elastic()
    table, _, _ = two_graph_table(em)
    em.latency = LatencyTable({**table.to_dict(), "runtime": "llama.cpp (llama-cpp-python 0.3)", "outtype": "q4_k_m"},
                              em)
    ckpt = save_checkpoint(em, make_tokenizer(), tmp_path / "ckpt", {"source_model": "tiny"})
    data = tmp_path / "data.txt"
    data.write_text(word_text(2000))
    capsys.readouterr()
    assert main(["route", str(ckpt), "--outtype", "q8_0", "--data", str(data), "--metric", "latency_ms"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "timed at q4_k_m weights, not q8_0" in err and "--outtype q4_k_m" in err
    assert not (ckpt / "routers.json").exists()
    cfg = RouteOptions(budgets=(0.8, 1.0), steps=2, joint_steps=0, seq_len=16, micro_batch=2, eval_limit=1,
                       check_sequences=0, surrogate=False, dtype="fp32")
    result = api.route(ckpt, cfg, [str(data)], device="cpu", progress=False)
    routed, _, manifest = load_checkpoint(ckpt)
    assert routed.routers.metric == "latency_ms" and routed.routers.config.outtype == "q4_k_m"
    assert manifest["routing"]["outtype"] == result["outtype"] == "q4_k_m"


def test_route_keeps_the_better_of_routed_and_uniform_and_quality_is_monotone(trained_routers, tmp_path):
    em, _, _, tok = trained_routers
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
            assert chosen.to_dict() == c["subnet"] and table(chosen) <= c["budget"] * full * (1 + 1e-9)
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


def test_a_budget_between_checked_ones_gets_what_the_check_below_kept_not_an_unchecked_projection(
        trained_routers):
    em, routers, _, tok = trained_routers
    held = PackedSequences(tokenize(tok, word_text(2000, seed=7)), 16, seed=1).rows(0, 8)
    table = cost_table(em, "params")
    between = Budget(fraction=0.6)  # a grid budget of the router that the check below leaves out

    def ppl(subnet: Subnet) -> float:
        with em.subnet(subnet):
            return perplexity(em, held, progress=False)

    def wider(subnet: Subnet) -> list[Subnet]:
        return [replace(subnet, **{kind: chosen[:i] + [choices[i][choices[i].index(c) + 1]] + chosen[i + 1:]})
                for kind, choices, chosen in (("mlp", em.space.mlp, subnet.mlp), ("attn", em.space.attn, subnet.attn))
                for i, c in enumerate(chosen) if c != choices[i][-1]]

    def kept_by_projection(fraction: float) -> list[Subnet]:
        """The sub-networks within the budget that projection keeps as they are (no single step wider fits)."""
        every = [Subnet(mlp=[a, b], attn=[c, d]) for a in em.space.mlp[0] for b in em.space.mlp[1]
                 for c in em.space.attn[0] for d in em.space.attn[1]]
        within = fraction * table.full
        return [s for s in every if table(s) <= within and all(table(w) > within for w in wider(s))]

    # Deliberately: at 40% the router's prior is the best such sub-network (the check there keeps the
    # router), at 60%, between the checked budgets, the worst, worse than the uniform one there.
    best, worst = min(kept_by_projection(0.4), key=ppl), max(kept_by_projection(0.6), key=ppl)
    assert ppl(worst) > ppl(uniform_subnet_for(em, between)[0])
    priors = routers.static.prior.clone()
    try:
        routers.static.set_prior(0.4, best, 100.0)
        routers.static.set_prior(0.6, worst, 100.0)
        assert select_subnet(em, between) == worst  # unchecked routers: the router's projection, as before
        checks = check_against_uniform(em, held, [0.4, 0.8, 1.0], progress=False)
        assert checks[0]["kept"] == "router" and checks[0]["subnet"] == best.to_dict()
        served = select_subnet(em, between)
        assert served != worst and served.to_dict() == checks[0]["subnet"]  # what the check at 40% kept
        assert ppl(served) == pytest.approx(checks[0]["calib_ppl"][checks[0]["kept"]], rel=1e-5)
        assert ppl(served) <= checks[0]["calib_ppl"]["uniform"] * (1 + 1e-6)
        for fraction, check in ((0.45, 0), (0.7, 0), (0.799, 0), (0.8, 1), (0.9, 1), (0.999, 1), (1.0, 2)):
            assert select_subnet(em, Budget(fraction=fraction)).to_dict() == checks[check]["subnet"], fraction
        assert table(select_subnet(em, Budget(fraction=0.39))) <= 0.39 * table.full  # below them all: the baseline
        assert select_subnet(em, Budget(fraction=0.39)) == uniform_subnet_for(em, Budget(fraction=0.39))[0]
    finally:
        routers.static.prior.copy_(priors)
        em.routers.checked = None


def test_default_grid_starts_at_the_smallest_sub_network_when_it_is_above_the_grid(tmp_path):
    em = make_elastic()
    em.set_space(ElasticSpace(mlp=[[72, 96]] * 2, attn=[[3, 4]] * 2))  # the smallest keeps most parameters
    ckpt = save_checkpoint(em, make_tokenizer(), tmp_path / "ckpt", {"source_model": "tiny"})
    data = tmp_path / "data.txt"
    data.write_text(word_text(2000))
    lowest = smallest_fraction(em, "params")
    assert lowest > 0.6
    cfg = RouteOptions(metric="params", steps=2, joint_steps=0, seq_len=16, micro_batch=2, eval_limit=1,
                       check_sequences=0, surrogate=False, dtype="fp32")
    result = api.route(ckpt, cfg, [str(data)], device="cpu", progress=False)
    grid = read_yaml(ckpt / "routing.yaml")["budgets"]
    assert grid[0] == math.ceil(lowest * 100) / 100 and grid[-3:] == [0.8, 0.9, 1.0]
    assert all(r.budget.fraction >= lowest for r in result["budgets"])
    with pytest.raises(FlextronError, match="smallest sub-network"):  # a grid the user chose is not moved
        api.route(ckpt, replace(cfg, budgets=(0.5, 1.0)), [str(data)], device="cpu", progress=False)
    with pytest.raises(FlextronError, match="smallest sub-network"):  # nor a budget to check
        api.route(ckpt, replace(cfg, check_budgets=(0.5,)), [str(data)], device="cpu", progress=False)


def test_check_budgets_are_checked_and_serve_the_budgets_above_them(tmp_path):
    """--check-budgets: checked against uniform beside the grid (not the default midpoints), and a budget
    asked between them is served what the check below it kept."""
    em = make_elastic()
    ckpt = save_checkpoint(em, make_tokenizer(), tmp_path / "ckpt", {"source_model": "tiny"})
    data = tmp_path / "data.txt"
    data.write_text(word_text(2000))
    cfg = RouteOptions(metric="params", budgets=(0.6, 1.0), check_budgets=(0.85,), check_step=0, steps=2, joint_steps=0,
                       seq_len=16, micro_batch=2, eval_limit=1, check_sequences=1, surrogate=False, dtype="fp32")
    result = api.route(ckpt, cfg, [str(data)], device="cpu", progress=False)
    assert [r.budget.fraction for r in result["budgets"]] == [0.6, 0.85, 1.0]
    assert read_yaml(ckpt / "routing.yaml")["check_budgets"] == [0.85]
    routed = api.load(ckpt, "cpu")[0]
    assert [c["budget"] for c in routed.routers.checked] == [0.6, 0.85, 1.0]
    served = {b: select_subnet(routed, Budget.parse(f"params={b:.0%}")) for b in (0.85, 0.95)}
    assert served[0.95] == served[0.85]


def test_a_budget_every_check_step_is_checked_so_none_asked_is_served_much_less(tmp_path):
    """--check-step: between the reported budgets, one every 3 % of cost is checked too (not reported), so a
    budget asked between checked ones is served a check at least 0.97 of it; the report keeps each of its
    budgets' own verdicts."""
    em = make_elastic()
    ckpt = save_checkpoint(em, make_tokenizer(), tmp_path / "ckpt", {"source_model": "tiny"})
    data = tmp_path / "data.txt"
    data.write_text(word_text(2000))
    cfg = RouteOptions(metric="params", budgets=(0.6, 1.0), steps=2, joint_steps=0, seq_len=16, micro_batch=2,
                       eval_limit=1, check_sequences=1, surrogate=False, dtype="fp32")
    result = api.route(ckpt, cfg, [str(data)], device="cpu", progress=False)
    assert [r.budget.fraction for r in result["budgets"]] == [0.6, 0.8, 1.0]  # the grid and its midpoint
    routed = api.load(ckpt, "cpu")[0]
    checked = {c["budget"]: c for c in routed.routers.checked}
    budgets = sorted(checked)
    assert budgets[0] == 0.6 and budgets[-1] == 1.0 and 0.8 in budgets and len(budgets) > 10
    assert min(a / b for a, b in zip(budgets, budgets[1:])) >= 0.97
    for r in result["budgets"]:
        assert (r.kept, r.calib_ppl) == (checked[r.budget.fraction]["kept"], checked[r.budget.fraction]["calib_ppl"])
    table = cost_table(routed, "params")
    for asked in (0.63, 0.71, 0.87, 0.99):
        below = max(b for b in budgets if b <= asked)
        assert below >= 0.97 * asked
        assert select_subnet(routed, Budget(metric="params", fraction=asked)) == select_subnet(
            routed, Budget(metric="params", fraction=below))
        assert table(select_subnet(routed, Budget(metric="params", fraction=asked))) <= asked * table.full * (1 + 1e-9)


@pytest.mark.parametrize("step", [0.03, 0.1, 1e-7])
def test_check_fractions_leave_no_gap_wider_than_the_step(step):
    fractions = [0.37, 0.5, 0.85, 1.0]
    checked = check_fractions(fractions, step)
    assert set(fractions) <= set(checked) and checked == sorted(set(checked))
    assert all(a >= min((1 - step) * b, b - 1e-4) - 1e-12 for a, b in zip(checked, checked[1:]))  # 4 decimals
    assert check_fractions(fractions, 0) == fractions


def test_route_on_a_hidden_space_chooses_hidden_sizes_within_its_budgets(tmp_path, capsys):
    """Static routers choose the hidden size per budget; adaptive routers then route each grid budget at
    the served sub-network's hidden size, and `generate --adaptive` runs on the checkpoint."""
    em = make_elastic()
    em.set_space(em.space.with_hidden(em.hidden_size, (0.5, 0.75, 1.0), 16))
    ckpt = save_checkpoint(em, make_tokenizer(), tmp_path / "ckpt", {"source_model": "tiny"})
    data = tmp_path / "data.txt"
    data.write_text(word_text(2000))
    cfg = RouteOptions(budgets=(0.3, 0.6, 1.0), metric="params", steps=6, joint_steps=2, seq_len=16, micro_batch=2,
                       eval_limit=1, check_sequences=2, surrogate_warmup=4, dtype="fp32")
    result = api.route(ckpt, cfg, [str(data)], device="cpu", progress=False)
    loaded, _, _ = load_checkpoint(ckpt)
    table = cost_table(loaded, "params")
    assert loaded.routers.static.n_hidden == 3
    for row in result["budgets"]:
        assert table(row.subnet) <= row.budget.fraction * table.full * (1 + 1e-9)
    # A third of the parameters is out of reach at the full hidden size: the routed sub-network narrows the stream.
    assert table(em.space.uniform(0, 0)) > 0.3 * table.full
    assert select_subnet(loaded, Budget(fraction=0.3)).hidden is not None
    adaptive = api.route(ckpt, replace(cfg, check_sequences=0), [str(data)], device="cpu", progress=False,
                         adaptive=True)
    assert [r.budget.fraction for r in adaptive["budgets"]] == [0.3, 0.45, 0.6, 0.8, 1.0]
    loaded, _, _ = load_checkpoint(ckpt)
    routing = AdaptiveRouting.for_model(loaded)
    seen = []
    loaded.model.get_submodule(loaded.family.final_norm).register_forward_hook(
        lambda m, i, o: seen.append(i[0].shape[-1]))
    with routing.attached(), torch.no_grad():
        for fraction in cfg.budgets:
            routing.start(fraction, torch.randint(0, 128, (1, 8)))
            loaded(input_ids=torch.randint(0, 128, (1, 8)))
            assert seen[-1] == (select_subnet(loaded, Budget(fraction=fraction)).hidden or loaded.hidden_size)
    assert seen[0] < loaded.hidden_size  # 30% is out of reach at the full hidden size
    assert main(["generate", str(ckpt), "w3 w4 w5", "--budget", "0.3", "--adaptive", "--max-new-tokens", "4",
                 "--raw", "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out.split()) >= 1


@pytest.mark.parametrize("hidden", [False, True])
def test_trained_adaptive_routers_meet_their_budgets_on_average(hidden):
    """Also on a space with hidden sizes, each budget at its hidden size (40% is out of reach at the full one)."""
    em = make_elastic(hidden=hidden)
    cfg = RouteOptions(budgets=(0.4, 0.7, 1.0), metric="params", steps=120, joint_steps=4, seq_len=16, micro_batch=4,
                       dtype="fp32", router_lr=1e-2, hidden=16)
    em.routers = Routers(StaticRouter(em.space, cfg.budgets), "params", cfg)
    teacher = ElasticModel(make_model("llama", seed=1))
    teacher.requires_grad_(False)
    data = PackedSequences(tokenize(make_tokenizer(), word_text(3000)), 16, seed=0)
    routers, log = train_adaptive(em, teacher, data, cfg, progress=False)
    assert [r["stage"] for r in log[-8:]] == ["joint"] * 4 + ["calibration"] + ["check"] * 3
    assert "forward" not in vars(em.blocks[0].mlp.module)  # detached after training
    routing = AdaptiveRouting(em, routers, cost_table(em, "params")).attach()
    ids = data.rows(500, 8)  # not the calibration batch
    realised = []
    for fraction in cfg.budgets:
        lm = AdaptiveLM(routing, fraction)
        with torch.no_grad():
            lm(input_ids=ids)
        realised.append(lm.costs[-1])
        assert abs(lm.costs[-1] / fraction - 1) < 0.15, (fraction, lm.costs[-1])
    assert realised == sorted(realised)


def _checked_routing(token_bias: float | None) -> tuple[AdaptiveRouting, torch.Tensor, list[dict]]:
    """Calibrated adaptive routers over a static router's prior, their input-dependent term either
    zero (None) or a bias towards each layer's narrowest MLP; then checked against static routing."""
    em = make_elastic()
    torch.manual_seed(0)
    em.routers = Routers(StaticRouter(em.space, GRID, hidden=16), "params", RouteOptions(budgets=GRID, hidden=16))
    routers = AdaptiveRouters(em.space.mlp, em.space.attn, em.config.hidden_size, GRID, hidden=16)
    routers.zero_residual_()
    if token_bias is not None:
        with torch.no_grad():
            for lin in routers.token_out:
                lin.bias[0] = token_bias
    routing = AdaptiveRouting(em, routers, cost_table(em, "params"))
    windows = torch.randint(0, 128, (6, 16))
    with routing.attached():
        calibrate(routing, torch.randint(0, 128, (4, 16)))
        log = check_against_static(routing, windows, progress=False)
    return routing, windows, log


@pytest.mark.parametrize("token_bias", [None, 50.0])
def test_check_serves_per_budget_the_better_of_adaptive_routing_and_the_static_sub_network(token_bias):
    routing, windows, log = _checked_routing(token_bias)
    em, routers = routing.em, routing.routers
    assert [r["budget"] for r in log] == list(GRID)
    for i, row in enumerate(log):
        assert row["kept"] == min(row["calib_ppl"], key=row["calib_ppl"].get)
        assert routers.learned[i].item() == (1.0 if row["kept"] == "adaptive" else 0.0)
        static = select_subnet(em, Budget(fraction=GRID[i]))
        assert row["realised"]["static"] == pytest.approx(routing.table(static) / routing.full)
        with em.subnet(static):  # served static: the same model as the sub-network itself
            assert row["calib_ppl"]["static"] == pytest.approx(perplexity(em, windows, 4, progress=False), rel=1e-5)
    if token_bias is not None:  # every token at the narrowest width wastes the full budget: static serves it
        assert log[-1]["kept"] == "static" and log[-1]["realised"]["static"] == pytest.approx(1.0)
    with routing.attached():
        for i, row in enumerate(log):  # the kept routing is what now runs
            lm = AdaptiveLM(routing, GRID[i])
            assert perplexity(lm, windows, 4, progress=False) == pytest.approx(row["calib_ppl"][row["kept"]], rel=1e-6)
        # Between grid budgets: the grid budget below, or the static sub-network at the budget itself.
        lm = AdaptiveLM(routing, 0.85)
        lm(input_ids=windows)
        below = log[1]
        expected = (routing.table(select_subnet(em, Budget(fraction=0.85))) / routing.full
                    if below["kept"] == "static" else below["realised"]["adaptive"])
        assert lm.costs[-1] <= 0.85 and lm.costs[-1] == pytest.approx(expected, rel=0.2)
        for refused in (lambda: routing.start(0.3, windows), lambda: routing.fraction(Budget(fraction=0.3))):
            with pytest.raises(FlextronError, match="serve budgets from 40%"):
                refused()


def test_served_static_survives_a_reload_and_older_adaptive_routers_load_as_adaptive(tmp_path):
    routing, _, _ = _checked_routing(50.0)
    em = routing.em
    em.routers.adaptive, em.routers.adaptive_config = routing.routers, em.routers.config
    assert routing.routers.learned.tolist() != [1.0] * len(GRID)
    ckpt = save_checkpoint(em, make_tokenizer(), tmp_path / "ckpt", {"source_model": "tiny"})
    loaded, _, _ = load_checkpoint(ckpt)
    assert torch.equal(loaded.routers.adaptive.learned, routing.routers.learned)
    state = load_file(ckpt / ADAPTIVE_WEIGHTS)
    del state["learned"]  # as saved before the check existed
    save_file(state, ckpt / ADAPTIVE_WEIGHTS)
    assert torch.equal(load_checkpoint(ckpt, verify=False)[0].routers.adaptive.learned, torch.ones(len(GRID)))
