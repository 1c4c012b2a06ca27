"""Perplexity equals a plain Hugging Face loop (the model's own shifted loss); typed result rows
that write the JSON every run file holds."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flextron.errors import FlextronError
from flextron.evaluate import (
    adaptive_at_budgets,
    eval_at_budgets,
    perplexity,
    read_text_file,
    router_report,
    text_windows,
)
from flextron.options import RouteOptions
from flextron.results import EvalRow, rows_json
from flextron.routers import AdaptiveRouters, Routers, StaticRouter
from flextron.space import Budget, Subnet
from helpers import make_elastic, make_model, make_tokenizer, word_text


@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_equals_the_hf_loss_loop(batch_size):
    model = make_model("llama")
    windows = torch.randint(0, 128, (5, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert perplexity(model, windows, batch_size=batch_size, progress=False) == pytest.approx(
        math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_ppl_data_is_perplexity_on_the_user_text_beside_the_held_out_one(tmp_path):
    """Issue 40: `eval --ppl-data FILE` scores windows of a text file as the held-out perplexity is scored."""
    em, tok = make_elastic(), make_tokenizer()
    text = word_text(100)
    data = text_windows(tok, text, 16)
    held = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    (row,) = eval_at_budgets(em, held, [Budget.parse("0.5")], progress=False, data_windows=data)
    with em.subnet(row.subnet):
        assert row.ppl_data == pytest.approx(perplexity(em, data, progress=False), rel=1e-6)
        assert row.ppl == pytest.approx(perplexity(em, held, progress=False), rel=1e-6) != row.ppl_data
    assert row.data_tokens == data[:, 1:].numel() and data.shape == (100 // 16, 16)
    assert EvalRow.from_dict(json.loads(rows_json(row))) == row
    with pytest.raises(FlextronError, match="holds 100 tokens, fewer than one window of --seq-len 128"):
        text_windows(tok, text, 128)
    file = tmp_path / "domain.txt"
    file.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(FlextronError, match="cannot read --ppl-data"):
        read_text_file(file)


# The keys, in order, that each kind of row has always been written with (routing.json,
# adaptive.json, eval.json, results.json).
EVAL_KEYS = ["budget", "subnet", "cost", "params_fraction", "ppl", "tokens"]
ROUTER_KEYS = ["budget", "metric", "subnet", "cost", "params_fraction", "raw_cost_ratio", "cost_ratio",
               "fraction_of_full", "uniform_subnet", "uniform_fraction_of_full", "ppl", "tokens", "uniform_ppl"]
ADAPTIVE_KEYS = ["budget", "metric", "adaptive", "ppl", "realised_fraction", "cost_ratio"]


@pytest.fixture(scope="module")
def routed():
    """A tiny elastic model with (untrained) static and adaptive routers over params, and windows."""
    grid = (0.5, 1.0)
    em = make_elastic()
    em.routers = Routers(StaticRouter(em.space, grid).eval(), "params", RouteOptions(budgets=grid))
    em.routers.adaptive = AdaptiveRouters(em.space.mlp, em.space.attn, em.config.hidden_size, grid, hidden=16).eval()
    return em, torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def test_rows_are_typed_and_write_the_json_they_always_have(routed):
    em, windows = routed
    evaluated = eval_at_budgets(em, windows, [Budget.parse("1.0"), Budget.parse("params=50%")], progress=False)
    reported = router_report(em, windows, [0.5, 1.0], progress=False)
    adaptive = adaptive_at_budgets(em, windows, [Budget(fraction=0.5)], progress=False)
    for rows, keys in ((evaluated, EVAL_KEYS), (reported, ROUTER_KEYS), (adaptive, ADAPTIVE_KEYS)):
        assert all(isinstance(r, EvalRow) for r in rows)
        for r in rows:
            d = r.to_dict()
            assert list(d) == keys
            assert EvalRow.from_dict(json.loads(json.dumps(d))) == r
    # One budget type; the JSON keeps its two spellings: text as asked, a fraction of the routers' metric.
    assert [str(r.budget) for r in evaluated] == ["100%", "params=50%"]
    assert [r.to_dict()["budget"] for r in evaluated] == ["100%", "params=50%"]
    assert [r.to_dict()["budget"] for r in reported] == [0.5, 1.0] and str(reported[0].budget) == "50%"
    assert isinstance(evaluated[0].subnet, Subnet) and evaluated[0].to_dict()["subnet"] == evaluated[0].subnet.to_dict()
    assert json.loads(rows_json({"rows": evaluated}))["rows"] == [r.to_dict() for r in evaluated]


def test_router_report_rows_are_what_eval_reports_at_the_budget(routed):
    """The demo plots the router report as the flextron curve: each row is the sub-network, cost and
    perplexity that `eval_at_budgets` gives at that budget; a uniform sub-network that is the routed
    one is not scored twice."""
    em, windows = routed
    reported = router_report(em, windows, [0.5, 1.0], progress=False)
    evaluated = eval_at_budgets(em, windows, [Budget(fraction=0.5), Budget(fraction=1.0)], progress=False)
    for r, e in zip(reported, evaluated):
        assert r.subnet == e.subnet and r.cost == e.cost and r.params_fraction == e.params_fraction
        assert r.ppl == pytest.approx(e.ppl, rel=1e-6) and r.tokens == e.tokens
    full = reported[1]
    assert full.subnet == full.uniform_subnet == em.space.full() and full.uniform_ppl == full.ppl
