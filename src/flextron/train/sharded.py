"""Sharded training checkpoints (torch.distributed.checkpoint): every rank writes its own shards of
weights and optimizer state, nothing is gathered. A step directory holds `dcp/` (the shards) and
the small training state (step, scheduler, RNG); the last step of a run also holds the gathered
weights as an ordinary elastic checkpoint, so `flextron export` / `eval` read it directly.

Resume reads the shards back into the same sharding. DCP itself could reshard to another world
size, but `train` refuses one: the per-process micro-batch would change the global batch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from flextron.checkpoint import save_checkpoint
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.fsutil import atomic_dir, save_torch
from flextron.train.loop import STATE_FILE, Dist

DCP_DIR = "dcp"


def save_sharded_checkpoint(em: ElasticModel, optimizer: torch.optim.Optimizer, scheduler, tokenizer, out: Path,
                            manifest: dict, state: dict, d: Dist, elastic: bool) -> None:
    """Every rank calls this; shards go to `out`/dcp, and with `elastic` the gathered weights beside them."""
    shards = out.parent / f".{out.name}.dcp"
    if d.main:
        shutil.rmtree(shards, ignore_errors=True)
    if d.world > 1:
        dist.barrier()
    model_sd, optim_sd = get_state_dict(em, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=shards,
             no_dist=not dist.is_initialized())
    weights = get_model_state_dict(em, options=StateDictOptions(full_state_dict=True, cpu_offload=True)) \
        if elastic else None
    if d.main:
        small = {**state, "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        extra = {STATE_FILE: lambda p: save_torch(small, p), DCP_DIR: lambda p: shards.rename(p)}
        if elastic:
            save_checkpoint(em, tokenizer, out, manifest, overwrite=True, extra=extra,
                            state_dict={k.removeprefix("model."): v for k, v in weights.items()})
        else:
            with atomic_dir(out, overwrite=True) as tmp:
                for name, write in extra.items():
                    write(tmp / name)
    if d.world > 1:
        dist.barrier()


def load_sharded_state(path: Path, em: ElasticModel, optimizer: torch.optim.Optimizer) -> None:
    """Weights and optimizer state of this rank's shards from `path`/dcp, in place."""
    model_sd, optim_sd = get_state_dict(em, optimizer)  # initialises the optimizer state to load into
    target = {"model": model_sd, "optimizer": optim_sd}
    try:
        dcp.load(target, checkpoint_id=path / DCP_DIR, no_dist=not dist.is_initialized())
    except (Exception, dcp.CheckpointException) as e:  # truncated or foreign shards (DCP fails them on every rank)
        raise FlextronError(f"cannot read the shards in {path / DCP_DIR} ({type(e).__name__}); the checkpoint is "
                            "corrupt") from None
    set_state_dict(em, optimizer, model_state_dict=target["model"], optim_state_dict=target["optimizer"])
    optimizer.zero_grad(set_to_none=True)


def is_sharded(path: Path) -> bool:
    return (Path(path) / DCP_DIR).is_dir()
