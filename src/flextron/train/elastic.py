"""Stage 1, elastic continued training: every optimizer step distils the frozen original model
into several sampled sub-networks of the permuted model at once (gradients accumulated).

`train` runs in phases: open the run (refusals, resume checks, dead writers' leftovers cleaned), load
the teacher, the student and its optimizer state (a damaged newest step checkpoint gives way to the
older kept one), the training rows, record the run (run.json, config.yaml), the steps (checkpoints on
the way), the final evaluation (eval.json, eval.png)."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from flextron.budgets import select_subnet
from flextron.chat import chat_rows
from flextron.checkpoint import load_checkpoint, read_manifest, weights_id
from flextron.data import MixedSequences, PackedSequences, heldout_windows
from flextron.elastic import ElasticModel, PositionChoices
from flextron.errors import FlextronError
from flextron.evaluate import eval_at_budgets
from flextron.fsutil import atomic_write, check_output_dir, clean_leftovers
from flextron.generation import check_positions, within_context
from flextron.options import TrainOptions, write_yaml
from flextron.precision import autocast, compute_dtype
from flextron.report import plot_ppl_vs_size
from flextron.results import EvalRow, rows_json
from flextron.space import Budget, Subnet
from flextron.tokens import corpus_tokens
from flextron.train.loop import (
    Dist,
    all_mean,
    checkpoints,
    enable_activation_checkpointing,
    grad_sync,
    init_distributed,
    load_training_state,
    prune_checkpoints,
    save_training_checkpoint,
    shard_frozen,
    step_of,
    teacher_dtype,
    warmup_cosine,
    wrap,
)
from flextron.train.losses import distill_loss
from flextron.train.memory import estimate_memory
from flextron.train.metrics import MetricsLog
from flextron.train.sharded import is_sharded, load_sharded_state, save_sharded_checkpoint

# What a resumed run must share with the run it continues: its source, its settings.
_SOURCE_KEYS = ("source_model", "family", "elastic_space")
_RESUME_KEYS = ("seq_len", "micro_batch", "grad_accum", "sampling", "seed", "n_random", "mixed_tokens", "budgets",
                "chat", "chat_mix", "chat_loss")


def distill_step(model: nn.Module, em: ElasticModel, teacher: ElasticModel, batches: list[Tensor],
                 subnets: list[Subnet], cfg: TrainOptions, device: torch.device,
                 masks: list[Tensor | None] | None = None) -> tuple[float, dict]:
    """Forward and backward of one optimizer step: per micro-batch one teacher pass, then each sub-network's
    distillation pass (gradients accumulate; the cross-rank reduction runs on the last). The mean loss and parts,
    the full sub-network weighing `cfg.full_weight` against each other one.
    `masks`: per micro-batch, the tokens the loss is on (None: all)."""
    amp, t_head = compute_dtype(cfg.dtype, device), teacher.model.get_output_embeddings()
    loss_sum, parts = 0.0, {"kd": 0.0, "lm": 0.0}
    full = em.space.full()
    weights = [cfg.full_weight if sub == full else 1.0 for sub in subnets]
    total = len(batches) * sum(weights)
    for a, (ids, mask) in enumerate(zip(batches, masks or [None] * len(batches))):
        ids, mask = ids.to(device), None if mask is None else mask.to(device)
        with torch.no_grad(), autocast(device, amp):
            t_hidden = teacher(input_ids=ids, use_cache=False, head=lambda h, out: h)

        def head(h: Tensor, out: nn.Module) -> tuple[Tensor, dict]:
            return distill_loss(h, t_hidden, ids, cfg, out, t_head, mask)  # noqa: B023  (called at once)

        for j, (sub, w) in enumerate(zip(subnets, weights)):
            last = a == len(batches) - 1 and j == len(subnets) - 1
            scope = em.subnet(sub) if isinstance(sub, Subnet) else em.choices(sub)
            with scope, grad_sync(model, last), autocast(device, amp):
                loss, p = model(input_ids=ids, use_cache=False, head=head)
                (loss * (w / total)).backward()
            loss_sum += loss.item() * w / total
            for k in parts:
                parts[k] += p[k] * w / total
    return loss_sum, parts


def sample_subnets(em: ElasticModel, cfg: TrainOptions, step: int) -> list[Subnet | PositionChoices]:
    """The sub-networks trained at `step`, then `mixed_tokens` per-position draws; seeded by (seed, step),
    so every rank draws the same."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    subnets = _subnets(em, cfg, gen)
    return subnets + [PositionChoices.sample(em.space, gen, cfg.micro_batch, cfg.seq_len)
                      for _ in range(cfg.mixed_tokens)]


