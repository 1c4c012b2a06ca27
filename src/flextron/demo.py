"""The whole pipeline on the packaged model: convert -> elastic training -> profile -> routers ->
export one budget (HF directory and llama.cpp GGUF) -> evaluate -> report (tables and plots).
Prune-only budgets are fractions of the parameters; after profiling, router budgets are fractions
of this machine's decode latency, on a grid spanning what the smallest sub-network allows. The
prune-only and routed budgets are also compared with the original on held-out chat prompts
(`flextron.behaviour`: greedy agreement and KL). Presets size it: `tiny` (a smoke run of a couple
of minutes), `demo` (about 20 minutes on 2 CPU cores), `bench` (larger)."""

from __future__ import annotations

import shutil
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from flextron import api
from flextron.budgets import budget_grid, select_subnet
from flextron.errors import FlextronError
from flextron.fsutil import atomic_write
from flextron.options import ConvertOptions, DemoOptions, RouteOptions, TrainOptions, resolve, write_yaml
from flextron.report import report
from flextron.results import rows_json
from flextron.space import Budget

_NO_SAVE = 10**9  # training writes its checkpoint once, at the end
NOISY = ("the latency table was measured on a busy machine and failed its noise check; the demo goes on with it, "
         "so its latency budgets are unreliable: run the demo on a quiet machine")


@dataclass(frozen=True)
class Preset:
    convert: ConvertOptions
    train: TrainOptions
    route: RouteOptions
    profile: dict = field(default_factory=dict)
    eval_windows: int = 8  # held-out windows every perplexity is measured on
    eval_seq_len: int = 1024  # tokens per window
    budgets: tuple[str, ...] = ("1.0", "0.75", "0.5", "0.35")  # prune-only evaluation (params)
    chat: tuple[int, int] = (20, 32)  # held-out chat prompts, and new tokens of each answer (`flextron.behaviour`)


PRESETS = {
    "tiny": Preset(
        convert=ConvertOptions(calib_sequences=16, calib_seq_len=128, dtype="auto"),
        train=TrainOptions(max_steps=2, seq_len=128, micro_batch=2, n_random=1, eval_limit=0, save_every=_NO_SAVE,
                           chat_tokens=32),
        route=RouteOptions(steps=8, joint_steps=1, seq_len=128, micro_batch=2, check_sequences=2, chat_tokens=32),
        profile={"context": 32, "decode_steps": 2, "repeats": 1, "samples": 6, "validate": 2},
        eval_windows=2, eval_seq_len=256, budgets=("1.0", "0.5"), chat=(4, 8),
    ),
    # Sized to about 20 minutes on 2 CPU cores: on the first run the routers must already beat
    # prune-only and the uniform sub-networks (measured: docs/results.md, "The demo pipeline").
    "demo": Preset(
        convert=ConvertOptions(calib_sequences=128, dtype="auto"),
        train=TrainOptions(max_steps=16, seq_len=256, micro_batch=4, n_random=1, warmup_steps=4, eval_limit=0,
                           save_every=_NO_SAVE),
        route=RouteOptions(steps=20, check_sequences=8),
        profile={"repeats": 2},
    ),
    "bench": Preset(
        convert=ConvertOptions(dtype="auto"),
        train=TrainOptions(tokens=200_000, seq_len=256, micro_batch=4, eval_limit=0, save_every=50),
        route=RouteOptions(steps=300, joint_steps=40),
        eval_windows=69, chat=(64, 48),
    ),
}


