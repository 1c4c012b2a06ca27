"""Training metrics through accelerate's trackers: metrics.csv always, plus TensorBoard or W&B on request.

`--logger csv` writes metrics.csv only (what `flextron report` and the tests read); `tensorboard`
and `wandb` write it too and add accelerate's tracker. A resumed run appends: rows of metrics.csv
past the resumed step are dropped, TensorBoard purges its events from that step on, and W&B
continues the same run (its id is kept in the run directory). W&B runs offline unless WANDB_MODE
says otherwise (`wandb sync` uploads them later). Only the main rank logs.
"""

from __future__ import annotations

import csv
import importlib
import os
import uuid
from pathlib import Path

from accelerate import PartialState
from accelerate.tracking import GeneralTracker, TensorBoardTracker, WandBTracker

from flextron.errors import FlextronError
from flextron.fsutil import atomic_write

WANDB_ID_FILE = "wandb_run_id"


class CSVTracker(GeneralTracker):
    """metrics.csv in the run directory, one row per step; rows past `start_step` are dropped first."""

    name = "csv"
    requires_logging_directory = True
    main_process_only = False  # the caller logs from the main rank only
    FIELDS = ("step", "tokens", "loss", "kd", "lm", "lr", "grad_norm", "tokens_per_s", "elapsed_s")

    def __init__(self, run: Path, start_step: int) -> None:
        super().__init__()
        self.path = run / "metrics.csv"
        self.start_step = start_step

    @property
    def tracker(self) -> Path:
        return self.path

    def start(self) -> None:
        rows = self._kept_rows() if self.start_step > 0 and self.path.is_file() else []
        atomic_write(self.path, lambda p: self._write(p, rows))

    def _kept_rows(self) -> list[dict]:
        """The rows up to the resumed step; a damaged file is refused in one line, left as it is."""
        def damaged(why: str) -> FlextronError:
            return FlextronError(f"cannot resume: {self.path} is damaged ({why}); repair or delete it (the "
                                 f"log then starts at step {self.start_step + 1}), or start a new --out")

        try:
            with self.path.open(encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                rows = []
                for r in reader:
                    if not (r.get("step") or "").isdecimal():
                        raise damaged(f"line {reader.line_num} has step {r.get('step')!r}")
                    rows.append(r)
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise damaged(str(e)) from None
        return [r for r in rows if int(r["step"]) <= self.start_step]

    def _write(self, path: Path, rows: list[dict]) -> None:
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.FIELDS)
            w.writeheader()
            w.writerows(rows)

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.FIELDS).writerow({"step": step, **values})


def _require(logger: str) -> None:
    try:
        importlib.import_module(logger)
    except ImportError:
        raise FlextronError(f"--logger {logger} needs the {logger} package: pip install {logger}") from None


def _wandb_id(run: Path) -> str:
    """The W&B run id of this run directory: made once, read again on resume."""
    path = run / WANDB_ID_FILE
    if not path.is_file():
        atomic_write(path, lambda p: p.write_text(uuid.uuid4().hex[:16]))
    return path.read_text().strip()


def extra_tracker(logger: str, run: Path, start_step: int, config: dict, cpu: bool) -> GeneralTracker | None:
    """The tracker `logger` (one of config.LOGGERS) adds beside metrics.csv, not started; None for csv.

    accelerate's trackers log through its process state, made here (`cpu`: the run trains on CPU).
    """
    if logger == "csv":
        return None
    _require(logger)
    PartialState(cpu=cpu)
    if logger == "tensorboard":  # event files in run/tensorboard
        tracker = TensorBoardTracker("tensorboard", run, purge_step=start_step + 1 if start_step else None)
    else:
        tracker = WandBTracker(os.environ.get("WANDB_PROJECT", "flextron"), name=run.resolve().name, dir=str(run),
                               id=_wandb_id(run), resume="allow", config=config,
                               mode=os.environ.get("WANDB_MODE", "offline"))
    return tracker


class MetricsLog:
    """The trackers of one training run: metrics.csv, plus the tracker of `logger`."""

    def __init__(self, run: Path, start_step: int, logger: str = "csv", config: dict | None = None,
                 cpu: bool = True) -> None:
        extra = extra_tracker(logger, run, start_step, config or {}, cpu)
        self.csv = CSVTracker(run, start_step)
        self.trackers = [self.csv] + ([extra] if extra is not None else [])
        for t in self.trackers:
            t.start()

    def log(self, row: dict) -> None:
        values = {k: v for k, v in row.items() if k != "step"}
        self.csv.log(values, step=row["step"])
        for t in self.trackers[1:]:
            t.log({f"train/{k}": v for k, v in values.items()}, step=row["step"])

    def close(self) -> None:
        for t in self.trackers:
            t.finish()