def _subnets(em: ElasticModel, cfg: TrainOptions, gen: torch.Generator) -> list[Subnet]:
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


def _saved_run(run: Path) -> dict:
    """run.json of the run to resume, with what a resume compares; a damaged one is refused in one line."""
    path = run / "run.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
            raise ValueError(f"a JSON {type(saved).__name__}, not an object")
        for key, kind in (("source", dict), ("config", dict), ("world_size", int)):
            if not isinstance(saved.get(key), kind):
                raise ValueError(f"no {key!r} {kind.__name__}")
        missing = [key for key in _SOURCE_KEYS if key not in saved["source"]]
        if missing:
            raise ValueError(f"no source {missing[0]!r}")
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise FlextronError(f"cannot resume {run}: {path} is damaged ({e}); start a new --out") from None
    return saved


def _check_resume(run: Path, info: dict) -> None:
    saved = _saved_run(run)
    for key in _SOURCE_KEYS:
        if saved["source"][key] != info["source"][key]:
            raise FlextronError(f"cannot resume {run}: it trained another model or elastic space ({key} differs)")
    for key in _RESUME_KEYS:
        was = saved["config"].get(key, TrainOptions.__dataclass_fields__[key].default)  # older runs lack new keys
        if was != info["config"][key]:
            raise FlextronError(f"cannot resume {run}: --{key.replace('_', '-')} was {was}, now {info['config'][key]}")
    if saved["world_size"] != info["world_size"]:
        raise FlextronError(f"cannot resume {run}: it ran on {saved['world_size']} processes, now {info['world_size']}")


def _weights_finite(em: ElasticModel, d: Dist) -> bool:
    """Whether every rank's weights (its shards, under FSDP) are free of NaN and infinity."""
    local = all(bool(torch.isfinite(getattr(p, "to_local", lambda p=p: p)()).all()) for p in em.parameters())
    return all_mean(float(local), d) == 1.0


def _evaluate(path: Path, cfg: TrainOptions, d: Dist) -> list[EvalRow]:
    em, tok, _ = load_checkpoint(path, device=str(d.device))
    wins = heldout_windows(tok, within_context(em.config, 1024), cfg.eval_limit)
    budgets = [Budget(fraction=b) for b in cfg.eval_budgets]
    return eval_at_budgets(em, wins, budgets, autocast_dtype=compute_dtype(cfg.dtype, d.device), progress=True)


@dataclass(frozen=True)
class _Run:
    """What every phase of a run reads: its options, processes and directory, where its weights come
    from, and its size in steps."""

    cfg: TrainOptions
    d: Dist
    dir: Path
    source: Path  # the elastic checkpoint trained: the teacher, and the "before" of the final evaluation
    start: Path  # the student's weights: the source, or the last step checkpoint of a run resumed
    manifest: dict  # the source's, which every step checkpoint extends
    info: dict  # run.json: the source, the resolved options, the world size
    per_step: int  # sequences per optimizer step, all ranks together
    total: int  # optimizer steps of the whole run

    def tokens(self, step: int) -> int:
        """Tokens trained on by the end of `step`."""
        return step * self.per_step * self.cfg.seq_len


@dataclass
class _Student:
    """The model trained, the module that runs it (DDP, FSDP2 or itself), its optimizer and LR
    schedule, and the optimizer steps taken."""

    em: ElasticModel
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0


