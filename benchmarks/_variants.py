"""Shared by the benchmarks that compare elastic variants of one model: convert, train, profile, route."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flextron import api
from flextron.budgets import budget_grid
from flextron.latency_table import LatencyTable
from flextron.options import RouteOptions, TrainOptions


def log(text: str, t0: float = time.time()) -> None:
    print(f"[{time.time() - t0:7.0f} s] {text}", flush=True)


def add_options(p: argparse.ArgumentParser, train_steps: int, router_steps: int, joint_steps: int) -> None:
    """The options `build` and the evaluation read, with this benchmark's step defaults."""
    p.add_argument("--train-steps", type=int, default=train_steps, help="elastic-training steps of each variant "
                                                                        "(0: none)")
    p.add_argument("--deploy-steps", type=int, default=0,
                   help="of --train-steps, how many run after routing on the sub-networks the routers deploy "
                        "(`train --sampling budgets` over the router grid, the full model a quarter of the time)")
    p.add_argument("--router-steps", type=int, default=router_steps)
    p.add_argument("--joint-steps", type=int, default=joint_steps)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--limit", type=int, default=16, help="held-out windows per budget")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", default=None, help="keep checkpoints (and exports) here (default: a temp dir)")
    p.add_argument("--smoke", action="store_true", help="tiny random model, few steps; writes no results")


def smoke_options(a: argparse.Namespace) -> None:
    """The shared options of a smoke run: a few steps of short sequences."""
    a.train_steps, a.router_steps, a.joint_steps, a.seq_len, a.micro_batch, a.limit = 2, 4, 1, 32, 2, 1
    a.deploy_steps = min(a.deploy_steps, 1)


def source(work: Path, smoke: bool) -> tuple[str | None, dict]:
    """The model to convert (None: the packaged SmolLM2) and convert options; a tiny random Llama when `smoke`."""
    if not smoke:
        return None, {}
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import make_bpe_tokenizer, make_model

    src = work / "tiny-hf"
    if not src.is_dir():
        make_model("llama", n_layers=6).save_pretrained(src)
        make_bpe_tokenizer().save_pretrained(src)  # byte-level BPE: llama.cpp can load it too
    return str(src), {"multiple": 8, "calib_sequences": 8, "calib_seq_len": 32}


@contextmanager
def workspace(a: argparse.Namespace) -> Iterator[tuple[Path, Path]]:
    """(work directory, checkpoint): `a.work` (default a temporary directory, removed after) and `a.ckpt`,
    else `a.model` (default the packaged SmolLM2, with `a.smoke` a tiny random Llama) converted there."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        ckpt = a.ckpt
        if ckpt is None:
            model, kw = source(work, a.smoke)
            log("convert")
            ckpt = api.convert(a.model or model, work / "ckpt", device="cpu", progress=False, overwrite=True, **kw)
        yield work, Path(ckpt)


def build(work: Path, name: str, a: argparse.Namespace, metric: str, table: Path | None = None,
          profile: dict | None = None, **convert: object) -> Path:
    """Convert with `convert` options, train `a.train_steps - a.deploy_steps` (sandwich), profile (a
    latency metric, with `api.profile` options `profile`; or copy the latency table of checkpoint
    `table`, whose choices include this space's), route over `a.budgets` budgets of `metric` (or the
    fractions `a.fractions`), then train `a.deploy_steps` on what the routers deploy; returns the
    routed checkpoint."""
    deploy = a.deploy_steps
    if deploy > a.train_steps:
        sys.exit(f"--deploy-steps {deploy} is more than --train-steps {a.train_steps}; it counts steps out of them")
    log(f"{name}: convert")
    model, kw = source(work, a.smoke)
    ckpt = api.convert(model, work / f"{name}-converted", device=a.device, progress=False, **kw, **convert)
    if a.train_steps > deploy:
        log(f"{name}: elastic training, {a.train_steps - deploy} steps")
        cfg = TrainOptions(max_steps=a.train_steps - deploy, seq_len=a.seq_len, micro_batch=a.micro_batch,
                           eval_limit=0, dtype=a.dtype)
        ckpt = Path(api.train(ckpt, work / f"{name}-train", cfg, device=a.device, progress=False)["final"])
    if metric == "latency_ms" and table is not None:
        log(f"{name}: the latency table of {table}")
        copied = LatencyTable.load(table, api.load(ckpt, "cpu")[0])
        if copied is None:
            sys.exit(f"{table} holds no latency table; profile it first")
        copied.save(ckpt)
    elif metric == "latency_ms":
        log(f"{name}: latency table")
        # A smoke run's tiny model times in microseconds, which no noise check passes on a shared machine.
        api.profile(ckpt, device=a.device, samples=a.profile_samples, validate=max(2, a.profile_samples // 3),
                    progress=False, force=a.smoke, **(profile or {}))
    grid = getattr(a, "fractions", None) or budget_grid(api.load(ckpt, "cpu")[0], metric, points=a.budgets)
    log(f"{name}: routers over {metric} budgets {grid}")
    cfg = RouteOptions(budgets=grid, metric=metric, steps=a.router_steps, joint_steps=a.joint_steps,
                       dtype=a.dtype, seq_len=a.seq_len, eval_limit=1)
    routed = work / f"{name}-routed"
    api.route(ckpt, cfg, out=routed, device=a.device, progress=False)
    if not deploy:
        return routed
    # Deployment-aware training: the routers' sub-networks (and the full model), not every draw of
    # the space; the routers stay as they are, so what was trained is what deploys.
    log(f"{name}: deployment-aware training, {deploy} steps")
    cfg = TrainOptions(max_steps=deploy, seq_len=a.seq_len, micro_batch=a.micro_batch, eval_limit=0, dtype=a.dtype,
                       sampling="budgets", budgets=tuple(grid), warmup_steps=1, seed=1)
    return Path(api.train(routed, work / f"{name}-deployed", cfg, device=a.device, progress=False)["final"])
