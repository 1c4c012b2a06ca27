"""The bad-input campaign: every invalid CLI input and server request we know of, on a tiny checkpoint.

Each CLI input must end with exit code 2 and a one-line `error:` naming the problem, never a
traceback, and leave every watched file byte-for-byte intact. Most cases run in-process through
`flextron.cli.main` (a subprocess costs seconds of imports); a few run as real subprocesses. Each
bad request to `flextron serve` (over real HTTP) must get a 4xx with an OpenAI-style JSON error, no
traceback in the server's log, and leave the server serving. The counts print with `-s`.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from flextron import api
from flextron.cli import main
from flextron.options import MAX_STOP_CHARS
from flextron.results import rows_json
from helpers import (
    CONFIG,
    full_disk,
    make_device,
    make_model,
    make_tokenizer,
    random_docs,
    rewrite_weights,
    run_clis,
    running,
    word_text,
    write_requests,
)


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    root = tmp_path_factory.mktemp("campaign")
    make_model("llama").save_pretrained(root / "hf")
    make_tokenizer().save_pretrained(root / "hf")
    (root / "data.txt").write_text(word_text(3000))
    api.convert(str(root / "hf"), root / "ck", calib_sequences=4, calib_seq_len=16, calib_data=str(root / "data.txt"),
                multiple=8, device="cpu", progress=False)
    api.export(root / "ck", "0.5", root / "export")
    (root / "victim.json").write_text('{"keep": true}')
    (root / "link.json").symlink_to(root / "victim.json")
    (root / "linkdir").symlink_to(root / "export")
    os.mkfifo(root / "fifo.json")
    make_device(root / "device.json")  # a device node of our own: a regression must never hit the real /dev
    (root / "file").write_text("a file, not a directory")
    (root / "outdir").mkdir()
    (root / "result.json").write_text(rows_json(api.evaluate(root / "ck", budgets=["1.0"], limit=1, seq_len=16,
                                                             progress=False)))
    for name, space in (("space_inf.json", '{"mlp": [[1e400]], "attn": [[1]]}'),
                        ("space_float.json", '{"mlp": [[24.5, 96], [96]], "attn": [[4], [4]]}'),
                        ("space_bool.json", '{"mlp": [[true, 96], [96]], "attn": [[4], [4]]}'),
                        ("space_null.json", "null")):
        (root / name).write_text(space)
    damaged = {
        "ck_null": lambda p: (p / "flextron.json").write_text("null"),
        "ck_array": lambda p: (p / "flextron.json").write_text("[1, 2]"),
        "ck_missing": lambda p: rewrite_weights(p, lambda w: w.pop("model.layers.1.mlp.down_proj.weight")),
        "ck_nan": lambda p: rewrite_weights(p, lambda w: w["model.layers.0.mlp.up_proj.weight"].fill_(float("nan"))),
        "ck_latency": lambda p: (p / "latency.json").write_text(json.dumps(fake_latency(-1e6))),
        "ck_latency_deep": lambda p: (p / "latency.json").write_text("[" * 100_000),
        "ck_routers": lambda p: damage_routers(p),
    }
    for key in ("budgets", "tasks", "calib_data", "mlp_fractions", "host", "out", "verify"):
        (root / f"null_{key}.yaml").write_text(f"{key}: null\n")
    (root / "aliases.yaml").write_text("a: &x [1, 1]\nb: &y [*x, *x]\nbudgets: [*y, *y]\n")
    for name, damage in damaged.items():
        subprocess.run(["cp", "-r", str(root / "ck"), str(root / name)], check=True)
        damage(root / name)
    for name in ("hf", "export"):
        subprocess.run(["cp", "-r", str(root / name), str(root / f"{name}_cut")], check=True)
    write_requests(root / "tasks_cut.jsonl.gz", random_docs(40))
    for cut in (root / "hf_cut" / "model.safetensors", root / "export_cut" / "model.safetensors",
                root / "tasks_cut.jsonl.gz"):  # cut short, as by a full disk or an interrupted copy
        cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    for name, docs in (("tasks_label.jsonl.gz", [([("w1", " w2"), ("w1", " w3")], -5)]),
                       ("tasks_empty.jsonl.gz", [([("w1", " w2"), ("w1", "")], 0)])):
        write_requests(root / name, docs)
    return root


def fake_latency(overhead: float) -> dict:
    """A latency table of the arena's space (MLP widths 24-96 in steps of 24, 1-4 attention units)."""
    fit = {"overhead": overhead, "mlp": {str(w): w / 24 for w in (24, 48, 72, 96)},
           "attn": {str(a): a for a in range(1, 5)}}
    return {"decode_ms": fit, "prefill_ms": fit}