def train(ckpt: Path, run: Path, cfg: TrainOptions, data: list[str] | None = None, device: str = "cpu",
          resume: bool = False, callbacks: list[Callable[[int, dict], None]] | None = None,
          progress: bool = True) -> dict:
    """Distil the elastic checkpoint `ckpt` into itself over sampled sub-networks; outputs in `run`.

    Returns the summary (also in run/eval.json). The resolved options go to run/config.yaml (beside
    run.json), which `flextron train --config` reads back. `callbacks` are called as cb(step, row)
    after each optimizer step, on every rank.
    """
    r = _open_run(ckpt, run, cfg, init_distributed(device), resume)
    teacher, tok = _load_teacher(r, progress)
    sequences = _sequences(data, tok, r, teacher, progress)  # the teacher answers chat prompts unsharded
    if cfg.fsdp:
        shard_frozen(teacher)
    r, student = _student(r)
    if r.d.main:
        _record_run(r, data, device)
    final = _train_steps(r, student, teacher, sequences, tok, callbacks or [], progress)
    summary = {"steps": student.step, "tokens": r.tokens(student.step), "final": str(final)}
    if r.d.main:
        summary |= _final_eval(r, final)
        _write_summary(r, summary)
    if r.d.world > 1:
        dist.barrier()
    return summary


def _open_run(ckpt: Path, run: Path, cfg: TrainOptions, d: Dist, resume: bool) -> _Run:
    """The run to start in `run` (which must be empty) or, with `resume`, to continue there (with the
    settings and processes it started with)."""
    manifest = read_manifest(ckpt)
    info = {"source": {"checkpoint": str(ckpt), "source_model": manifest.get("source_model"),
                       "family": manifest["family"], "elastic_space": manifest["elastic_space"]},
            "config": json.loads(json.dumps(vars(cfg))), "world_size": d.world}
    check_output_dir(run, overwrite=True)  # a directory (or nothing yet), never a file or a symlink
    for folder in (run, run / "checkpoints"):  # what killed writers left (a run.json never renamed, a pruned step)
        clean_leftovers(folder)
    existing = checkpoints(run)
    if resume:
        if not (run / "run.json").is_file():
            raise FlextronError(f"nothing to resume in {run}: it has no run.json; drop --resume")
        _check_resume(run, info)
    elif run.exists() and any(run.iterdir()):
        raise FlextronError(f"{run} already holds a run; pass --resume to continue it or choose another --out")
    per_step = d.world * cfg.micro_batch * cfg.grad_accum
    total = cfg.max_steps or math.ceil(cfg.tokens / (per_step * cfg.seq_len))
    if resume and existing and step_of(existing[-1]) > total:
        raise FlextronError(f"cannot resume {run}: the run already has {step_of(existing[-1])} steps, more than the "
                            f"{total} asked; give a larger --max-steps / --tokens, or start a new --out")
    return _Run(cfg, d, run, source=ckpt, start=existing[-1] if resume and existing else ckpt, manifest=manifest,
                info=info, per_step=per_step, total=total)


def _load_teacher(r: _Run, progress: bool) -> tuple[ElasticModel, PreTrainedTokenizerBase]:
    """The frozen teacher (sharded with --fsdp) and the tokenizer; on rank 0 the memory estimate is
    printed (the student has the teacher's shapes)."""
    cfg, d = r.cfg, r.d
    torch.manual_seed(cfg.seed)
    teacher, tok, _ = load_checkpoint(r.source, device=str(d.device), dtype=teacher_dtype(cfg.teacher_dtype, d.device))
    teacher.requires_grad_(False)
    check_positions(teacher.config, cfg.seq_len, "--seq-len")
    if d.main and progress:
        amp_bytes = 4 if compute_dtype(cfg.dtype, d.device) is None else 2
        est = estimate_memory(teacher, cfg, d.world, teacher.model.dtype.itemsize, amp_bytes)
        tqdm.write(est.summary())
    return teacher, tok


