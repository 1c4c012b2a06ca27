"""Stage 1, elastic continued training: every optimizer step distils the frozen original model
into several sampled sub-networks of the permuted model at once (gradients accumulated)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from flextron.budgets import select_subnet
from flextron.checkpoint import load_checkpoint, read_manifest
from flextron.config import Budget, Subnet, TrainConfig
from flextron.data import PackedSequences, heldout_windows
from flextron.elastic import ElasticModel, PositionChoices
from flextron.errors import FlextronError
from flextron.evaluate import EvalRow, eval_at_budgets, plot_ppl_vs_size, rows_json
from flextron.fsutil import atomic_write, check_output_dir
from flextron.generation import context_length
from flextron.options import write_yaml
from flextron.precision import autocast, compute_dtype
from flextron.tokens import corpus_tokens
from flextron.train.distill import chunked_distill_loss
from flextron.train.loop import (
    Dist,
    all_mean,
    checkpoints,
    enable_activation_checkpointing,
    grad_sync,
    init_distributed,
    kd_loss,
    load_training_state,
    prune_checkpoints,
    save_training_checkpoint,
    shard_frozen,
    teacher_dtype,
    warmup_cosine,
    wrap,
)
from flextron.train.memory import estimate_memory
from flextron.train.metrics import MetricsLog
from flextron.train.sharded import is_sharded, load_sharded_state, save_sharded_checkpoint

# Settings a resumed run must share with the run it continues.
_RESUME_KEYS = ("seq_len", "micro_batch", "grad_accum", "sampling", "seed", "n_random", "mixed_tokens", "budgets")


def distill_loss(student: Tensor, teacher: Tensor, ids: Tensor, cfg: TrainConfig, s_head: nn.Linear | None = None,
                 t_head: nn.Module | None = None) -> tuple[Tensor, dict]:
    """kd_weight * T^2 * KL(teacher || student) at temperature T + lm_weight * next-token CE.

    `student` / `teacher` are logits, or final hidden states with the output layers that make logits
    of them (then the vocabulary is read in chunks of `cfg.loss_chunk` tokens, `chunked_distill_loss`).
    """
    if s_head is not None:
        loss, kd, lm = chunked_distill_loss(student, teacher, ids, s_head, t_head, cfg.kd_weight, cfg.lm_weight,
                                            cfg.kd_temperature, cfg.loss_chunk)
    else:
        kd = kd_loss(student, teacher, cfg.kd_temperature)
        lm = F.cross_entropy(student[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss = cfg.kd_weight * kd + cfg.lm_weight * lm
    return loss, {"kd": kd.item(), "lm": lm.item()}


def distill_step(model: nn.Module, em: ElasticModel, teacher: ElasticModel, batches: list[Tensor],
                 subnets: list[Subnet], cfg: TrainConfig, device: torch.device) -> tuple[float, dict]:
    """Forward and backward of one optimizer step: per micro-batch one teacher pass, then each sub-network's
    distillation pass (gradients accumulate; the cross-rank reduction runs on the last). Mean loss and parts."""
    amp, t_head = compute_dtype(cfg.dtype, device), teacher.model.get_output_embeddings()
    loss_sum, parts = 0.0, {"kd": 0.0, "lm": 0.0}
    n_passes = len(batches) * len(subnets)
    for a, ids in enumerate(batches):
        ids = ids.to(device)
        with torch.no_grad(), autocast(device, amp):
            t_hidden = teacher(input_ids=ids, use_cache=False, head=lambda h, out: h)

        def head(h: Tensor, out: nn.Module) -> tuple[Tensor, dict]:
            return distill_loss(h, t_hidden, ids, cfg, out, t_head)  # noqa: B023  (called at once)

        for j, sub in enumerate(subnets):
            last = a == len(batches) - 1 and j == len(subnets) - 1
            scope = em.subnet(sub) if isinstance(sub, Subnet) else em.choices(sub)
            with scope, grad_sync(model, last), autocast(device, amp):
                loss, p = model(input_ids=ids, use_cache=False, head=head)
                (loss / n_passes).backward()
            loss_sum += loss.item() / n_passes
            for k in parts:
                parts[k] += p[k] / n_passes
    return loss_sum, parts


def sample_subnets(em: ElasticModel, cfg: TrainConfig, step: int) -> list[Subnet | PositionChoices]:
    """The sub-networks trained at `step`, then `mixed_tokens` per-position draws; seeded by (seed, step),
    so every rank draws the same."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    subnets = _subnets(em, cfg, gen)
    return subnets + [PositionChoices.sample(em.space, gen, cfg.micro_batch, cfg.seq_len)
                      for _ in range(cfg.mixed_tokens)]


