"""The kill -9 campaign: `train`, `convert --overwrite` and `export --overwrite` killed at random moments.

On a tiny random Llama (tests' fixtures), each command runs as a real `flextron` process and gets
SIGKILL after a random delay drawn over its uninterrupted duration, again and again:
- train: restarted (with `--resume` once run.json exists) after every kill until it finishes; the
  final weights must equal an uninterrupted run's bit for bit, metrics.csv must hold each step once;
- convert / export with `--overwrite` over a complete earlier output: after each kill the next
  reader (`api.open_model`, which cleans what a dead writer left) must find a complete, verified
  checkpoint (or a loadable export) at the path — the old one or the new one, never half of either.
At the end no temp or `.old` leftovers may remain beside the outputs. Counts go to docs/results.md.

    python benchmarks/kill_campaign.py [--kills 20] [--seed 0]
    python benchmarks/kill_campaign.py --smoke     # 2 kills per command; writes no results
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from _results import publish
from flextron import api
from flextron.errors import FlextronError
from flextron.fsutil import clean_leftovers
from flextron.space import Budget

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import make_model, make_tokenizer, word_text  # noqa: E402

TRAIN = ["--max-steps", "8", "--save-every", "1", "--seq-len", "32", "--micro-batch", "2", "--lr", "1e-3",
         "--warmup-steps", "1", "--eval-limit", "0", "--dtype", "fp32"]


def flextron(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flextron", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def timed(*args: str) -> float:
    t = time.perf_counter()
    p = flextron(*args)
    _, err = p.communicate()
    if p.returncode != 0:
        raise SystemExit(f"flextron {' '.join(args)} failed: {err.strip()}")
    return time.perf_counter() - t


def run_or_kill(args: list[str], delay: float) -> tuple[bool, int, str]:
    """(killed, exit code, stderr) of one start, SIGKILLed after `delay` s unless it ended first."""
    p = flextron(*args)
    try:
        p.wait(delay)
        return False, p.returncode, p.stderr.read()
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.wait()
        return True, p.returncode, p.stderr.read()


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    last = sorted((run / "checkpoints").iterdir())[-1]
    return load_file(last / "model.safetensors")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


def killed_run(common: list[str], run: Path, duration: float, kills_left: int, rng: random.Random
               ) -> tuple[int, int, list[str]]:
    """One training run in `run`, killed at random until `kills_left` kills are spent, then finished."""
    killed, starts, errors = 0, 0, []
    while len(errors) <= 3:
        resume = ["--resume"] if (run / "run.json").is_file() else []
        delay = rng.uniform(0.0, duration) if killed < kills_left else 1e9
        was_killed, code, err = run_or_kill([*common, "--out", str(run), *resume], delay)
        starts += 1
        if was_killed:
            killed += 1
        elif code == 0:
            break
        else:
            errors.append(err.strip().splitlines()[-1] if err.strip() else f"exit {code}")
    return killed, starts, errors


def train_campaign(root: Path, kills: int, rng: random.Random) -> dict:
    """Killed training runs, one after another until `kills` kills landed, each compared with the reference."""
    ck, data = root / "ck", root / "data.txt"
    common = ["train", str(ck), "--data", str(data), *TRAIN]
    duration = timed(*common, "--out", str(root / "ref"))
    reference = final_weights(root / "ref")
    killed = starts = lost = runs = 0
    errors, left = [], []
    while killed < kills and len(errors) <= 3:
        run = root / f"killed-{runs}"
        k, n, e = killed_run(common, run, duration, kills - killed, rng)
        killed, starts, runs, errors = killed + k, starts + n, runs + 1, errors + e
        got = final_weights(run) if (run / "checkpoints").is_dir() else {}
        equal = reference.keys() == got.keys() and all(torch.equal(reference[x], got[x]) for x in reference)
        steps = [r.split(",")[0] for r in (run / "metrics.csv").read_text().splitlines()[1:]] if (
            run / "metrics.csv").is_file() else []
        lost += int(not equal) + int(steps != [str(i) for i in range(1, 9)])
        left += leftovers(run)
    return {"command": "train --resume", "kills": killed, "starts": starts, "runs": runs, "errors": errors,
            "lost": lost, "leftovers": left, "uninterrupted_s": round(duration, 1)}


def complete(path: Path, kind: str) -> bool:
    """Does the next reader find a whole output at `path`? (It cleans a dead writer's leftovers first.)"""
    try:
        if kind == "checkpoint":
            api.open_model(path, [Budget(fraction=1.0)], "cpu")  # verifies every tensor and the weights' hash
        else:  # a stock transformers directory (a uniform sub-network)
            clean_leftovers(path.parent)
            AutoModelForCausalLM.from_pretrained(path)
        return True
    except (FlextronError, OSError, ValueError):
        return False


def overwrite_campaign(root: Path, kind: str, args: list[str], out: Path, kills: int, rng: random.Random) -> dict:
    duration = timed(*args)  # the first, complete output
    lost, errors = 0, []
    for _ in range(kills):
        was_killed, code, err = run_or_kill(args, rng.uniform(0.0, duration))
        if not was_killed and code != 0:
            errors.append(err.strip().splitlines()[-1] if err.strip() else f"exit {code}")
        lost += not complete(out, kind)
    return {"command": f"{args[0]} --overwrite", "kills": kills, "starts": kills + 1, "errors": errors,
            "lost": lost, "leftovers": leftovers(out.parent), "uninterrupted_s": round(duration, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20, help="kills per command")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args()
    kills = 2 if a.smoke else a.kills
    rng = random.Random(a.seed)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_model("llama", n_layers=4).save_pretrained(root / "hf")
        make_tokenizer().save_pretrained(root / "hf")
        (root / "data.txt").write_text(word_text(6000))
        api.convert(str(root / "hf"), root / "ck", calib_sequences=8, calib_seq_len=32,
                    calib_data=str(root / "data.txt"), multiple=8, device="cpu", progress=False)
        convert = ["convert", str(root / "hf"), "--out", str(root / "conv"), "--overwrite", "--multiple", "8",
                   "--calib-data", str(root / "data.txt"), "--calib-sequences", "8", "--calib-seq-len", "32"]
        export = ["export", str(root / "ck"), "--budget", "0.5", "--out", str(root / "exp"), "--overwrite"]
        rows = [train_campaign(root, kills, rng),
                overwrite_campaign(root, "checkpoint", convert, root / "conv", kills, rng),
                overwrite_campaign(root, "export", export, root / "exp", kills, rng)]
    for r in rows:
        print(r)
    total = {k: sum(r[k] for r in rows) for k in ("kills", "starts", "lost")}
    clean = all(not r["errors"] and not r["leftovers"] for r in rows)
    lines = [
        "### kill -9 campaign",
        "",
        f"`python benchmarks/kill_campaign.py --kills {kills} --seed {a.seed}` — {round(time.time() - t0)} s, CPU, "
        "tiny random Llama (4 layers); every command a real process, SIGKILL after a random delay drawn over "
        "its uninterrupted duration. Lost = a final training run not bitwise equal to the uninterrupted one (or "
        "metrics.csv not holding each step once), or a killed overwrite after which the next reader found no "
        "complete, verified output.",
        "",
        "| command | kills | starts | errors on restart | data lost | leftovers at the end |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| `{r['command']}` | {r['kills']} | {r['starts']} | {len(r['errors'])} | {r['lost']} | "
          f"{len(r['leftovers'])} |" for r in rows),
        f"| all | {total['kills']} | {total['starts']} | {sum(len(r['errors']) for r in rows)} | {total['lost']} | "
        f"{sum(len(r['leftovers']) for r in rows)} |",
    ]
    publish("kill_campaign", "kill-campaign", {"rows": rows, "total": total, "clean": clean}, lines, a.smoke)
    if total["lost"] or not clean:
        raise SystemExit("the kill -9 campaign lost data or left errors/leftovers (see above)")


if __name__ == "__main__":
    main()