def _sequences(data: list[str] | None, tok: PreTrainedTokenizerBase, r: _Run, teacher: ElasticModel,
               progress: bool) -> PackedSequences | MixedSequences:
    """The training rows: the text (rank 0 tokenizes the corpus once, the others map its token file), and
    beside it the chat data at a share of --chat-mix (rank 0 has the teacher answer into the cache first;
    the others read it there)."""
    cfg = r.cfg
    ids = corpus_tokens(data, tok) if r.d.main else None
    if r.d.world > 1:
        dist.barrier()
        ids = ids if r.d.main else corpus_tokens(data, tok, build=False)
    text = PackedSequences(ids, cfg.seq_len, cfg.seed)
    needed = math.ceil(r.total * r.per_step * cfg.seq_len * cfg.chat_mix) + cfg.seq_len
    teacher_id = weights_id(r.manifest)

    def rows() -> PackedSequences | None:
        return chat_rows(cfg, tok, teacher, teacher_id, needed, cfg.seq_len, cfg.seed, cfg.chat_loss == "assistant",
                         progress)

    chat = rows() if r.d.main else None
    if r.d.world > 1:
        dist.barrier()
        if not r.d.main:
            chat = rows()  # all cached by now: nothing left to generate
    return text if chat is None else MixedSequences(text, chat, cfg.chat_mix)


def _student(r: _Run) -> tuple[_Run, _Student]:
    """The student from `r.start`, or, where that step checkpoint is damaged, from the older kept
    step (said in one line; the run returned starts there)."""
    while True:
        try:
            return r, _load_student(r)
        except FlextronError as e:
            if r.start == r.source:
                raise
            older = [p for p in checkpoints(r.dir) if step_of(p) < step_of(r.start)]
            what = str(e).split("; ")[0]  # the damage, without advice meant for a source checkpoint
            if not older:
                raise FlextronError(f"cannot resume {r.dir}: {what}; delete {r.dir / 'checkpoints'} to resume "
                                    "from the start, or start a new --out") from None
            if r.d.main:
                tqdm.write(f"{r.start.name} is damaged ({what}); resuming from {older[-1].name}", file=sys.stderr)
            r = replace(r, start=older[-1])


def _load_student(r: _Run) -> _Student:
    """The student in training mode, wrapped for the processes, with AdamW and the warm-up + cosine
    schedule; resumed, weights, their state, the RNG's and the step come from the step checkpoint."""
    cfg = r.cfg
    em, _, _ = load_checkpoint(r.source if is_sharded(r.start) else r.start, device=str(r.d.device))
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(em)
    em.train()
    model = wrap(em, r.d, cfg.fsdp)
    optimizer = torch.optim.AdamW(em.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95),
                                  eps=cfg.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, r.total, cfg.min_lr_ratio))
    student = _Student(em, model, optimizer, scheduler)
    if r.start != r.source:
        student.step = load_training_state(r.start, model, em, optimizer, scheduler)["step"]
        if is_sharded(r.start):
            load_sharded_state(r.start, em, optimizer)
    return student


def _record_run(r: _Run, data: list[str] | None, device: str) -> None:
    """run.json (what a resume is checked against) and config.yaml (the options, for --config)."""
    r.dir.mkdir(parents=True, exist_ok=True)
    atomic_write(r.dir / "run.json", lambda p: p.write_text(json.dumps(r.info, indent=1)))
    write_yaml(r.dir / "config.yaml", {**r.info["config"], "data": data, "device": device})


def _train_steps(r: _Run, s: _Student, teacher: ElasticModel, sequences: PackedSequences | MixedSequences,
                 tok: PreTrainedTokenizerBase, callbacks: list[Callable[[int, dict], None]], progress: bool) -> Path:
    """The optimizer steps from `s.step` to the last, each logged (metrics.csv, the progress bar,
    `callbacks`), a checkpoint every --save-every steps and at the last. Returns the last checkpoint
    saved (the start where none was)."""
    cfg, d = r.cfg, r.d
    log = MetricsLog(r.dir, s.step, cfg.logger, r.info["config"], cpu=d.device.type == "cpu") if d.main else None
    bar = tqdm(total=r.total, initial=s.step, desc="elastic training", disable=not (progress and d.main))
    t0, tokens_done, last_good = time.time(), 0, r.start
    try:
        while s.step < r.total:
            loss, parts, grad_norm = _optimizer_step(r, s, teacher, sequences, last_good)
            tokens_done += r.per_step * cfg.seq_len
            row = {"step": s.step, "tokens": r.tokens(s.step), "loss": round(loss, 6),
                   "kd": round(all_mean(parts["kd"], d), 6), "lm": round(all_mean(parts["lm"], d), 6),
                   "lr": s.scheduler.get_last_lr()[0], "grad_norm": round(grad_norm, 4),
                   "tokens_per_s": round(tokens_done / (time.time() - t0), 1),
                   "elapsed_s": round(time.time() - t0, 1)}
            if log is not None:
                log.log(row)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            for cb in callbacks:
                cb(s.step, row)
            if s.step % cfg.save_every == 0 or s.step == r.total:
                last_good = _save(r, s, tok, last_good)
    finally:
        bar.close()
        if log is not None:
            log.close()
    return last_good