def damage_routers(ckpt: Path) -> None:
    """Routers whose check kept a sub-network of MLP width 999, which the space does not hold."""
    from flextron.options import RouteOptions
    from flextron.routers import Routers, StaticRouter
    from flextron.space import ElasticSpace

    space = ElasticSpace.from_dict(json.loads((ckpt / "flextron.json").read_text())["elastic_space"])
    routers = Routers(StaticRouter(space, (0.5, 1.0)), "params", RouteOptions(budgets=(0.5, 1.0)))
    routers.save(ckpt)
    cfg = json.loads((ckpt / "routers.json").read_text())
    full = space.full()
    cfg["checked"] = [{"budget": 0.5, "kept": "uniform", "subnet": {"mlp": [999] * len(full.mlp), "attn": full.attn}}]
    (ckpt / "routers.json").write_text(json.dumps(cfg))


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every regular file under `root` (symlinks and FIFOs by their target / kind)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p)] = "->" + os.readlink(p)
        elif p.is_fifo() or p.is_char_device():
            out[str(p)] = "fifo" if p.is_fifo() else "device"
        elif p.is_file():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def cases(r: Path) -> list[tuple[list[str], str]]:
    """(argv, a part of the one-line error it must give)."""
    ck, train = str(r / "ck"), ["train", str(r / "ck"), "--out", str(r / "run"), "--data", str(r / "data.txt")]
    conv = ["convert", str(r / "hf"), "--out", str(r / "new"), "--calib-data", str(r / "data.txt")]
    ev, prof = ["eval", ck, "--limit", "1", "--seq-len", "16"], ["profile", ck]
    route, gen = ["route", ck, "--data", str(r / "data.txt")], ["generate", ck, "w1 w2", "--raw"]
    exp = ["export", ck, "--budget", "0.5", "--out"]
    return [
        # training options
        ([*train, "--max-steps", "1", "--lr", "nan"], "--lr: must be a finite number"),
        ([*train, "--max-steps", "1", "--lr", "inf"], "--lr: must be a finite number"),
        ([*train, "--max-steps", "1", "--lr", "1e39"], "--lr: must be in"),
        ([*train, "--max-steps", "1", "--weight-decay", "-1"], "--weight-decay: must be in"),
        ([*train, "--max-steps", "0"], "--max-steps: must be in"),
        ([*train, "--max-steps", "-1"], "--max-steps: must be in"),
        ([*train, "--max-steps", "1e309"], "--max-steps: must be an integer"),
        ([*train, "--max-steps", "1.5"], "--max-steps: must be an integer"),
        ([*train, "--max-steps", "nan"], "--max-steps: must be an integer"),
        ([*train, "--max-steps", "ten"], "--max-steps: expected a number"),
        ([*train, "--tokens", "-5"], "--tokens: must be in"),
        ([*train, "--max-steps", "1", "--tokens", "100"], "exactly one of --max-steps or --tokens"),
        ([*train, "--max-steps", "1", "--eval-limit", "-3"], "--eval-limit: must be in"),
        ([*train, "--max-steps", "1", "--eval-budgets", "1.7"], "--eval-budgets must be in"),
        ([*train, "--max-steps", "1", "--eval-budgets", "nan"], "--eval-budgets: expected finite numbers"),
        ([*train, "--max-steps", "1", "--budgets", "0,0.5"], "--budgets must be in"),
        ([*train, "--max-steps", "1", "--seq-len", "0"], "--seq-len: must be in"),
        ([*train, "--max-steps", "1", "--micro-batch", "0"], "--micro-batch: must be in"),
        ([*train, "--max-steps", "1", "--grad-accum", "0"], "--grad-accum: must be in"),
        ([*train, "--max-steps", "1", "--save-every", "0"], "--save-every: must be in"),
        ([*train, "--max-steps", "1", "--clip", "nan"], "--clip: must be a finite number"),
        ([*train, "--max-steps", "1", "--clip", "0"], "--clip: must be in"),
        ([*train, "--max-steps", "1", "--full-prob", "2"], "--full-prob: must be in"),
        ([*train, "--max-steps", "1", "--kd-temperature", "0"], "--kd-temperature: must be in"),
        ([*train, "--max-steps", "1", "--warmup-steps", "-1"], "--warmup-steps: must be in"),
        ([*train, "--max-steps", "1", "--n-random", "-1"], "--n-random: must be in"),
        ([*train, "--max-steps", "1", "--seed", "-1"], "--seed: must be in"),
        ([*train, "--max-steps", "1", "--budget-probs", "1,1,1,-1"], "--budget-probs must be in"),
        (["train", ck, "--out", str(r / "file"), "--max-steps", "1"], "is a regular file, not a directory"),
        (["train", ck, "--out", str(r / "linkdir"), "--max-steps", "1"], "is a symlink, not a directory"),
        # convert
        ([*conv, "--calib-sequences", "0"], "--calib-sequences: must be in"),
        ([*conv, "--calib-seq-len", "0"], "--calib-seq-len: must be in"),
        ([*conv, "--batch-size", "0"], "--batch-size: must be in"),
        ([*conv, "--multiple", "0"], "--multiple: must be in"),
        ([*conv, "--seed", "-1"], "--seed: must be in"),
        ([*conv, "--mlp-fractions", "1.7"], "--mlp-fractions must be in (0, 1], got 1.7"),
        ([*conv, "--mlp-fractions", "nan"], "--mlp-fractions: expected finite numbers"),
        ([*conv, "--space", str(r / "space_inf.json")], "must be a list of integers"),
        ([*conv, "--space", str(r / "space_float.json")], "must be a list of integers"),
        ([*conv, "--space", str(r / "space_bool.json")], "must be a list of integers"),
        ([*conv, "--space", str(r / "space_null.json")], "an elastic space is"),
        ([*conv, "--space", str(r / "nope.json")], "cannot read the elastic space"),
        (["convert", str(r / "hf"), "--out", str(r / "file")], "is a regular file, not a directory"),
        (["convert", str(r / "hf"), "--out", str(r / "linkdir"), "--overwrite"], "is a symlink"),
        # eval
        ([*ev[:2], "--limit", "0"], "--limit: must be in"),
        ([*ev[:2], "--limit", "-3"], "--limit: must be in"),
        ([*ev[:2], "--seq-len", "0"], "--seq-len: must be in"),
        ([*ev[:2], "--batch-size", "0"], "--batch-size: must be in"),
        ([*ev, "--budgets", "1.7"], "is above the full model"),
        ([*ev, "--budgets", "nan"], "cannot read budget"),
        ([*ev, "--budgets", "-1"], "cannot read budget"),
        *([([*ev, "--out", str(r / "device.json")], "is a device, FIFO or socket")]
          if (r / "device.json").exists() else []),
        ([*ev, "--out", str(r / "fifo.json")], "is a device, FIFO or socket"),
        ([*ev, "--out", str(r / "link.json")], "is a symlink, not a regular file"),
        ([*ev, "--out", str(r / "outdir")], "is a directory, not a regular file"),
        ([*ev, "--out", str(r / "file" / "x.json")], "x.json: Not a directory"),
        # profile, route, serve
        ([*prof, "--context", "0"], "--context: must be in"),
        ([*prof, "--batch", "0"], "--batch: must be in"),
        ([*prof, "--decode-steps", "0"], "--decode-steps: must be in"),
        ([*prof, "--repeats", "0"], "--repeats: must be in"),
        ([*prof, "--samples", "-1"], "--samples: must be in"),
        ([*route, "--steps", "0"], "--steps: must be in"),
        ([*route, "--budgets", "1.7"], "--budgets must be in"),
        ([*route, "--router-lr", "nan"], "--router-lr: must be a finite number"),
        ([*route, "--eval-limit", "0"], "--eval-limit: must be in"),
        ([*route, "--hidden", "0"], "--hidden: must be in"),
        ([*route, "--out", str(r / "file")], "is a regular file, not a directory"),
        (["serve", ck, "--port", "99999"], "--port: must be in [0, 65535]"),
        (["serve", ck, "--port", "-1"], "--port: must be in [0, 65535]"),
        (["serve", ck, "--max-queue", "0"], "--max-queue: must be in"),
        (["serve", ck, "--max-tokens", "1e309"], "--max-tokens: must be an integer"),
        # generate
        ([*gen, "--max-new-tokens", "-1"], "--max-new-tokens: must be in"),
        ([*gen, "--max-new-tokens", "0"], "--max-new-tokens: must be in"),
        ([*gen, "--temperature", "nan"], "--temperature: must be a finite number"),
        ([*gen, "--temperature", "-1"], "--temperature: must be in"),
        ([*gen, "--top-p", "0"], "--top-p: must be in (0, 1]"),
        ([*gen, "--top-p", "1.5"], "--top-p: must be in (0, 1]"),
        ([*gen, "--stop", "a,b,c,d,e"], "--stop takes at most 4 strings"),
        ([*gen, "--stop", "z" * (MAX_STOP_CHARS + 1)], "--stop takes at most 4 strings"),
        ([*gen, "--budget", "1.7"], "is above the full model"),
        # export, and damaged or missing checkpoints
        ([*exp, str(r / "file")], "is a regular file, not a directory"),
        ([*exp, str(r / "linkdir"), "--overwrite"], "is a symlink, not a directory"),
        (["export", ck, "--budget", "params=-1", "--out", str(r / "x1")], "cannot read budget"),
        (["export", ck, "--budget", "0.001", "--out", str(r / "x2")], "below the smallest"),
        (["export", str(r / "ck_null"), "--budget", "0.5", "--out", str(r / "x3")], "a JSON NoneType, not an object"),
        (["export", str(r / "ck_array"), "--budget", "0.5", "--out", str(r / "x4")], "a JSON list, not an object"),
        (["export", str(r / "ck_missing"), "--budget", "0.5", "--out", str(r / "x5")], "differs from the one saved"),
        (["export", str(r / "ck_missing"), "--budget", "0.5", "--out", str(r / "x6"), "--no-verify"],
         "tensor model.layers.1.mlp.down_proj.weight is missing"),
        (["export", str(r / "ck_nan"), "--budget", "0.5", "--out", str(r / "x7"), "--no-verify"],
         "tensor model.layers.0.mlp.up_proj.weight holds NaN"),
        (["eval", str(r / "nothing"), "--budgets", "0.5"], "not an elastic checkpoint"),
        # truncated weights outside elastic checkpoints; damaged task files
        (["convert", str(r / "hf_cut"), *conv[2:]], "hf_cut/model.safetensors is truncated or corrupt"),
        (["generate", str(r / "export_cut"), "w1", "--raw"], "export_cut/model.safetensors is truncated or corrupt"),
        (["eval", str(r / "export_cut"), "--budgets", "1.0", "--limit", "1", "--seq-len", "16"],
         "export_cut/model.safetensors is truncated or corrupt"),
        (["eval", ck, "--budgets", "1.0", "--tasks", str(r / "tasks_cut.jsonl.gz")], "tasks_cut.jsonl.gz, line"),
        (["eval", ck, "--budgets", "1.0", "--tasks", str(r / "tasks_label.jsonl.gz")],
         "tasks_label.jsonl.gz, line 1: label -5 is not a choice number"),
        (["eval", ck, "--budgets", "1.0", "--tasks", str(r / "tasks_empty.jsonl.gz")],
         "tasks_empty.jsonl.gz, line 2: request.continuation is empty"),
        (["generate", str(r / "nothing"), "hi"], "neither an existing directory nor a hub id"),
        (["report", str(r / "outdir")], "holds no results.json or eval.json"),
        (["report", str(r / "result.json"), "--into", str(r / "outdir")], "outdir is a directory, not a regular file"),
        (["eval", "--nonsense"], "unrecognized arguments"),
        # round two (issue 36): YAML null, aliases and devices as --config; positions beyond the model's
        # context; damaged latency and router files
        *[([*argv, "--config", str(r / f"null_{key}.yaml")], f"{key} is null") for argv, key in (
            (ev, "budgets"), (ev, "tasks"), (conv[:4], "calib_data"), (conv, "mlp_fractions"), (["serve", ck], "host"),
            (["demo"], "out"), ([*exp, str(r / "x8")], "verify"))],
        ([*ev, "--config", str(r / "aliases.yaml")], "uses a YAML alias"),
        ([*ev, "--config", str(r / "device.json")], "must be a regular file"),
        ([*prof, "--context", "300"], "beyond the model's context of 256"),
        ([*prof, "--runtime", "llama.cpp", "--context", "400"], "beyond the model's context of 256"),
        ([*route, "--seq-len", "1000"], "beyond the model's context of 256"),
        (["eval", str(r / "ck_latency"), "--budgets", "0.5"], "latency.json is damaged: it prices the full model"),
        (["eval", str(r / "ck_latency_deep"), "--budgets", "0.5"], "nested too deeply"),
        (["export", str(r / "ck_routers"), "--budget", "0.5", "--out", str(r / "x9"), "--no-verify"],
         "layer 0 MLP width 999 is not in the elastic space"),
        ([*conv, "--min-layers", "2"], "--min-layers is the floor of layers a depth space keeps"),
        ([*exp, str(r / "x10"), "--outtype", "f16"], "--outtype and --graph are GGUF settings"),
        ([*exp, str(r / "x11"), "--graph", "deci"], "--outtype and --graph are GGUF settings"),
        ([*ev, "--budgets", "params=" + "9" * 400], "is not a finite number"),
    ]


