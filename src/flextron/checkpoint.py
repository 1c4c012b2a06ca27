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
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.families import FAMILIES
from flextron.fsutil import atomic_dir, clean_leftovers, file_sha256
from flextron.latency_table import LATENCY_FILE, LatencyTable
from flextron.routers import Routers
from flextron.space import ElasticSpace
from flextron.version import __version__

MANIFEST = "flextron.json"
FORMAT_VERSION = 1
_REQUIRED = ("config.json", MANIFEST)
_MANIFEST_KEYS = ("format_version", "family", "elastic_space")
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def weight_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every safetensors file in `directory` (model weights and routers), by file name."""
    return {p.name: file_sha256(p) for p in sorted(Path(directory).glob("*.safetensors"))}


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
    with em.subnet(None), atomic_dir(Path(out), overwrite=overwrite) as tmp:
        em.model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if em.latency is not None:
            (tmp / LATENCY_FILE).write_text(json.dumps(em.latency.to_dict(), indent=1))
        if em.routers is not None:
            em.routers.save(tmp)
        for name, write in (extra or {}).items():
            write(tmp / name)
        full["weights_sha256"] = weight_hashes(tmp)
        (tmp / MANIFEST).write_text(json.dumps(full, indent=1))
    return Path(out)


def read_manifest(ckpt: Path) -> dict:
    """The checkpoint's validated manifest; refuses a directory that is not a complete checkpoint."""
    ckpt = Path(ckpt)
    if not ckpt.exists():
        clean_leftovers(ckpt.parent)  # a checkpoint hidden by a killed overwrite comes back
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
        if not isinstance(manifest, dict):
            raise ValueError(f"a JSON {type(manifest).__name__}, not an object")
        missing = [k for k in _MANIFEST_KEYS if k not in manifest]
        if missing:
            raise ValueError(f"no {missing[0]!r}")
        if manifest["format_version"] != FORMAT_VERSION or manifest["family"] not in FAMILIES:
            raise ValueError("unknown format or family")
        if not isinstance(manifest.get("weights_sha256", {}), dict):
            raise ValueError("weights_sha256 is not an object")
        ElasticSpace.from_dict(manifest["elastic_space"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, FlextronError) as e:
        raise FlextronError(f"checkpoint {ckpt}: {MANIFEST} is corrupt ({e}); re-run `flextron convert`") from None
    return manifest


def hash_difference(recorded: dict[str, str], found: dict[str, str]) -> str | None:
    """The first file (by name) whose sha256 in `found` is not the one `recorded`, and how
    ("NAME is missing", ...); None when they agree."""
    for name in sorted(set(recorded) | set(found)):
        if recorded.get(name) != found.get(name):
            what = "is missing" if name not in found else "was not saved with it" if name not in recorded \
                else "differs from the one saved (modified or truncated)"
            return f"{name} {what}"
    return None


def weights_id(manifest: dict) -> str:
    """The identity of a checkpoint's weights (their recorded sha256s): the key of what they generate."""
    return json.dumps(manifest.get("weights_sha256"), sort_keys=True)


def verify_hashes(ckpt: Path, manifest: dict) -> None:
    """Refuse weights files whose sha256 differs from the one recorded at save (checkpoints written
    before hashes were recorded pass)."""
    recorded = manifest.get("weights_sha256")
    if recorded is not None and (what := hash_difference(recorded, weight_hashes(ckpt))):
        raise FlextronError(f"checkpoint {ckpt}: {what}; re-run `flextron convert`, or load with "
                            "verify=False (--no-verify) to skip this check")


def _damaged(what: str, where: Path | str, tensor: str, why: str, remedy: str) -> FlextronError:
    return FlextronError(f"{what} {where}: tensor {tensor} {why}; the {what} is damaged, {remedy}")


def check_weight_files(directory: Path, what: str = "checkpoint", remedy: str = "re-run `flextron convert`",
                       floats_only: bool = True) -> None:
    """Before loading: every `model*.safetensors` in `directory` opens whole (a complete header, as much
    data as it lists: a truncated file fails here, named) and, where `floats_only`, stores floating-point
    tensors only. `what` (checkpoint, export, ...) and `remedy` word the one-line error."""
    for path in sorted(Path(directory).glob("model*.safetensors")):
        try:
            with safe_open(path, "pt") as f:
                dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
        except (OSError, SafetensorError) as e:
            raise FlextronError(f"{path} is truncated or corrupt ({str(e).splitlines()[0][:200]}); {remedy}") from None
        for name, dtype in sorted(dtypes.items()):
            if floats_only and dtype not in _FLOAT_DTYPES:
                raise _damaged(what, directory, name, f"is stored as {dtype}, not a floating-point type", remedy)


def verify_weights(source: Path | str, model: torch.nn.Module, loading_info: dict, what: str = "checkpoint",
                   remedy: str = "re-run `flextron convert`") -> None:
    """After loading: every tensor the architecture needs was in the files, with its shape and finite values."""
    if loading_info["missing_keys"]:
        raise _damaged(what, source, sorted(loading_info["missing_keys"])[0], "is missing", remedy)
    if loading_info["mismatched_keys"]:
        name, saved, needed = sorted(loading_info["mismatched_keys"])[0]  # transformers: (key, file, model)
        raise _damaged(what, source, name, f"has the wrong shape {list(saved)} (the model needs {list(needed)})",
                       remedy)
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise _damaged(what, source, name, "holds NaN or infinite values", remedy)


def load_checkpoint(ckpt: Path, device: str = "cpu", dtype: torch.dtype = torch.float32, verify: bool = True
                    ) -> tuple[ElasticModel, PreTrainedTokenizerBase, dict]:
    """Load an elastic checkpoint: (elastic model at full width, tokenizer, manifest).

    Every needed tensor must be present, well-shaped and finite; `verify` also checks the weights
    files against the sha256 recorded at save (one read of the files).
    """
    manifest = read_manifest(ckpt)
    if verify:
        verify_hashes(ckpt, manifest)
    check_weight_files(ckpt)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype, trust_remote_code=False,
                                                           ignore_mismatched_sizes=True, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(ckpt, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        raise FlextronError(
            f"checkpoint {ckpt} is corrupt or unreadable ({str(e).splitlines()[0][:200]}); "
            "re-run `flextron convert`"
        ) from None
    verify_weights(ckpt, model, info)
    space = ElasticSpace.from_dict(manifest["elastic_space"])
    em = ElasticModel(model.to(device).eval(), space, FAMILIES[manifest["family"]])
    em.latency = LatencyTable.load(ckpt, em)
    em.routers = Routers.load(Path(ckpt), space)
    if em.routers is not None:
        em.routers.to(device)
    return em, tokenizer, manifest
