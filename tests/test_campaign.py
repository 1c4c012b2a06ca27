"""The bad-input campaign: every invalid CLI input we know of, run on a tiny checkpoint.

Each must end with exit code 2 and a one-line `error:` naming the problem, never a traceback, and
leave every watched file byte-for-byte intact. Most cases run in-process through `flextron.cli.main`
(a subprocess costs seconds of imports); a few run as real subprocesses. The counts print with `-s`.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_device, make_model, make_tokenizer, rewrite_weights, word_text
from flextron import api
from flextron.cli import main
from flextron.evaluate import rows_json


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
    }
    for name, damage in damaged.items():
        subprocess.run(["cp", "-r", str(root / "ck"), str(root / name)], check=True)
        damage(root / name)
    return root


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
        ([*train, "--max-steps", "1", "--lr", "1e39"], "--lr must be in"),
        ([*train, "--max-steps", "1", "--weight-decay", "-1"], "--weight-decay must be in"),
        ([*train, "--max-steps", "0"], "--max-steps must be in"),
        ([*train, "--max-steps", "-1"], "--max-steps must be in"),
        ([*train, "--max-steps", "1e309"], "--max-steps: must be an integer"),
        ([*train, "--max-steps", "1.5"], "--max-steps: must be an integer"),
        ([*train, "--max-steps", "nan"], "--max-steps: must be an integer"),
        ([*train, "--max-steps", "ten"], "--max-steps: expected a number"),
        ([*train, "--tokens", "-5"], "--tokens must be in"),
        ([*train, "--max-steps", "1", "--tokens", "100"], "exactly one of --max-steps or --tokens"),
        ([*train, "--max-steps", "1", "--eval-limit", "-3"], "--eval-limit must be in"),
        ([*train, "--max-steps", "1", "--eval-budgets", "1.7"], "--eval-budgets must be in"),
        ([*train, "--max-steps", "1", "--eval-budgets", "nan"], "--eval-budgets: expected finite numbers"),
        ([*train, "--max-steps", "1", "--budgets", "0,0.5"], "--budgets must be in"),
        ([*train, "--max-steps", "1", "--seq-len", "0"], "--seq-len must be in"),
        ([*train, "--max-steps", "1", "--micro-batch", "0"], "--micro-batch must be in"),
        ([*train, "--max-steps", "1", "--grad-accum", "0"], "--grad-accum must be in"),
        ([*train, "--max-steps", "1", "--save-every", "0"], "--save-every must be in"),
        ([*train, "--max-steps", "1", "--clip", "nan"], "--clip: must be a finite number"),
        ([*train, "--max-steps", "1", "--clip", "0"], "--clip must be in"),
        ([*train, "--max-steps", "1", "--full-prob", "2"], "--full-prob must be in"),
        ([*train, "--max-steps", "1", "--kd-temperature", "0"], "--kd-temperature must be in"),
        ([*train, "--max-steps", "1", "--warmup-steps", "-1"], "--warmup-steps must be in"),
        ([*train, "--max-steps", "1", "--n-random", "-1"], "--n-random must be in"),
        ([*train, "--max-steps", "1", "--seed", "-1"], "--seed must be in"),
        ([*train, "--max-steps", "1", "--budget-probs", "1,1,1,-1"], "--budget-probs must be in"),
        (["train", ck, "--out", str(r / "file"), "--max-steps", "1"], "is a regular file, not a directory"),
        (["train", ck, "--out", str(r / "linkdir"), "--max-steps", "1"], "is a symlink, not a directory"),
        # convert
        ([*conv, "--calib-sequences", "0"], "--calib-sequences: must be in"),
        ([*conv, "--calib-seq-len", "0"], "--calib-seq-len: must be in"),
        ([*conv, "--batch-size", "0"], "--batch-size: must be in"),
        ([*conv, "--multiple", "0"], "--multiple: must be in"),
        ([*conv, "--seed", "-1"], "--seed: must be in"),
        ([*conv, "--mlp-fractions", "1.7"], "elastic fraction 1.7 is outside (0, 1]"),
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
        ([*route, "--steps", "0"], "--steps must be in"),
        ([*route, "--budgets", "1.7"], "--budgets must be in"),
        ([*route, "--router-lr", "nan"], "--router-lr: must be a finite number"),
        ([*route, "--eval-limit", "0"], "--eval-limit must be in"),
        ([*route, "--hidden", "0"], "--hidden must be in"),
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
        (["generate", str(r / "nothing"), "hi"], "neither an existing directory nor a hub id"),
        (["report", str(r / "outdir")], "holds no results.json or eval.json"),
        (["report", str(r / "result.json"), "--into", str(r / "outdir")], "outdir is a directory, not a regular file"),
        (["eval", "--nonsense"], "unrecognized arguments"),
    ]


def test_every_bad_input_is_one_clean_line_and_harms_nothing(arena, capsys):
    before = snapshot(arena)
    tried = clean = tracebacks = 0
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
            problems.append(f"{argv}: exit {code}, stderr ends {last!r} (wanted {expected!r})")
    after = snapshot(arena)
    damaged = sorted(k for k in before if after.get(k) != before[k])
    created = sorted(set(after) - set(before))
    print(f"\nbad-input campaign: {tried} inputs tried, {clean} clean errors, {tracebacks} tracebacks, "
          f"{len(damaged)} files damaged, {len(created)} files created")
    assert not problems, "\n".join(problems)
    assert tracebacks == 0 and not damaged and not created and clean == tried


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flextron", *args], capture_output=True, text=True, timeout=300,
                          input=stdin)


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
    for args, stdin, expected in (
        (["eval", str(arena / "ck"), "--limit", "1", "--seq-len", "16", "--out", str(arena / "fifo.json")], "",
         "a device, FIFO"),
        (["train", str(arena / "ck"), "--out", str(arena / "file"), "--max-steps", "1"], "", "a regular file"),
        (["generate", str(evil), "w1", "--raw", "--max-new-tokens", "2"], "y\ny\n", "cannot load"),
    ):
        r = run_cli(*args, stdin=stdin)
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
    capsys.readouterr()

