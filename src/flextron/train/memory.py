"""A per-rank memory estimate of an elastic training run, printed before it starts (in the spirit of
`accelerate estimate-memory`): counted from the model's parameters and the run's settings.

Exact for weights, gradients, AdamW state and the teacher; activations and the loss are
estimates (saved activations per token and layer of a pre-norm decoder, one loss chunk).
"""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass

from flextron.elastic import ElasticModel
from flextron.options import TrainOptions

GIB = 1 << 30


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux: VmHWM of its own address space, because ru_maxrss
    survives exec and a child started by a large process would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank."""

    weights: int
    grads: int
    optimizer: int
    teacher: int
    activations: int
    loss: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in asdict(self).items())
        return f"estimated memory per rank: {self.total / GIB:.2f} GiB ({parts})"


def estimate_memory(em: ElasticModel, cfg: TrainOptions, world: int = 1, teacher_bytes: int = 4,
                    autocast_bytes: int = 2) -> MemoryEstimate:
    """Per-rank bytes of a run of `cfg` on `world` processes; FSDP (`cfg.fsdp`) shards the student's
    weights, gradients and optimizer state and the teacher's decoder blocks across ranks."""
    shard = world if cfg.fsdp else 1
    params = sum(p.numel() for p in em.parameters())
    block_params = sum(p.numel() for b in em.family.blocks(em.model) for p in b.parameters())
    c = em.config
    hidden = c.hidden_size
    mlp = max(b.mlp.n_units for b in em.blocks)
    vocab = em.model.get_output_embeddings().weight.shape[0]
    tokens = cfg.micro_batch * cfg.seq_len
    # Saved per token and layer: the block input (fp32 residual) when recomputed; else ~8 hidden-sized
    # tensors (norms, q/k/v/o inputs and outputs) and ~3 MLP-sized ones in the compute dtype.
    per_layer = 4 * hidden if cfg.activation_checkpointing else autocast_bytes * (8 * hidden + 3 * mlp)
    activations = tokens * len(em.blocks) * per_layer + 2 * tokens * hidden * 4  # + both final hidden states
    chunk = min(cfg.loss_chunk, tokens)
    loss = 6 * chunk * vocab * 4 + vocab * hidden * 4  # a chunk's fp32 temporaries + the output-layer gradient
    return MemoryEstimate(
        weights=4 * params // shard, grads=4 * params // shard, optimizer=8 * params // shard,
        teacher=teacher_bytes * (block_params // shard + params - block_params),
        activations=activations, loss=loss)
