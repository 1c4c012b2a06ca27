"""Stage 0, `flextron convert`: a Hugging Face model as an elastic checkpoint — its elastic space,
its units (and, with hidden-size choices, the residual stream's channels) sorted by importance on
calibration text (or randomly, the ablation), a manifest of how."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from flextron.assets import load_hf
from flextron.checkpoint import save_checkpoint
from flextron.data import default_splits, sample_sequences, tokenize
from flextron.elastic import ElasticModel
from flextron.errors import FlextronError
from flextron.families import detect_family
from flextron.fsutil import check_output_dir
from flextron.importance import default_attn_score, measure_importance, random_importance, sort_by_importance
from flextron.options import ConvertOptions
from flextron.precision import compute_dtype
from flextron.samples import own_tokens
from flextron.selfcheck import check_hidden, checked_elastic
from flextron.space import ElasticSpace


def _calibration_ids(o: ConvertOptions, em: ElasticModel, tok: PreTrainedTokenizerBase, progress: bool) -> Tensor:
    """The calibration tokens: the model's own text ("self"), the packaged train split ("default") or a
    .txt file's."""
    if o.calib_data == "self":
        return own_tokens(em, tok, o.calib_sequences * o.calib_seq_len, o.calib_seq_len, o.seed, progress=progress)
    if o.calib_data == "default":
        return tokenize(tok, default_splits()["train"])
    path = Path(o.calib_data)
    if not path.is_file():
        raise FlextronError(f"calibration file {path} does not exist; pass a .txt file, 'self' or 'default'")
    try:
        return tokenize(tok, path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise FlextronError(f"cannot read calibration file {path}: {e}") from None


def _read_space(path: str) -> ElasticSpace:
    try:
        return ElasticSpace.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FlextronError(f"cannot read the elastic space {path} ({e}); it needs "
                            '{"mlp": [[widths per layer]], "attn": [[units per layer]]}') from None


def _with_hidden(space: ElasticSpace, size: int, o: ConvertOptions) -> ElasticSpace:
    """`space` with the hidden sizes --hidden-fractions asks for (a --space file may list them itself)."""
    if o.hidden_fractions is None:
        return space
    asked = space.with_hidden(size, o.hidden_fractions, o.hidden_multiple)
    if space.hidden is not None and space.hidden != asked.hidden:
        raise FlextronError(f"--hidden-fractions gives hidden sizes {asked.hidden}, the space file {space.hidden}; "
                            "drop one of them")
    if len(asked.hidden) == 1:
        raise FlextronError(f"--hidden-fractions {','.join(f'{f:g}' for f in o.hidden_fractions)} in multiples of "
                            f"{o.hidden_multiple} leave only the full hidden size {size}; lower --hidden-multiple")
    return asked


def convert(model: str | None, out: Path, o: ConvertOptions, *, device: str, overwrite: bool, progress: bool) -> Path:
    """Load an HF model (None: the packaged one) on `device`, score and sort its units on
    calibration text, save the elastic checkpoint in `out`; see `flextron.api.convert`."""
    space = None if o.space is None else _read_space(o.space)
    check_output_dir(out, overwrite)
    autocast = compute_dtype(o.dtype, device)
    # bf16 on CUDA: the weights load in bf16 (no fp32 copy of a large model on the device) and are saved so.
    weights = torch.bfloat16 if autocast is torch.bfloat16 and device.startswith("cuda") else torch.float32
    if space is not None and o.attn_unit not in (None, space.attn_unit):
        raise FlextronError(f"--attn-unit {o.attn_unit} contradicts the space file's attn_unit {space.attn_unit!r}; "
                            "drop one of them")
    attn_unit = space.attn_unit if space is not None else o.attn_unit or "group"
    hf, tok, source = load_hf(model, dtype=weights, device=device)
    em = checked_elastic(hf, detect_family(hf, o.family), attn_unit)
    first = em.blocks[0]
    space = space or ElasticSpace.default(len(em.blocks), first.mlp.n_units, first.attn.n_units,
                                          o.mlp_fractions, o.attn_fractions, o.multiple, attn_unit,
                                          first.geometry.n_kv_heads)
    if o.min_layers is not None and not (o.depth or space.depth):
        raise FlextronError("--min-layers is the floor of layers a depth space keeps; add --depth (or give a "
                            "--space file whose lists start with 0), or drop --min-layers")
    if o.depth:
        space = space.with_depth(o.min_layers, space.skip_order)
    elif o.min_layers is not None:
        space = dataclasses.replace(space, min_layers=o.min_layers)
    em.set_space(_with_hidden(space, em.hidden_size, o))
    if em.space.hidden is not None:
        check_hidden(em)
    if o.order == "importance":
        ids = _calibration_ids(o, em, tok, progress)
        seqs = sample_sequences(ids, o.calib_sequences, o.calib_seq_len, o.seed)
        imp = measure_importance(em, seqs, o.batch_size, autocast, progress)
    else:
        imp = random_importance(em, o.seed)
    imp = sort_by_importance(em, imp)
    if em.space.depth and imp.layers is not None and em.space.skip_order is None:  # a --space file's order stays
        em.set_space(dataclasses.replace(em.space, skip_order=imp.skip_order()))
    manifest = {
        "source_model": source,
        "order": o.order,
        "calibration": {"n_sequences": o.calib_sequences, "seq_len": o.calib_seq_len, "batch_size": o.batch_size,
                        "seed": o.seed, "source": o.calib_data, "attn_score": default_attn_score(em)},
        "importance": imp.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return save_checkpoint(em, tok, out, manifest, overwrite=overwrite)