def _subnets(em: ElasticModel, cfg: TrainConfig, gen: torch.Generator) -> list[Subnet]:
    space = em.space
    if cfg.sampling == "fixed":
        return [select_subnet(em, Budget(fraction=cfg.budgets[0]))]
    if cfg.sampling in ("sandwich", "uniform"):
        mode = "uniform" if cfg.sampling == "uniform" else "layers"
        randoms = [space.sample(gen, mode, ordered_skips=True) for _ in range(cfg.n_random)]
        return [space.full(), space.smallest(), *randoms]
    probs = torch.tensor(cfg.budget_probs or [1.0] * len(cfg.budgets), dtype=torch.float64)
    out = []
    for _ in range(cfg.n_random + 2):
        if torch.rand((), generator=gen).item() < cfg.full_prob:
            out.append(space.full())
        else:
            b = cfg.budgets[torch.multinomial(probs, 1, generator=gen).item()]
            out.append(select_subnet(em, Budget(fraction=b)))
    return out


def _check_resume(run: Path, info: dict) -> None:
    saved = json.loads((run / "run.json").read_text())
    for key in ("source_model", "family", "elastic_space"):
        if saved["source"][key] != info["source"][key]:
            raise FlextronError(f"cannot resume {run}: it trained another model or elastic space ({key} differs)")
    for key in _RESUME_KEYS:
        was = saved["config"].get(key, TrainConfig.__dataclass_fields__[key].default)  # older runs lack new keys
        if was != info["config"][key]:
            raise FlextronError(f"cannot resume {run}: --{key.replace('_', '-')} was {was}, now {info['config'][key]}")
    if saved["world_size"] != info["world_size"]:
        raise FlextronError(f"cannot resume {run}: it ran on {saved['world_size']} processes, now {info['world_size']}")


def _weights_finite(em: ElasticModel, d: Dist) -> bool:
    """Whether every rank's weights (its shards, under FSDP) are free of NaN and infinity."""
    local = all(bool(torch.isfinite(getattr(p, "to_local", lambda p=p: p)()).all()) for p in em.parameters())
    return all_mean(float(local), d) == 1.0


def _evaluate(path: Path, cfg: TrainConfig, d: Dist) -> list[EvalRow]:
    em, tok, _ = load_checkpoint(path, device=str(d.device))
    wins = heldout_windows(tok, min(1024, context_length(em.config) or 1024), cfg.eval_limit)
    budgets = [Budget(fraction=b) for b in cfg.eval_budgets]
    return eval_at_budgets(em, wins, budgets, autocast_dtype=compute_dtype(cfg.dtype, d.device), progress=True)