def test_every_bad_input_is_one_clean_line_and_harms_nothing(arena, capsys):
    before = snapshot(arena)
    tried = clean = tracebacks = accepted = 0
    problems = []
    for argv, expected in cases(arena):
        tried += 1
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code
        except BaseException as e:  # noqa: BLE001 - any escape is a traceback for the user
            code, tracebacks = None, tracebacks + 1
            problems.append(f"{argv}: {type(e).__name__}: {e}")
            continue
        err = capsys.readouterr().err.strip().splitlines()
        last = err[-1] if err else ""
        if code == 2 and last.startswith("error:") and expected in last and "Traceback" not in "\n".join(err):
            clean += 1
        else:
            accepted += code == 0
            problems.append(f"{argv}: exit {code}, stderr ends {last!r} (wanted {expected!r})")
    after = snapshot(arena)
    damaged = sorted(k for k in before if after.get(k) != before[k])
    created = sorted(set(after) - set(before))
    print(f"\nbad-input campaign: {tried} inputs tried, {clean} clean errors, {tracebacks} tracebacks, "
          f"{accepted} wrongly accepted, {len(damaged)} files damaged, {len(created)} files created")
    assert not problems, "\n".join(problems)
    assert tracebacks == 0 and not damaged and not created and clean == tried


def test_real_processes_exit_2_with_one_line(arena):
    """The same guarantees where the exit code and stderr are a real process's: an output FIFO, a
    run folder that is a file, and a model directory with its own code that a user agrees to run."""
    evil = arena / "evil"
    subprocess.run(["cp", "-r", str(arena / "hf"), str(evil)], check=True)
    config = json.loads((evil / "config.json").read_text())
    config |= {"model_type": "evil", "auto_map": {"AutoConfig": "evil.Cfg", "AutoModelForCausalLM": "evil.Model"}}
    (evil / "config.json").write_text(json.dumps(config))
    (evil / "evil.py").write_text("from pathlib import Path\nPath(__file__).with_name('RAN').write_text('x')\n")
    before = snapshot(arena)
    cases = (
        (["eval", str(arena / "ck"), "--limit", "1", "--seq-len", "16", "--out", str(arena / "fifo.json")], "",
         "a device, FIFO"),
        (["train", str(arena / "ck"), "--out", str(arena / "file"), "--max-steps", "1"], "", "a regular file"),
        (["generate", str(evil), "w1", "--raw", "--max-new-tokens", "2"], "y\ny\n", "cannot load"),
    )
    for (_, _, expected), r in zip(cases, run_clis(*((args, stdin) for args, stdin, _ in cases))):
        assert r.returncode == 2, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("error:")
        assert expected in r.stderr
    assert not (evil / "RAN").exists()
    assert snapshot(arena) == before


