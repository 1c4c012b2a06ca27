"""On the packaged SmolLM2-135M: the converted model keeps the original's function."""

from pathlib import Path

import pytest
import torch

from flextron import api
from flextron import demo as pipeline
from flextron.assets import load_hf
from flextron.budgets import select_subnet
from flextron.data import heldout_windows
from flextron.evaluate import perplexity
from flextron.space import Budget

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return pipeline.run(preset="tiny", out=str(tmp_path_factory.mktemp("demo")), device="cpu", progress=False)


def test_demo_records_its_options(demo):
    from flextron.options import read_yaml

    out = Path(demo["checkpoint"]).parent
    assert read_yaml(out / "config.yaml") == {"preset": "tiny", "out": str(out), "device": "cpu"}


def test_demo_full_width_ppl_equals_original(demo):
    full = demo["prune_only"][0]
    assert str(full.budget) == "100%"
    assert abs(full.ppl / demo["original"].ppl - 1) < 1e-3
    # Smaller budgets cost less and (without training) lose quality.
    fractions = [r.params_fraction for r in demo["prune_only"]]
    assert fractions == sorted(fractions, reverse=True) and fractions[-1] <= 0.5
    assert demo["prune_only"][-1].ppl > full.ppl
    assert [r["name"] for r in demo["space"]] == ["min", "centroid", "max"]


def test_demo_pipeline_routes_exports_and_evaluates(demo):
    assert all(r.cost_ratio <= 1 + 1e-9 for r in demo["routes"])
    # Each budget kept the best of router, uniform and the lower budget's choice on held-out rows.
    kept = [r.calib_ppl[r.kept] for r in demo["routes"]]
    assert all(k <= r.calib_ppl.get("uniform", k) for k, r in zip(kept, demo["routes"]))
    assert kept == sorted(kept, reverse=True)
    assert demo["router_metric"] == "latency_ms"  # profiled, so budgets mean decode latency
    half = next(r for r in demo["flextron"] if str(r.budget) == f"{float(demo['export_budget']):.0%}")
    # The exported directory is the same sub-network the elastic checkpoint runs at that budget.
    assert abs(demo["export_eval"].ppl / half.ppl - 1) < 1e-3
    assert demo["export_eval"].budget == half.budget  # its row names the budget it was exported at
    report = Path(demo["report"])
    assert (report.parent / "pareto.png").is_file()
    text = report.read_text()
    assert "| flextron |" in text and "| prune only |" in text and "| original |" in text


def test_converted_logits_equal_original(demo):
    original, tok, _ = load_hf(None)
    em, _, manifest = api.load(demo["converted"], "cpu")
    assert manifest["family"] == "llama" and manifest["elastic_space"]["attn"][0] == [1, 2, 3]
    x = heldout_windows(tok, 128, limit=2)
    with torch.no_grad():
        diff = (em(input_ids=x).logits - original(input_ids=x).logits).abs().max().item()
    assert diff < 1e-3
    assert abs(perplexity(em, x, progress=False) / perplexity(original, x, progress=False) - 1) < 1e-4


def test_export_at_half_budget_matches_the_elastic_model(demo, tmp_path):
    from transformers import AutoModelForCausalLM

    out = api.export(demo["converted"], "0.5", tmp_path / "half")  # no routers: a uniform sub-network
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert type(exported).__name__ == "LlamaForCausalLM"  # uniform: the stock architecture
    em, tok, _ = api.load(demo["converted"], "cpu")
    x = heldout_windows(tok, 64, limit=1)
    with torch.no_grad(), em.subnet(select_subnet(em, Budget.parse("0.5"))):
        assert (exported(input_ids=x).logits - em(input_ids=x).logits).abs().max().item() < 1e-4


def test_lm_eval_matches_our_scorer_on_arc_easy(tmp_path):
    import lm_eval  # the dev extra installs it: missing, this fails rather than skips

    from flextron.harness import FlextronLM, task_config

    ours = api.evaluate(None, budgets=["1.0"], tasks=["arc_easy"], limit=24, device="cpu", progress=False)[0].tasks
    ours = ours["arc_easy"]
    out = lm_eval.simple_evaluate(model=FlextronLM(None, device="cpu"), tasks=[task_config("arc_easy", tmp_path, 24)],
                                  log_samples=False)
    theirs = out["results"]["flextron_arc_easy"]
    assert ours["n"] == 24
    assert abs(theirs["acc,none"] - ours["acc"]) <= 0.005 and abs(theirs["acc_norm,none"] - ours["acc_norm"]) <= 0.005
