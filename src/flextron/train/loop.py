"""What every training stage shares: torchrun set-up, DDP / FSDP2 wrapping, the LR schedule,
atomic checkpoints with optimizer / scheduler / RNG state (the logs: train/metrics.py)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from flextron.checkpoint import save_checkpoint
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.fsutil import remove_tree, save_torch
from flextron.precision import compute_dtype

STATE_FILE = "training_state.pt"
_STATE_KEYS = ("step", "scheduler", "torch_rng", "cuda_rng")  # beside "optimizer" where not sharded


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """One process, or one of torchrun's (WORLD_SIZE / RANK / LOCAL_RANK set): gloo on CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(f"cuda:{local}") if device.startswith("cuda") else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank=dist.get_rank() if world > 1 else 0, world=world, device=dev)


def wrap(em: ElasticModel, d: Dist, fsdp: bool) -> nn.Module:
    """The module to run forward/backward on: DDP, FSDP2 (a shard per decoder block) or em itself."""
    if d.world == 1 and not fsdp:
        return em
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in em.family.blocks(em.model):
            fully_shard(block)
        fully_shard(em)
        return em
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(em, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def teacher_dtype(name: str, device: torch.device) -> torch.dtype:
    """The teacher's weight dtype: --teacher-dtype, where auto is bf16 on CUDA and fp32 elsewhere."""
    return compute_dtype(name, device) or torch.float32


def shard_frozen(model: ElasticModel) -> None:
    """Shard a frozen model's decoder blocks across ranks (FSDP2); embeddings, final norm and output
    layer stay whole on every rank, so the chunked loss can read them outside its forward."""
    from torch.distributed.fsdp import fully_shard

    for block in model.family.blocks(model.model):  # each block is a root: ask it to reshard after forward
        fully_shard(block, reshard_after_forward=True)


def enable_activation_checkpointing(em: ElasticModel) -> None:
    """Recompute each decoder block's activations in backward instead of keeping them."""
    enable = getattr(em.model, "activation_checkpointing_enable", None)  # the newer transformers name
    if enable is not None:
        enable({"use_reentrant": False})
    else:
        em.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def grad_sync(model: nn.Module, enabled: bool):
    """Context in which backward does (or skips) the cross-rank gradient reduction."""
    from contextlib import nullcontext

    if hasattr(model, "no_sync"):  # DDP
        return nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return nullcontext()


def all_mean(value: float, d: Dist) -> float:
    if d.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.item() / d.world


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """LR multiplier: linear warm-up, then cosine decay to `min_ratio`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_training_checkpoint(model: nn.Module, em: ElasticModel, optimizer: torch.optim.Optimizer,
                             scheduler, tokenizer, out: Path, manifest: dict, state: dict, d: Dist) -> None:
    """Every rank calls this (FSDP gathers); rank 0 writes an elastic checkpoint plus training state."""
    model_sd, optim_sd = get_state_dict(em, optimizer, options=_FULL)
    if d.main:
        weights = {k.removeprefix("model."): v for k, v in model_sd.items()}
        full = {**state, "optimizer": optim_sd, "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        save_checkpoint(em, tokenizer, out, manifest, overwrite=True, state_dict=weights,
                        extra={STATE_FILE: lambda p: save_torch(full, p)})
    if d.world > 1:
        dist.barrier()


def load_training_state(path: Path, model: nn.Module, em: ElasticModel, optimizer, scheduler) -> dict:
    """Restore optimizer, scheduler and RNG from a checkpoint; the weights were loaded with the model."""
    file = path / STATE_FILE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which
        raise FlextronError(f"cannot read {file} ({type(e).__name__}); the checkpoint is corrupt") from None
    if not isinstance(state, dict):
        raise FlextronError(f"{file} holds a {type(state).__name__}, not a training state; the checkpoint is corrupt")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise FlextronError(f"{file} lacks {missing[0]!r}; the checkpoint is corrupt")
    try:
        if "optimizer" in state:  # sharded checkpoints keep it in their shards (train/sharded.py)
            set_state_dict(em, optimizer, model_state_dict={}, optim_state_dict=state["optimizer"],
                           options=StateDictOptions(full_state_dict=True, strict=False))
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:  # well-formed, wrong content
        why = str(e).partition("\n")[0][:200]
        raise FlextronError(f"{file} does not fit the model ({type(e).__name__}: {why}); the checkpoint is corrupt") \
            from None
    return state


def checkpoints(run: Path) -> list[Path]:
    """Complete step checkpoints of a run, oldest first."""
    return sorted((p for p in (run / "checkpoints").glob("step-*")
                   if p.name[5:].isdecimal() and (p / STATE_FILE).is_file()), key=step_of)


def step_of(checkpoint: Path) -> int:
    """The step of a step checkpoint (its directory is `step-N`)."""
    return int(checkpoint.name.removeprefix("step-"))


def prune_checkpoints(run: Path, keep: int) -> None:
    for old in checkpoints(run)[:-keep]:
        remove_tree(old)  # renamed out of the listing first: a kill never leaves a half-deleted step-N