def run(options: DemoOptions | None = None, *, device: str | None = None, progress: bool = True,
        **overrides: Any) -> dict:
    """`flextron demo`: run the pipeline into `options.out` (its options in config.yaml there); returns
    (and writes to out/results.json) every number it shows, evaluations as `EvalRow`s. A client of
    `flextron.api`, like the CLI, so `api` itself has no `demo`."""
    options = resolve(DemoOptions, options, overrides)
    preset = options.preset
    if preset not in PRESETS:
        raise FlextronError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    out = Path(options.out)
    ev = {"limit": p.eval_windows, "seq_len": p.eval_seq_len, "device": device, "progress": progress}
    ckpt = api.convert(None, out / "ckpt", p.convert, device=device, overwrite=True, progress=progress)
    write_yaml(out / "config.yaml", {**asdict(options), "device": api.resolve_device(device)})
    # Chat behaviour before and after training: greedy answers and next-token KL against the original.
    chat = {"chat_limit": p.chat[0], "chat_tokens": p.chat[1]}
    original = api.evaluate(None, budgets=["1.0"], **ev)[0]
    pruned = api.evaluate(ckpt, budgets=p.budgets, tasks=["ppl", "chat"], **chat, **ev)
    run_dir = out / "train"
    shutil.rmtree(run_dir, ignore_errors=True)  # a demo starts afresh
    trained = Path(api.train(ckpt, run_dir, p.train, device=device, progress=progress)["final"])
    # On a busy machine the table fails the noise check. The demo goes on with it (forced, as latency.json
    # and results.json record) rather than stop a run most of the way through, and says so loudly: its
    # latency budgets are then only as good as that table.
    latency = api.profile(trained, device=device, progress=progress, force=True, **p.profile)
    if latency.noise_problems:
        tqdm.write(f"WARNING: {NOISY} ({'; '.join(latency.noise_problems)})", file=sys.stderr)
    # Budgets in measured latency: how low they can go depends on the machine, so the router
    # grid spans this machine's feasible range.
    grid = budget_grid(api.load(trained, "cpu")[0])
    # The router report's held-out rows are the flextron curve: the same windows as every evaluation here.
    routed = api.route(trained, replace(p.route, budgets=grid, check_budgets=grid, eval_limit=p.eval_windows,
                                        eval_seq_len=p.eval_seq_len),
                       out=out / "elastic", overwrite=True, device=device, progress=progress)
    behaved = api.evaluate(out / "elastic", budgets=[str(r.budget.fraction) for r in routed["budgets"]], tasks=["chat"],
                           **chat, **ev)
    for r, b in zip(routed["budgets"], behaved):  # the same sub-networks: both select them by `select_subnet`
        r.chat = b.chat
    export_budget = str(grid[len(grid) // 2])
    exported = api.export(out / "elastic", export_budget, out / f"export-{export_budget}", overwrite=True)
    gguf = api.export(out / "elastic", export_budget, out / f"export-{export_budget}.gguf", overwrite=True,
                      format="gguf")
    speed = export_speed(out / "elastic", gguf, export_budget, p.profile, device)
    # The export alone is 100 % of itself: its row names the budget it was exported at.
    export_row = replace(api.evaluate(exported, budgets=["1.0"], **ev)[0], budget=Budget.parse(export_budget))
    result = {
        "preset": preset, "converted": str(ckpt), "checkpoint": str(out / "elastic"), "export": str(exported),
        "export_budget": export_budget, "gguf": str(gguf), "export_speed": speed,
        "original": original, "prune_only": pruned, "flextron": routed["budgets"], "export_eval": export_row,
        "latency_validation": latency.main.validation, "latency_noise": latency.noise_problems,
        "router_metric": routed["metric"],
        "routes": routed["budgets"], "space": api.describe(out / "elastic"),
    }
    atomic_write(out / "results.json", lambda f: f.write_text(rows_json(result)))
    result["report"], _ = report(out, f"SmolLM2-135M, preset {preset}")
    return result


def export_speed(ckpt: Path, gguf: Path, budget: str, profile: dict, device: str | None) -> dict:
    """Decode and prefill ms of the exported sub-network: the elastic model in HF eager, the GGUF in llama.cpp."""
    from flextron import latency, llamacpp

    timing = {k: profile[k] for k in ("context", "decode_steps", "repeats") if k in profile}
    em, _, _ = api.load(ckpt, device)
    speed = {"hf": latency.measure(em, select_subnet(em, Budget.parse(budget)), **timing), **timing}
    try:
        speed["llama.cpp"] = llamacpp.measure(gguf, **timing)
        speed["llama.cpp_runtime"] = llamacpp.runtime_version()
    except FlextronError as e:  # the [gguf] extra is optional
        speed["llama.cpp"], speed["llama.cpp_missing"] = None, str(e)
    return speed
