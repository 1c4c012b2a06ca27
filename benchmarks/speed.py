"""Speed of sub-networks: exported models and the elastic checkpoint's hard slices vs the full model.

On the packaged SmolLM2-135M (converted once with a random unit order: speed does not depend on
the order), batch 1, for each budget and each weight dtype:
- decode tokens/s: greedy steps with a KV cache after a short prompt (median of repeats);
- prefill tokens/s: one forward pass over a long prompt, logits at every position;
for the exported model, and for the elastic checkpoint switched to that sub-network
(`with em.subnet(...)`), both against the full model (timed beside each); plus one per-layer sub-network (the
routers' at 50 % where the checkpoint has routers, else a seeded random one). Where llama.cpp is
installed (`flextron[gguf]`), each sub-network's GGUF export (f32 for fp32, bf16 for bf16) is timed
in llama.cpp in the same run: prefill of the prefill prompt, then decode after it (batch 1).
Ideal speedups: weight bytes read per
decoded token (`Cost.decode_bytes_per_token`) for decode, which is memory-bound; FLOPs per token
at the prefill's mean attended context (half its length, causal) for prefill.

    python benchmarks/speed.py [--device cpu|cuda] [--repeats 5] [--work DIR]
    python benchmarks/speed.py --smoke      # a tiny random model, seconds; writes no results
"""

from __future__ import annotations

import argparse
import gc
import inspect
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from _results import update_section, write_json
from flextron import api
from flextron.budgets import select_subnet
from flextron.checkpoint import load_checkpoint
from flextron.cost import subnet_cost
from flextron.errors import FlextronError
from flextron.export import read_export_info
from flextron.latency import random_subnets
from flextron.latency import sync as sync_device
from flextron.space import Budget, Subnet

BUDGETS = ["1.0", "0.75", "0.5", "0.35"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OUTTYPES = {"fp32": "f32", "bf16": "bf16"}
PER_LAYER = "per-layer"


@torch.inference_mode()
def decode_tps(model: nn.Module, prompt: torch.Tensor, new_tokens: int, repeats: int, sync: Callable) -> float:
    """Greedy decoding tokens/s with a KV cache (prefill of `prompt` not timed); median, after a warm-up."""
    # transformers renamed `past_key_values` to `cache` during 5.x
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    times = []
    for _ in range(repeats + 1):
        out = model(input_ids=prompt, use_cache=True)
        cache, token = out[key], out.logits[:, -1:].argmax(-1)
        sync()
        t = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, use_cache=True, **{key: cache})
            cache, token = out[key], out.logits[:, -1:].argmax(-1)
        sync()
        times.append(time.perf_counter() - t)
    return new_tokens / statistics.median(times[1:])


@torch.inference_mode()
def prefill_tps(model: nn.Module, ids: torch.Tensor, repeats: int, sync: Callable) -> float:
    """Tokens/s of one forward pass over `ids` (no cache); median, after a warm-up."""
    times = []
    for _ in range(repeats + 1):
        sync()
        t = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        sync()
        times.append(time.perf_counter() - t)
    return ids.shape[1] / statistics.median(times[1:])


def tiny_checkpoint(work: Path) -> Path:
    """--smoke: a tiny random Llama (the tests' model) converted with a random order."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import make_bpe_tokenizer, make_model

    src = work / "tiny-hf"
    make_model("llama").save_pretrained(src)
    make_bpe_tokenizer().save_pretrained(src)  # byte-level BPE: llama.cpp runs it too
    return api.convert(str(src), work / "ckpt", order="random", multiple=8, device="cpu", overwrite=True,
                       progress=False)


def bench_checkpoint(work: Path, smoke: bool) -> Path:
    """The packaged model converted with a random order into `work` (kept for reruns), or --smoke's tiny one."""
    if smoke:
        return tiny_checkpoint(work)
    ckpt = work / "ckpt"
    if not ckpt.is_dir():
        api.convert(None, ckpt, order="random", device="cpu", progress=False)
    return ckpt


def hardware_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")