def _optimizer_step(r: _Run, s: _Student, teacher: ElasticModel, sequences: PackedSequences | MixedSequences,
                    last_good: Path) -> tuple[float, dict, float]:
    """Step `s.step` + 1 on this rank's rows: the loss (mean over ranks), its parts on this rank and
    the gradient norm. A loss or gradient norm that is not finite stops training before the update,
    naming `last_good`."""
    cfg, d, step = r.cfg, r.d, s.step
    subnets = sample_subnets(s.em, cfg, step)
    starts = [step * r.per_step + (a * d.world + d.rank) * cfg.micro_batch for a in range(cfg.grad_accum)]
    batches = [sequences.rows(i, cfg.micro_batch) for i in starts]  # this rank's rows only
    masks = [sequences.masks(i, cfg.micro_batch) for i in starts]
    loss_sum, parts = distill_step(s.model, s.em, teacher, batches, subnets, cfg, d.device, masks)
    loss = all_mean(loss_sum, d)
    if not math.isfinite(loss):
        raise FlextronError(f"the loss became {loss} at step {step + 1}; training stopped, the last good "
                            f"checkpoint is {last_good}; lower --lr or train in --dtype fp32")
    grad_norm = torch.nn.utils.clip_grad_norm_(s.em.parameters(), cfg.clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
        grad_norm = grad_norm.full_tensor()
    if not math.isfinite(float(grad_norm)):
        raise FlextronError(f"the gradient norm became {float(grad_norm)} at step {step + 1}; training "
                            f"stopped, the last good checkpoint is {last_good}; lower --lr")
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    s.step += 1
    return loss, parts, float(grad_norm)


def _save(r: _Run, s: _Student, tok: PreTrainedTokenizerBase, last_good: Path) -> Path:
    """Checkpoint step `s.step` (every rank calls: FSDP gathers), keeping the last two; returns its
    path. Weights holding NaN or infinity are never saved (and named good): training stops there,
    naming `last_good`."""
    at = s.step
    if not _weights_finite(s.em, r.d):
        raise FlextronError(f"the weights hold NaN or infinity after step {at}; training stopped, "
                            f"the last good checkpoint is {last_good}; lower --lr")
    out = r.dir / "checkpoints" / f"step-{at:07d}"
    manifest = {**r.manifest, "training": {"step": at, "tokens": r.tokens(at), "config": r.info["config"]}}
    if r.cfg.sharded_checkpoints:
        save_sharded_checkpoint(s.em, s.optimizer, s.scheduler, tok, out, manifest, {"step": at}, r.d,
                                elastic=at == r.total)
    else:
        save_training_checkpoint(s.model, s.em, s.optimizer, s.scheduler, tok, out, manifest, {"step": at}, r.d)
    if r.d.main:
        prune_checkpoints(r.dir, keep=2)
    return out


def _final_eval(r: _Run, final: Path) -> dict[str, list[EvalRow]]:
    """Held-out perplexity at --eval-budgets of the source and of the `final` checkpoint (nothing
    with --eval-limit 0)."""
    if r.cfg.eval_limit == 0:
        return {}
    return {"before": _evaluate(r.source, r.cfg, r.d), "after": _evaluate(final, r.cfg, r.d)}


def _write_summary(r: _Run, summary: dict) -> None:
    """eval.json; with the final evaluation, eval.png too (perplexity against size, before and after)."""
    atomic_write(r.dir / "eval.json", lambda p: p.write_text(rows_json(summary)))
    if "before" in summary:
        plot_ppl_vs_size({label: ([row.params_fraction for row in rows], [row.ppl for row in rows])
                          for label, rows in (("before training", summary["before"]),
                                              ("after training", summary["after"]))},
                         r.dir / "eval.png", "Uniform sub-networks before / after elastic training")
