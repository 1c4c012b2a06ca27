"""The lm-evaluation-harness bridge: lm_eval on our task configs, through FlextronLM at a budget,
scores exactly what `flextron eval --tasks` scores."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402

from flextron import api  # noqa: E402
from flextron.config import CalibrationConfig  # noqa: E402
from flextron.harness import FlextronLM, task_config  # noqa: E402
from test_tasks import random_docs, write_requests  # noqa: E402


@pytest.fixture
def tiny_ckpt(tiny_hf_dir, tmp_path):
    model_dir, text = tiny_hf_dir
    return api.convert(str(model_dir), tmp_path / "ckpt", multiple=8, device="cpu", progress=False,
                       calibration=CalibrationConfig(n_sequences=8, seq_len=32, source=str(text)))


@pytest.mark.parametrize("budget", ["1.0", "0.5"])
def test_lm_eval_equals_our_scorer(tiny_ckpt, tmp_path, budget):
    requests = tmp_path / "mc.jsonl.gz"
    write_requests(requests, random_docs(40, seed=1))
    ours = api.evaluate(tiny_ckpt, [budget], tasks=[str(requests)], device="cpu", progress=False)[0]["tasks"]
    ours = ours[str(requests)]
    lm = FlextronLM(tiny_ckpt, budget=budget, device="cpu", batch_size=8)
    out = lm_eval.simple_evaluate(model=lm, tasks=[task_config(str(requests), tmp_path)], log_samples=False)
    theirs = next(iter(out["results"].values()))
    assert abs(theirs["acc,none"] - ours["acc"]) <= 0.005
    assert abs(theirs["acc_norm,none"] - ours["acc_norm"]) <= 0.005


def test_lm_eval_lambada_style(tiny_ckpt, tmp_path):
    requests = tmp_path / "single.jsonl.gz"
    write_requests(requests, [([d[g]], 0) for d, g in random_docs(20, seed=2)])
    ours = api.evaluate(tiny_ckpt, tasks=[str(requests)], device="cpu", progress=False)[0]["tasks"][str(requests)]
    out = lm_eval.simple_evaluate(model=FlextronLM(tiny_ckpt, device="cpu"),
                                  tasks=[task_config(str(requests), tmp_path)], log_samples=False)
    theirs = next(iter(out["results"].values()))
    assert theirs["perplexity,none"] == pytest.approx(ours["ppl"], rel=1e-4)
    assert abs(theirs["acc,none"] - ours["acc"]) <= 0.005
