"""Shared by the benchmarks: write JSON and replace a marked section of docs/results.md."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from flextron import report
from flextron.fsutil import atomic_write

ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = ROOT / "docs" / "results.md"
RESULTS_DIR = ROOT / "benchmarks" / "results"
IMG_DIR = ROOT / "docs" / "img"


def command_line(script: str, parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The command that reproduces a run: the script and each flag whose value is not its default
    (`--work`, where results do not depend on it, left out), each value quoted for the shell (an empty one too)."""
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {shlex.quote(str(v))}")
             for k, v in vars(args).items() if k != "work" and v != parser.get_default(k)]
    return " ".join([f"python benchmarks/{script}", *flags])


def accuracy(scores: dict) -> float:
    """A task's reported accuracy (`flextron.tasks.score_task`): acc_norm where the task defines it, else acc."""
    return scores.get("acc_norm", scores["acc"])


def write_json(name: str, data: dict) -> Path:
    path = RESULTS_DIR / f"{name}.json"
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=1)))
    return path


def update_section(name: str, markdown: str) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` of docs/results.md."""
    report.update_section(RESULTS_MD, name, markdown)


def publish(name: str, section: str, data: dict, lines: list[str], smoke: bool) -> None:
    """Print the markdown; unless a smoke run, write the JSON and the docs/results.md section."""
    print("\n".join(lines))
    if not smoke:
        write_json(name, data)
        update_section(section, "\n".join(lines))