def test_campaign_cases_would_reach_the_model_without_the_bad_input(arena, capsys):
    """A control: the same command lines with valid values succeed, so each case above fails for its
    bad input and not for a broken setup."""
    gen = ["generate", str(arena / "ck"), "w1 w2", "--raw", "--max-new-tokens", "2"]
    assert main(gen) == 0
    assert main(["eval", str(arena / "ck"), "--limit", "1", "--seq-len", "16", "--budgets", "1.0",
                 "--out", str(arena / "ok.json")]) == 0
    assert json.loads((arena / "ok.json").read_text())[0]["ppl"] > 0
    assert main(["export", str(arena / "ck"), "--budget", "0.5", "--out", str(arena / "x0")]) == 0
    write_requests(arena / "tasks_ok.jsonl.gz", random_docs(2))
    assert main(["eval", str(arena / "ck"), "--budgets", "1.0", "--tasks", str(arena / "tasks_ok.jsonl.gz")]) == 0
    capsys.readouterr()


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(arena, monkeypatch, capsys):
    """The disk fills while `convert`, `export` or `train` writes a checkpoint (safetensors raises its
    own error; torch's writer of the training state a RuntimeError): exit 2, one line saying what to
    do, and no checkpoint or temp file left (a run folder keeps only its whole logs)."""
    data, out = str(arena / "data.txt"), arena / "full"
    train = ["train", str(arena / "ck"), "--out", str(out), "--data", data, "--max-steps", "1", "--seq-len", "16"]
    runs = [("safetensors", ["convert", str(arena / "hf"), "--out", str(out), "--calib-data", data,
                             "--calib-sequences", "2", "--calib-seq-len", "16"]),
            ("safetensors", ["export", str(arena / "ck"), "--budget", "0.5", "--out", str(out)]),
            ("safetensors", train),
            ("fsutil", train)]
    before = snapshot(arena)
    for writer, argv in runs:
        with monkeypatch.context() as m:
            full_disk(m, writer)
            assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"error: cannot write {out}"), err[-3:]
        assert err[-1].endswith("No space left on device; free some space (or write elsewhere) and run again")
        left = {p.name for p in out.rglob("*") if p.is_file()} if out.exists() else set()
        assert left <= {"run.json", "config.yaml", "metrics.csv"}, (argv[0], left)
        shutil.rmtree(out, ignore_errors=True)
    assert snapshot(arena) == before



