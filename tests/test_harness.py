"""The lm-evaluation-harness bridge: lm_eval on our task configs, through FlextronLM at a budget,
scores exactly what `flextron eval --tasks` scores."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import lm_eval  # the dev extra installs it: a missing lm-eval fails here, it is not skipped
import pytest
from lm_eval.api.registry import get_model, model_registry

from flextron import api
from flextron.cli import main
from flextron.harness import FlextronLM, task_config
from helpers import random_docs, word_text, write_requests


@pytest.mark.parametrize("budget", ["1.0", "0.5"])
def test_lm_eval_equals_our_scorer(elastic_ckpt, tmp_path, budget):
    ckpt = elastic_ckpt()
    requests = tmp_path / "mc.jsonl.gz"
    write_requests(requests, random_docs(40, seed=1))
    ours = api.evaluate(ckpt, budgets=[budget], tasks=[str(requests)], device="cpu", progress=False)[0].tasks
    ours = ours[str(requests)]
    lm = FlextronLM(ckpt, budget=budget, device="cpu", batch_size=8)
    out = lm_eval.simple_evaluate(model=lm, tasks=[task_config(str(requests), tmp_path)], log_samples=False)
    theirs = next(iter(out["results"].values()))
    assert abs(theirs["acc,none"] - ours["acc"]) <= 0.005
    assert abs(theirs["acc_norm,none"] - ours["acc_norm"]) <= 0.005


def test_lm_eval_lambada_style(elastic_ckpt, tmp_path):
    ckpt = elastic_ckpt()
    requests = tmp_path / "single.jsonl.gz"
    write_requests(requests, [([d[g]], 0) for d, g in random_docs(20, seed=2)])
    ours = api.evaluate(ckpt, budgets=["1.0"], tasks=[str(requests)], device="cpu", progress=False)[0].tasks
    ours = ours[str(requests)]
    out = lm_eval.simple_evaluate(model=FlextronLM(ckpt, device="cpu"),
                                  tasks=[task_config(str(requests), tmp_path)], log_samples=False)
    theirs = next(iter(out["results"].values()))
    assert theirs["perplexity,none"] == pytest.approx(ours["ppl"], rel=1e-4)
    assert abs(theirs["acc,none"] - ours["acc"]) <= 0.005


@pytest.fixture
def routed_ckpt(elastic_ckpt, tmp_path):
    """A tiny checkpoint with static and input-adaptive routers (a few steps each)."""
    ckpt = elastic_ckpt()
    data = tmp_path / "data.txt"
    data.write_text(word_text(3000))
    common = ["--data", str(data), "--steps", "6", "--joint-steps", "1", "--seq-len", "16", "--micro-batch", "2",
              "--eval-limit", "1", "--budgets", "0.5,1.0", "--metric", "params", "--dtype", "fp32", "--device", "cpu"]
    assert main(["route", str(ckpt), *common]) == 0
    assert main(["route", str(ckpt), "--adaptive", *common]) == 0
    return ckpt


@pytest.mark.parametrize("adaptive", [False, True])
def test_lm_eval_command_line_runs_flextron(routed_ckpt, tmp_path, adaptive):
    requests = tmp_path / "mc.jsonl.gz"
    write_requests(requests, random_docs(40, seed=1))
    ours = api.evaluate(routed_ckpt, budgets=["0.5"], tasks=[str(requests)], device="cpu", progress=False,
                        batch_size=1, adaptive=adaptive)[0].tasks[str(requests)]
    config = task_config(str(requests), tmp_path)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mc.yaml").write_text(json.dumps(config))
    model_args = f"pretrained={routed_ckpt},budget=0.5" + (",adaptive=true" if adaptive else "")
    run = subprocess.run([sys.executable, "-m", "flextron.harness", "run", "--model", "flextron", "--model_args",
                          model_args, "--tasks", config["task"], "--include_path", str(tmp_path / "tasks"),
                          "--device", "cpu", "--output_path", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (path,) = (tmp_path / "out").rglob("results_*.json")
    theirs = json.loads(path.read_text())["results"][config["task"]]
    assert abs(theirs["acc,none"] - ours["acc"]) <= 0.005
    assert abs(theirs["acc_norm,none"] - ours["acc_norm"]) <= 0.005


def test_the_entry_point_resolves_through_lm_evals_registry():
    eps = [ep for ep in importlib.metadata.entry_points(group="lm_eval.models") if ep.name == "flextron"]
    assert eps, "no lm_eval.models entry point 'flextron': this install predates it; reinstall with pip install -e ."
    model_registry.register("flextron-entry-point", target=eps[0])  # what plugin-loading lm-eval does
    assert get_model("flextron-entry-point") is FlextronLM
