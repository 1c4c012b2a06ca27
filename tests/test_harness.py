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
from helpers import (
    make_elastic,
    make_tokenizer,
    prompt_sensitive,
    random_docs,
    with_adaptive_routers,
    word_text,
    write_requests,
)


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


def test_lm_eval_command_line_runs_flextron(routed_ckpt, tmp_path):
    """Static and adaptive routing through lm-eval's own command line: both runs start at once and ours
    are scored while they import (the runs are mostly imports, which two cores do side by side)."""
    requests = tmp_path / "mc.jsonl.gz"
    write_requests(requests, random_docs(40, seed=1))
    config = task_config(str(requests), tmp_path)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mc.yaml").write_text(json.dumps(config))
    runs = {}
    for adaptive in (False, True):
        model_args = f"pretrained={routed_ckpt},budget=0.5" + (",adaptive=true" if adaptive else "")
        with open(tmp_path / f"log-{adaptive}", "w") as log:  # a file: a full pipe would stall the run
            runs[adaptive] = subprocess.Popen(
                [sys.executable, "-m", "flextron.harness", "run", "--model", "flextron", "--model_args", model_args,
                 "--tasks", config["task"], "--include_path", str(tmp_path / "tasks"), "--device", "cpu",
                 "--output_path", str(tmp_path / f"out-{adaptive}")], stdout=log, stderr=subprocess.STDOUT)
    for adaptive, run in runs.items():
        ours = api.evaluate(routed_ckpt, budgets=["0.5"], tasks=[str(requests)], device="cpu", progress=False,
                            batch_size=1, adaptive=adaptive)[0].tasks[str(requests)]
        assert run.wait(timeout=600) == 0, (tmp_path / f"log-{adaptive}").read_text()[-3000:]
        (path,) = (tmp_path / f"out-{adaptive}").rglob("results_*.json")
        theirs = json.loads(path.read_text())["results"][config["task"]]
        assert abs(theirs["acc,none"] - ours["acc"]) <= 0.005
        assert abs(theirs["acc_norm,none"] - ours["acc_norm"]) <= 0.005


def test_adaptive_candidates_share_the_widths_their_context_chooses(tmp_path):
    """lm-eval scores a candidate as a generation from its context would be: the context alone
    chooses the attention widths, the same for every candidate of a question."""
    import dataclasses

    import torch
    import torch.nn.functional as F
    from lm_eval.api.instance import Instance

    from flextron.checkpoint import save_checkpoint
    from flextron.tasks import encode_pair

    em, tok = with_adaptive_routers(make_elastic()), make_tokenizer()
    em.routers.adaptive_config = dataclasses.replace(em.routers.config, hidden=16)  # as `route --adaptive` records
    prompt_sensitive(em.routers.adaptive)
    lm = FlextronLM(save_checkpoint(em, tok, tmp_path / "ckpt", {}), budget="0.7", adaptive=True, device="cpu")
    pairs = [p for d, _ in random_docs(3, seed=3) for p in d]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)], disable_tqdm=True)
    read = set()
    with torch.no_grad():
        for (ctx, cont), (ll, greedy) in zip(pairs, got):
            c, t = encode_pair(tok, ctx, cont)
            read.add(str(lm.routing.start(lm.fraction, torch.tensor([c + t]))))
            lm.routing.start(lm.fraction, torch.tensor([c]))
            logits = lm.elastic(input_ids=torch.tensor([c + t[:-1]])).logits[0, len(c) - 1 :]
            logp = F.log_softmax(logits.float(), -1).gather(1, torch.tensor(t)[:, None])
            assert ll == pytest.approx(logp.sum().item(), abs=1e-4)
            assert greedy == bool((logits.argmax(-1) == torch.tensor(t)).all())
    assert len(read) > 3  # given the continuations, the router would choose other widths


def test_the_entry_point_resolves_through_lm_evals_registry():
    eps = [ep for ep in importlib.metadata.entry_points(group="lm_eval.models") if ep.name == "flextron"]
    assert eps, "no lm_eval.models entry point 'flextron': this install predates it; reinstall with pip install -e ."
    model_registry.register("flextron-entry-point", target=eps[0])  # what plugin-loading lm-eval does
    assert get_model("flextron-entry-point") is FlextronLM