# The server: every bad request we know of, over real HTTP, to `flextron serve` on the same checkpoint.

TRANSPORT = None  # answered by uvicorn itself (malformed HTTP): a plain-text 4xx, no JSON body
ANY = ""  # a JSON error whose code is not pinned
GOOD = {"prompt": "w5 w6", "max_tokens": 2, "temperature": 0}


def server_cases(name: str, cfg, vocab: int) -> list[tuple[str, tuple, int, str | None]]:
    """(label, request, status, error code); a request is ("http", method, path, body, headers) or
    ("raw", bytes) for what http.client will not send."""
    jh = {"Content-Type": "application/json"}

    def post(body: bytes | dict, path: str = "/v1/completions", headers: dict | None = None) -> tuple:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return ("http", "POST", path, data, jh if headers is None else headers)

    def c(**fields) -> tuple:  # a completions request with `fields` changed
        return post({"model": name, **GOOD, **fields})

    def chat(**fields) -> tuple:
        return post({"model": name, "messages": [{"role": "user", "content": "w5"}], "max_tokens": 2, **fields},
                    "/v1/chat/completions")

    def literal(text: str) -> tuple:  # JSON that json.dumps will not write (NaN, 1e400, huge integers)
        return post(f'{{"model": "{name}", "prompt": "w5", {text}}}'.encode())

    def raw(head: str, body: bytes = b"") -> tuple:
        return ("raw", head.replace("\n", "\r\n").encode("latin-1") + b"\r\n\r\n" + body)

    def method(verb: str, path: str) -> tuple:
        return ("http", verb, path, None, {})

    over = cfg.max_prompt_tokens + 1
    cases = [
        # bodies that are not JSON, or not an object
        ("not JSON", post(b"{not json"), 400, "invalid_json"),
        ("empty body", post(b""), 400, "invalid_json"),
        ("truncated JSON", post(b'{"prompt": "w5",'), 400, "invalid_json"),
        ("invalid UTF-8", post(b'{"prompt": "\xff\xfe"}'), 400, "invalid_json"),
        ("a NUL byte", post(b"\x00"), 400, "invalid_json"),
        ("16000 nested [", post(b"[" * 16000), 400, "invalid_json"),
        ("2500 nested objects", post(b'{"a":' * 2500 + b"1" + b"}" * 2500), 400, "invalid_json"),
        ("a lone surrogate", c(prompt="w5 \ud800"), 400, "invalid_json"),
        ("a 5000-digit integer", literal('"max_tokens": ' + "9" * 5000), 400, "invalid_json"),
        *[(f"JSON {b.decode()}", post(b), 400, "invalid_json") for b in (b"[1, 2]", b'"w5"', b"42", b"null",
                                                                          b"true", b"[]")],
        ("a duplicate key", post(f'{{"model": "{name}", "prompt": "w5", "prompt": 7}}'.encode()), 400,
         "invalid_type"),
        ("no prompt", post({"model": name}), 400, "missing_field"),
        ("prompt null", c(prompt=None), 400, "missing_field"),
        ("no messages", post({"model": name}, "/v1/chat/completions"), 400, "missing_field"),
        ("Content-Type text/plain", post({"model": name, **GOOD}, headers={"Content-Type": "text/plain"}), 415,
         "unsupported_media_type"),
        ("Content-Type form", post(b"prompt=w5", headers={"Content-Type": "application/x-www-form-urlencoded"}),
         415, "unsupported_media_type"),
        ("Content-Type multipart", post(b"--x--", headers={"Content-Type": "multipart/form-data; boundary=x"}),
         415, "unsupported_media_type"),
        ("no Content-Type, not JSON", post(b"prompt=w5", headers={}), 400, "invalid_json"),
    ]
    # every field with a value of the wrong type
    wrong = {"model": [7, True, [], {}], "prompt": [7, True, {}, 1.5], "max_tokens": ["ten", "2", 1.5, True, [], {}],
             "temperature": ["nan", "inf", "0.5", True, []], "top_p": ["0.9", True, {}], "n": ["1", 1.0, True],
             "stream": ["yes", 1, []], "logprobs": ["2", True, 1.5], "echo": ["yes", 1], "stop": [7, {"a": 1}, True],
             "seed": ["7", 1.5, True, []], "budget": [True, [], {}], "adaptive": ["yes", 1],
             "stream_options": ["x", [], {"include_usage": "yes"}], "best_of": ["2", 1.5, True]}
    cases += [(f"{k}={json.dumps(v)}", c(**{k: v}), 400, "invalid_type") for k, vs in wrong.items() for v in vs]
    cases += [(f"prompt={json.dumps(v)}", c(prompt=v), 400, "invalid_value")
              for v in ([1, "a"], [[]], [], [True], [1.5], [["w5"]], [None], [[1], 2])]
    cases += [(f"stop={json.dumps(v)}", c(stop=v), 400, "invalid_value") for v in (
        [7], [None], ["a"] * 5, ["z" * (MAX_STOP_CHARS + 1)])]
    cases += [(f"messages={json.dumps(v)}", chat(messages=v), 400, code) for v, code in (
        ("w5", "invalid_type"), ({}, "invalid_type"), (7, "invalid_type"), ([], "invalid_value"),
        ([1], "invalid_value"), ([{"role": "user"}], "missing_field"),
        ([{"role": 5, "content": "w5"}], "invalid_type"), ([{"role": "wizard", "content": "w5"}], "invalid_value"),
        ([{"role": "user", "content": 7}], "invalid_type"), ([{"role": "user", "content": ["w5"]}], "invalid_value"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "invalid_value"))]
    cases += [
        ("chat max_completion_tokens='ten'", chat(max_completion_tokens="ten"), 400, "invalid_type"),
        ("chat echo", chat(echo=True), 400, "invalid_value"),
        ("chat logprobs", chat(logprobs=True), 400, "invalid_value"),
        ("chat without a chat template", chat(), 400, ANY),
    ]
    # numbers out of range (NaN and infinities as JSON literals too)
    out = {"max_tokens": [-1, 0, cfg.max_tokens + 1, 10**30], "temperature": [-1, 2.5, 1e308],
           "top_p": [0, -0.1, 1.5], "n": [0, 2, -1], "best_of": [0, 2, -1], "logprobs": [-1, 21, 10**9],
           "seed": [2**64, -(2**63) - 1, 10**100],
           "prompt": [[-1], [vocab], [2**70], [[1, -5]]]}
    cases += [(f"{k}={json.dumps(v)}", c(**{k: v}), 400, "invalid_value") for k, vs in out.items() for v in vs]
    cases += [(text, literal(text), 400, code) for text, code in (
        ('"temperature": NaN', "invalid_value"), ('"temperature": -Infinity', "invalid_value"),
        ('"temperature": 1e400', "invalid_value"), ('"top_p": NaN', "invalid_value"),
        ('"top_p": 1e-400', "invalid_value"), ('"max_tokens": Infinity', "invalid_type"),
        ('"seed": NaN', "invalid_type"), ('"budget": NaN', "invalid_budget"),
        ('"budget": 1e400', "invalid_budget"), ('"budget": -Infinity', "invalid_budget"))]
    cases += [("stream with two prompts", c(prompt=["w5", "w6"], stream=True), 400, "invalid_value")]
    # unknown models, malformed NAME@budget, budgets the checkpoint cannot serve
    cases += [(f"model {m!r}", c(model=m), 404, "model_not_found")
              for m in ("gpt-4", "", f"{name}@", name.upper(), f"{name} ", f"x/{name}", f"@{name}")]
    cases += [(f"model {name}@{b}", c(model=f"{name}@{b}"), 400, "invalid_budget")
              for b in ("abc", "200%", "params=-1", "latency_ms=20", "latency_ms=", "0.001", "1%", "nonsense=5",
                        "50%@50%", "nan", "inf", "1e400", "params=0", "-50%", "0", "flops=200%", "params=1")]
    cases += [(f"budget={json.dumps(b)}", c(budget=b), 400, "invalid_budget")
              for b in ("lots", "", 0, -0.5, 1.7, "1%", 0.001, "latency_ms=20", "params=0", "flops=200%")]
    cases += [
        ("a budget in the name and in 'budget'", c(model=f"{name}@50%", budget="50%"), 400, "invalid_value"),
        ("adaptive without routers", c(adaptive=True), 400, "invalid_budget"),
        # the server's limits
        (f"a prompt of {over} tokens", c(prompt="w5 " * over), 400, "context_length_exceeded"),
        (f"{over} token ids", c(prompt=[5] * over), 400, "context_length_exceeded"),
        ("one long prompt of two", c(prompt=["w5", "w5 " * over]), 400, "context_length_exceeded"),
        (f"max_tokens={cfg.max_tokens + 1}", c(max_tokens=cfg.max_tokens + 1), 400, "invalid_value"),
        (f"{cfg.max_queue + 1} prompts (over --max-queue)", c(prompt=["w5"] * (cfg.max_queue + 1)), 400,
         "too_many_prompts"),
        (f"a body over {cfg.max_body_bytes} bytes", c(prompt="w5 " * (cfg.max_body_bytes // 3)), 413,
         "body_too_large"),
        ("Content-Length of 1e12, no body", raw(f"POST /v1/completions HTTP/1.1\nHost: x\n"
                                                 f"Content-Type: application/json\nContent-Length: {10**12}"), 413,
         "body_too_large"),
        ("a chunked body", raw("POST /v1/completions HTTP/1.1\nHost: x\nContent-Type: application/json\n"
                               "Transfer-Encoding: chunked", b"2\r\n{}\r\n0\r\n\r\n"), 411, "length_required"),
        # wrong methods and paths
        *[(f"{v} {p}", method(v, p), 405, "method_not_allowed") for v, p in (
            ("GET", "/v1/completions"), ("GET", "/v1/chat/completions"), ("PUT", "/v1/chat/completions"),
            ("DELETE", "/v1/models"), ("POST", "/v1/models"), ("PATCH", "/health"), ("OPTIONS", "/v1/completions"))],
        *[(f"GET {p}", method("GET", p), 404, "not_found") for p in (
            "/", "/v2/nothing", "/v1/embeddings", "/v1/completions/../../etc/passwd", "/v1/%ff%fe", "/v1/models/x")],
        ("POST /v1/embeddings", post({"model": name, "input": "w5"}, "/v1/embeddings"), 404, "not_found"),
        # malformed HTTP: uvicorn answers 400 itself
        ("garbage", ("raw", b"GARBAGE\r\n\r\n"), 400, TRANSPORT),
        ("TLS bytes", ("raw", bytes.fromhex("16030100a5010000a10303") + b"\x00" * 40 + b"\r\n\r\n"), 400, TRANSPORT),
        ("HTTP/1.1 without Host", raw("GET /health HTTP/1.1"), 400, TRANSPORT),
        ("a bad HTTP version", raw("GET /health HTTP/one\nHost: x"), 400, TRANSPORT),
        ("a bad method", raw("G(T /health HTTP/1.1\nHost: x"), 400, TRANSPORT),
        ("Content-Length: abc", raw("POST /v1/completions HTTP/1.1\nHost: x\nContent-Length: abc"), 400,
         TRANSPORT),
        ("Content-Length: -5", raw("POST /v1/completions HTTP/1.1\nHost: x\nContent-Length: -5"), 400, TRANSPORT),
        ("two Content-Lengths", raw("POST /v1/completions HTTP/1.1\nHost: x\nContent-Length: 2\nContent-Length: 3",
                                    b"{}"), 400, TRANSPORT),
        ("a header without a colon", raw("GET /health HTTP/1.1\nHost: x\nno colon here"), 400, TRANSPORT),
        ("a NUL in a header", raw("GET /health HTTP/1.1\nHost: x\nX-A: a\x00b"), 400, TRANSPORT),
        ("Transfer-Encoding: gzip", raw("POST /v1/completions HTTP/1.1\nHost: x\nTransfer-Encoding: gzip"), 400,
         TRANSPORT),
        ("a 20 kB URL", ("raw", f"GET /{'a' * 20000}".encode()), 400, TRANSPORT),  # the head never ends: h11's 16 kB
        ("a 20 kB header", ("raw", f"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 20000}".encode()), 400,
         TRANSPORT),
    ]
    return cases


def send(server, method: str, path: str, body: bytes | None, headers: dict) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=20)
    try:
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def send_raw(server, data: bytes) -> tuple[int, bytes]:
    with socket.create_connection(server.server_address[:2], timeout=20) as s:
        s.sendall(data)
        r = http.client.HTTPResponse(s)
        r.begin()
        return r.status, r.read()


def error_code(body: bytes) -> str | None:
    """The `code` of an OpenAI-style error body (`{"error": {"message", "type", ...}}`), or None if it is not one."""
    try:
        err = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    ok = isinstance(err, dict) and isinstance(err.get("message"), str) and err["message"] and isinstance(
        err.get("type"), str)
    return (err.get("code") or "") if ok else None


def answers(server, name: str) -> bool:
    """Whether the server still serves a good request (a moment's 503 while closed sockets drain is waited out)."""
    for _ in range(30):
        status, body = send(server, "POST", "/v1/completions", json.dumps({"model": name, **GOOD}).encode(),
                            {"Content-Type": "application/json"})
        if status != 503:
            return status == 200 and json.loads(body)["choices"][0]["finish_reason"] in ("stop", "length")
        time.sleep(0.1)
    return False


def hang_up(server, data: bytes, read: int = 0) -> None:
    """Send `data`, read `read` bytes of the answer, then drop the connection."""
    s = socket.create_connection(server.server_address[:2], timeout=20)
    try:
        s.sendall(data)
        if read:
            assert s.recv(read)
        s.shutdown(socket.SHUT_RDWR)
    finally:
        s.close()


def too_many_connections(server, cfg) -> tuple[int, bytes]:
    idle = [socket.create_connection(server.server_address[:2]) for _ in range(cfg.max_connections)]
    try:
        time.sleep(0.3)
        return send(server, "GET", "/health", None, {})
    finally:
        for s in idle:
            s.close()


def test_every_bad_request_is_a_clean_4xx_and_harms_nothing(arena, caplog, capsys):
    """The server's side of the campaign: each bad request gets its 4xx (503 past the connection cap) with
    an OpenAI-style JSON error body (a plain 400 from uvicorn for malformed HTTP), no traceback in the
    server's log or stderr, and a good request right after it is still served; the checkpoint is hashed
    before and after. Clients that hang up mid-body, mid-generation or mid-stream are one log line."""

    name = "ck"
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"

    def framed(fields: dict) -> bytes:
        body = json.dumps({"prompt": "w5 w6", "max_tokens": CONFIG.max_tokens, "stop": ["never"], **fields}).encode()
        return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body

    hangups = [  # (label, what is sent, bytes of the answer read first, the log line it must leave)
        ("hang up mid-body", f"{head}Content-Length: 100\r\n\r\n".encode() + b'{"prompt": ', 0,
         "before its request was read"),
        ("hang up before the body", f"{head}Content-Length: 50\r\n\r\n".encode(), 0, "before its request was read"),
        ("hang up mid-stream", framed({"model": f"{name}@75%", "stream": True}), 200, "went away"),
        ("hang up mid-generation", framed({"model": name}), 0, ""),
    ]
    before = snapshot(arena)
    tried = clean = transport = tracebacks = 0
    problems = []
    with caplog.at_level(logging.INFO), running(arena / "ck") as (server, _):
        assert answers(server, name)
        cases = [*server_cases(name, CONFIG, server.service.em.config.vocab_size),
                 ("too many connections", ("cap",), 503, TRANSPORT),
                 *[(label, ("hangup", data, read), None, line) for label, data, read, line in hangups]]
        for label, request, status, code in cases:
            tried += 1
            seen = len(caplog.records)
            got, body = None, b""
            try:
                if request[0] == "http":
                    got, body = send(server, *request[1:])
                elif request[0] == "raw":
                    got, body = send_raw(server, request[1])
                elif request[0] == "cap":
                    got, body = too_many_connections(server, CONFIG)
                else:
                    hang_up(server, *request[1:])
                    deadline = time.time() + 10
                    while code and time.time() < deadline and not any(
                            code in r.getMessage() for r in caplog.records[seen:]):
                        time.sleep(0.05)
            except (OSError, http.client.HTTPException) as e:
                problems.append(f"{label}: {type(e).__name__}: {e}")
                continue
            alive = answers(server, name)
            records = caplog.records[seen:]
            traced = "Traceback" in capsys.readouterr().err or any(
                r.exc_info or "Traceback" in r.getMessage() for r in records)
            tracebacks += traced
            got_code = error_code(body)
            if status is None:  # a hang-up: no answer to read, only the log line it must leave
                right = not code or any(code in r.getMessage() for r in records)
            elif code is TRANSPORT:
                right = got == status and (got_code is not None or body.strip() != b"")
                transport += right and got_code is None
            else:
                right = got == status and got_code is not None and code in (ANY, got_code)
            loud = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
            if right and alive and not traced and not loud:
                clean += 1
            else:
                problems.append(f"{label}: HTTP {got} {body[:200]!r} (wanted {status} {code!r}); served after: "
                                f"{alive}; traceback: {traced}; errors logged: {loud}")
    after = snapshot(arena)
    damaged = sorted(k for k in before if after.get(k) != before[k])
    created = sorted(set(after) - set(before))
    with capsys.disabled():
        print(f"\nbad-request campaign (server): {tried} requests tried, {clean} clean errors ({transport} "
              f"answered by uvicorn itself), {tracebacks} tracebacks, {len(damaged)} files damaged, "
              f"{len(created)} files created")
    assert not problems, "\n".join(problems)
    assert tracebacks == 0 and not damaged and not created and clean == tried