def run(ckpt: Path, work: Path, budgets: list[str], dtypes: list[str], device: str, a: argparse.Namespace
        ) -> list[dict]:
    """One row per dtype x budget with the export's and the elastic slice's speeds and speedups."""
    sync = partial(sync_device, device)
    gen = torch.Generator().manual_seed(0)
    exports = {}
    for b in budgets:
        try:
            exports[b] = api.export(ckpt, b, work / f"export-{b}", overwrite=True)
        except FlextronError as e:
            print(f"skipping budget {b}: {e}")
    per_layer = per_layer_subnet(ckpt)
    exports[PER_LAYER] = api.export(ckpt, None, work / "export-per-layer", overwrite=True, subnet=per_layer)
    llamacpp = llamacpp_available()
    rows = []
    for name in dtypes:
        dtype = DTYPES[name]
        em, _, _ = load_checkpoint(ckpt, device=device, dtype=dtype)
        vocab = em.config.vocab_size
        prompt = torch.randint(0, vocab, (1, a.prompt), generator=gen).to(device)
        long = torch.randint(0, vocab, (1, a.prefill), generator=gen).to(device)

        def speeds(model: nn.Module, prompt: torch.Tensor = prompt, long: torch.Tensor = long) -> dict:
            return {"decode_tps": decode_tps(model, prompt, a.new_tokens, a.repeats, sync),
                    "prefill_tps": prefill_tps(model, long, a.repeats, sync)}

        full_model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval()
        full_cost = subnet_cost(em, None, context=a.prefill // 2, weight_dtype_bytes=dtype.itemsize)
        full_gguf = gguf(ckpt, em.space.full(), work / "full.gguf", name) if llamacpp else None  # written once
        for b, d in exports.items():
            full = speeds(full_model)  # timed beside each sub-network: a drifting machine cancels out
            print(f"{name} full model: decode {full['decode_tps']:.1f} tok/s, prefill {full['prefill_tps']:.0f} tok/s")
            subnet = Subnet(**{k: list(v) for k, v in read_export_info(d)["subnet"].items()})
            cost = subnet_cost(em, subnet, context=a.prefill // 2, weight_dtype_bytes=dtype.itemsize)
            model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
            exported = speeds(model)
            del model
            with em.subnet(subnet):
                elastic = speeds(em.model)
            ideal = {"decode": full_cost.decode_bytes_per_token / cost.decode_bytes_per_token,
                     "prefill": full_cost.flops_per_token / cost.flops_per_token}
            uniform = b != PER_LAYER
            row = {"dtype": name, "budget": b, "mlp": subnet.mlp[0] if uniform else "per-layer",
                   "attn_units": subnet.attn[0] if uniform else "per-layer", "subnet": subnet.to_dict(),
                   "params_fraction": cost.params_nonembed / full_cost.params_nonembed, "full": full,
                   "ideal": ideal}
            runs = [("export", exported, full), ("elastic", elastic, full)]
            if llamacpp:  # the full GGUF is timed beside each sub-network: a drifting machine cancels out
                row["llamacpp_full"] = gguf_speeds(full_gguf, a)
                runs.append(("llamacpp", gguf_speeds(gguf(ckpt, subnet, work / "subnet.gguf", name), a),
                             row["llamacpp_full"]))
            for path, got, base in runs:
                speedup = {k: got[f"{k}_tps"] / base[f"{k}_tps"] for k in ideal}
                row[path] = {**got, "speedup": speedup,
                             "fraction_of_ideal": {k: speedup[k] / ideal[k] for k in ideal}}
            rows.append(row)
            print(f"{name} budget {b}: " + ", ".join(
                f"{p} decode {row[p]['decode_tps']:.1f} tok/s (x{row[p]['speedup']['decode']:.2f}), "
                f"prefill {row[p]['prefill_tps']:.0f} tok/s (x{row[p]['speedup']['prefill']:.2f})"
                for p in ("export", "elastic")) + f"; ideal x{ideal['decode']:.2f} / x{ideal['prefill']:.2f}")
        del em, full_model
        gc.collect()
    return rows


def llamacpp_available() -> bool:
    try:
        from flextron.llamacpp import runtime_version

        print(f"llama.cpp columns: {runtime_version()}")
        return True
    except FlextronError as e:
        print(f"no llama.cpp columns: {e}")
        return False


def per_layer_subnet(ckpt: Path) -> Subnet:
    """The routers' sub-network at 50 % where the checkpoint has routers, else a seeded random per-layer one."""
    em, _, _ = load_checkpoint(ckpt, device="cpu")
    if em.routers is not None:
        return select_subnet(em, Budget(fraction=0.5))
    return next(s for s in random_subnets(em, 100, seed=0) if len(set(s.mlp)) > 1 or len(set(s.attn)) > 1)


def gguf(ckpt: Path, subnet: Subnet, path: Path, dtype: str) -> Path:
    """`subnet` exported to a GGUF at `path` (f32 for fp32, bf16 for bf16)."""
    return api.export(ckpt, None, path, overwrite=True, subnet=subnet, format="gguf", outtype=OUTTYPES[dtype])


def gguf_speeds(path: Path, a: argparse.Namespace) -> dict:
    """llama.cpp tokens/s of a GGUF: prefill of `a.prefill` tokens, then decode after them."""
    from flextron.llamacpp import measure

    t = measure(path, context=a.prefill, decode_steps=a.new_tokens, repeats=a.repeats, threads=a.threads)
    return {"decode_tps": 1e3 / t["decode_ms"], "prefill_tps": 1e3 * a.prefill / t["prefill_ms"]}


def llamacpp_table(rows: list[dict]) -> list[str]:
    lines = [
        "| dtype (GGUF) | budget | decode tok/s: llama.cpp full / export, HF export | llama.cpp decode speedup "
        "(ideal) | prefill tok/s: llama.cpp full / export, HF export | llama.cpp prefill speedup (ideal) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        c, f, e, i = r["llamacpp"], r["llamacpp_full"], r["export"], r["ideal"]
        cells = [f"{r['dtype']} ({OUTTYPES[r['dtype']]})", r["budget"]]
        for k, fmt in (("decode", ".1f"), ("prefill", ".0f")):
            cells.append(f"{f[f'{k}_tps']:{fmt}} / {c[f'{k}_tps']:{fmt}}, {e[f'{k}_tps']:{fmt}}")
            cells.append(f"{c['speedup'][k]:.2f} ({i[k]:.2f}; {c['fraction_of_ideal'][k]:.0%} of ideal)")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| dtype | budget | MLP width, KV groups | decode tok/s: full / export / elastic | decode speedup "
        "export / elastic (ideal) | prefill tok/s: full / export / elastic | prefill speedup export / elastic "
        "(ideal) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e, s, f, i = r["export"], r["elastic"], r["full"], r["ideal"]
        cells = [r["dtype"], r["budget"], f"{r['mlp']}, {r['attn_units']} ({r['params_fraction']:.0%})"]
        for k, fmt in (("decode", ".1f"), ("prefill", ".0f")):
            cells.append(" / ".join(format(x[f"{k}_tps"], fmt) for x in (f, e, s)))
            cells.append(f"{e['speedup'][k]:.2f} / {s['speedup'][k]:.2f} ({i[k]:.2f}; "
                         f"{e['fraction_of_ideal'][k]:.0%} / {s['fraction_of_ideal'][k]:.0%} of ideal)")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--budgets", default=",".join(BUDGETS))
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens before decoding")
    p.add_argument("--new-tokens", type=int, default=64, help="decoded tokens per repeat")
    p.add_argument("--prefill", type=int, default=512, help="prefill prompt tokens")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    p.add_argument("--work", default=None, help="keep the checkpoint and exports here (default: a temp dir)")
    p.add_argument("--smoke", action="store_true", help="tiny random model and few tokens; writes no results")
    a = p.parse_args()
    if a.smoke:
        a.prompt, a.new_tokens, a.prefill, a.repeats = 8, 4, 32, 1
    hf_logging.disable_progress_bar()
    device = api.resolve_device(a.device)
    hardware = hardware_name(device)
    print(f"device: {device} ({hardware}), torch {torch.__version__}")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        ckpt = bench_checkpoint(work, a.smoke)
        rows = run(ckpt, work, [b for b in a.budgets.split(",") if b], a.dtypes.split(","), device, a)
    model_name = "a tiny random Llama (smoke run)" if a.smoke else "SmolLM2-135M-Instruct (packaged)"
    command = "python benchmarks/speed.py" + (f" --device {a.device}" if a.device != "cpu" else "")
    lines = [
        "## Speed: exported sub-networks and elastic slices vs the full model",
        "",
        f"`{command}` — {model_name} (random unit order), batch 1, {device} ({hardware}), "
        f"torch {torch.__version__}, {round(time.time() - t0)} s. Decode: {a.new_tokens} greedy tokens with a KV "
        f"cache after a {a.prompt}-token prompt; prefill: one {a.prefill}-token forward pass; median of "
        f"{a.repeats}. Ideal speedup: weight bytes read per decoded token (decode), FLOPs per token "
        f"(prefill). Elastic: the checkpoint's own hard slices (`em.subnet`), no export. The full model is "
        "timed beside each row.",
        "",
        *table(rows),
    ]
    if rows and "llamacpp" in rows[0]:
        from flextron.llamacpp import default_threads, runtime_version

        lines += ["", f"{runtime_version()}, {a.threads or default_threads()} threads, same run: decode after the "
                  f"{a.prefill}-token prefill.", "", *llamacpp_table(rows)]
    print("\n".join(lines))
    if a.smoke:
        return
    write_json("speed", {"command": command, "device": device, "hardware": hardware, "torch": torch.__version__,
                         "seconds": round(time.time() - t0), "prompt": a.prompt, "new_tokens": a.new_tokens,
                         "prefill": a.prefill, "repeats": a.repeats, "rows": rows})
    update_section("speed", "\n".join(lines))


if __name__ == "__main__":
    main()