def train(ckpt: Path, run: Path, cfg: TrainConfig, data: list[str] | None = None, device: str = "cpu",
          resume: bool = False, callbacks: list | None = None, progress: bool = True) -> dict:
    """Distil the elastic checkpoint `ckpt` into itself over sampled sub-networks; outputs in `run`.

    Returns the summary (also in run/eval.json). The resolved options go to run/config.yaml (beside
    run.json), which `flextron train --config` reads back. `callbacks` are called as cb(step, row)
    after each optimizer step, on every rank.
    """
    d = init_distributed(device)
    manifest = read_manifest(ckpt)
    info = {"source": {"checkpoint": str(ckpt), "source_model": manifest.get("source_model"),
                       "family": manifest["family"], "elastic_space": manifest["elastic_space"]},
            "config": json.loads(json.dumps(vars(cfg))), "world_size": d.world}
    check_output_dir(run, overwrite=True)  # a directory (or nothing yet), never a file or a symlink
    existing = checkpoints(run)
    if resume:
        if not (run / "run.json").is_file():
            raise FlextronError(f"nothing to resume in {run}: it has no run.json; drop --resume")
        _check_resume(run, info)
    elif run.exists() and any(run.iterdir()):
        raise FlextronError(f"{run} already holds a run; pass --resume to continue it or choose another --out")
    start = existing[-1] if resume and existing else ckpt

    torch.manual_seed(cfg.seed)
    teacher, tok, _ = load_checkpoint(ckpt, device=str(d.device), dtype=teacher_dtype(cfg.teacher_dtype, d.device))
    teacher.requires_grad_(False)
    if cfg.fsdp:
        shard_frozen(teacher)
    em, _, _ = load_checkpoint(ckpt if is_sharded(start) else start, device=str(d.device))
    context = context_length(em.config)
    if context is not None and cfg.seq_len > context:
        raise FlextronError(f"--seq-len {cfg.seq_len} is beyond the model's context of {context} tokens")
    if d.main and progress:
        amp_bytes = 4 if compute_dtype(cfg.dtype, d.device) is None else 2
        est = estimate_memory(em, cfg, d.world, teacher.model.dtype.itemsize, amp_bytes)
        tqdm.write(est.summary())
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(em)
    em.train()

    ids = corpus_tokens(data, tok) if d.main else None  # rank 0 tokenizes once, the others map its file
    if d.world > 1:
        dist.barrier()
        ids = ids if d.main else corpus_tokens(data, tok, build=False)
    sequences = PackedSequences(ids, cfg.seq_len, cfg.seed)
    per_step = d.world * cfg.micro_batch * cfg.grad_accum
    total = cfg.max_steps or math.ceil(cfg.tokens / (per_step * cfg.seq_len))
    model = wrap(em, d, cfg.fsdp)
    optimizer = torch.optim.AdamW(em.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, total, cfg.min_lr_ratio))
    step = 0
    if start != ckpt:
        step = load_training_state(start, model, em, optimizer, scheduler)["step"]
        if is_sharded(start):
            load_sharded_state(start, em, optimizer)
    if d.main:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write(run / "run.json", lambda p: p.write_text(json.dumps(info, indent=1)))
        write_yaml(run / "config.yaml", {**info["config"], "data": data, "device": device})
    log = MetricsLog(run, step, cfg.logger, info["config"], cpu=d.device.type == "cpu") if d.main else None

    def save(at: int) -> Path:
        out = run / "checkpoints" / f"step-{at:07d}"
        training = {"step": at, "tokens": at * per_step * cfg.seq_len, "config": info["config"]}
        if cfg.sharded_checkpoints:
            save_sharded_checkpoint(em, optimizer, scheduler, tok, out, {**manifest, "training": training},
                                    {"step": at}, d, elastic=at == total)
        else:
            save_training_checkpoint(model, em, optimizer, scheduler, tok, out,
                                     {**manifest, "training": training}, {"step": at}, d)
        if d.main:
            prune_checkpoints(run, keep=2)
        return out

    bar = tqdm(total=total, initial=step, desc="elastic training", disable=not (progress and d.main))
    t0, tokens_done = time.time(), 0
    last_good = checkpoints(run)[-1] if checkpoints(run) else ckpt
    try:
        while step < total:
            subnets = sample_subnets(em, cfg, step)
            batches = [sequences.rows(step * per_step + (a * d.world + d.rank) * cfg.micro_batch, cfg.micro_batch)
                       for a in range(cfg.grad_accum)]  # this rank's rows only
            loss_sum, parts = distill_step(model, em, teacher, batches, subnets, cfg, d.device)
            loss_mean = all_mean(loss_sum, d)
            if not math.isfinite(loss_mean):
                raise FlextronError(f"the loss became {loss_mean} at step {step + 1}; training stopped, the last good "
                                    f"checkpoint is {last_good}; lower --lr or train in --dtype fp32")
            grad_norm = torch.nn.utils.clip_grad_norm_(em.parameters(), cfg.clip)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
                grad_norm = grad_norm.full_tensor()
            if not math.isfinite(float(grad_norm)):
                raise FlextronError(f"the gradient norm became {float(grad_norm)} at step {step + 1}; training "
                                    f"stopped, the last good checkpoint is {last_good}; lower --lr")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_done += per_step * cfg.seq_len
            row = {"step": step, "tokens": step * per_step * cfg.seq_len, "loss": round(loss_mean, 6),
                   "kd": round(all_mean(parts["kd"], d), 6), "lm": round(all_mean(parts["lm"], d), 6),
                   "lr": scheduler.get_last_lr()[0], "grad_norm": round(float(grad_norm), 4),
                   "tokens_per_s": round(tokens_done / (time.time() - t0), 1),
                   "elapsed_s": round(time.time() - t0, 1)}
            if log is not None:
                log.log(row)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_mean:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            for cb in callbacks or []:
                cb(step, row)
            if step % cfg.save_every == 0 or step == total:
                if not _weights_finite(em, d):  # never save (and name as good) a broken model
                    raise FlextronError(f"the weights hold NaN or infinity after step {step}; training stopped, "
                                        f"the last good checkpoint is {last_good}; lower --lr")
                last_good = save(step)
    finally:
        bar.close()
        if log is not None:
            log.close()
    summary = {"steps": step, "tokens": step * per_step * cfg.seq_len, "final": str(last_good)}
    if d.main and cfg.eval_limit == 0:
        atomic_write(run / "eval.json", lambda p: p.write_text(json.dumps(summary, indent=1)))
    if d.main and cfg.eval_limit != 0:
        before, after = _evaluate(ckpt, cfg, d), _evaluate(last_good, cfg, d)
        summary |= {"before": before, "after": after}
        atomic_write(run / "eval.json", lambda p: p.write_text(rows_json(summary)))
        plot_ppl_vs_size({label: ([r.params_fraction for r in rows], [r.ppl for r in rows])
                          for label, rows in (("before training", before), ("after training", after))},
                         run / "eval.png", "Uniform sub-networks before / after elastic training")
    if d.world > 1:
        dist.barrier()
    return summary
