"""The elastic checkpoint: a plain HF model directory (permuted weights) plus a manifest.

Because `ElasticLinear` keeps the HF parameter names, the weights are an ordinary
safetensors checkpoint that `AutoModelForCausalLM` can read; `flextron.json` adds what
makes it elastic (family, elastic space, importance, calibration, versions).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from flextron import __version__
from flextron.config import ElasticSpace
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.families import FAMILIES
from flextron.fsutil import atomic_dir
from flextron.latency import LATENCY_FILE, load_table
from flextron.routers import Routers

MANIFEST = "flextron.json"
FORMAT_VERSION = 1
_REQUIRED = ("config.json", MANIFEST)


def save_checkpoint(em: ElasticModel, tokenizer: PreTrainedTokenizerBase, out: Path,
                    manifest: dict, overwrite: bool = False, state_dict: dict | None = None,
                    extra: dict[str, Callable[[Path], None]] | None = None) -> Path:
    """Write weights, tokenizer, manifest (and any latency table and routers) into `out` atomically.

    `state_dict` replaces the model's own (e.g. weights gathered from FSDP shards); `extra`
    maps file names to writers of further files (training state).
    """
    full = {
        **manifest,
        "format_version": FORMAT_VERSION,
        "flextron_version": __version__,
        "family": em.family.name,
        "elastic_space": em.space.to_dict(),
    }
    em.set_subnet(None)
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        em.model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(full, indent=1))
        if em.latency is not None:
            (tmp / LATENCY_FILE).write_text(json.dumps(em.latency, indent=1))
        if em.routers is not None:
            em.routers.save(tmp)
        for name, write in (extra or {}).items():
            write(tmp / name)
    return Path(out)


def read_manifest(ckpt: Path) -> dict:
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise FlextronError(f"checkpoint {ckpt} does not exist; create one with `flextron convert`")
    for name in _REQUIRED:
        if not (ckpt / name).is_file():
            raise FlextronError(
                f"checkpoint {ckpt} lacks {name}; it is not a complete flextron checkpoint "
                "(re-run `flextron convert`)"
            )
    if not any(ckpt.glob("*.safetensors")):
        raise FlextronError(f"checkpoint {ckpt} has no safetensors weights; re-run `flextron convert`")
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        if manifest.get("format_version") != FORMAT_VERSION or manifest.get("family") not in FAMILIES:
            raise ValueError("unknown format or family")
        ElasticSpace.from_dict(manifest["elastic_space"])
    except (ValueError, KeyError, TypeError) as e:
        raise FlextronError(f"checkpoint {ckpt}: {MANIFEST} is corrupt ({e}); re-run `flextron convert`") from None
    return manifest


def load_checkpoint(ckpt: Path, device: str = "cpu", dtype: torch.dtype = torch.float32
                    ) -> tuple[ElasticModel, PreTrainedTokenizerBase, dict]:
    """Load an elastic checkpoint: (elastic model at full width, tokenizer, manifest)."""
    manifest = read_manifest(ckpt)
    try:
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise FlextronError(
            f"checkpoint {ckpt} is corrupt or unreadable ({str(e).splitlines()[0][:200]}); "
            "re-run `flextron convert`"
        ) from None
    space = ElasticSpace.from_dict(manifest["elastic_space"])
    em = ElasticModel(model.to(device).eval(), space, FAMILIES[manifest["family"]])
    em.latency = load_table(ckpt)
    em.routers = Routers.load(Path(ckpt), space)
    if em.routers is not None:
        em.routers.to(device)
    return em, tokenizer, manifest
