import csv
import sys
import types

import pytest

from flextron.errors import FlextronError
from flextron.options import TrainOptions
from flextron.train.metrics import CSVTracker, MetricsLog


def row(step: int) -> dict:
    return {"step": step, "tokens": 64 * step, "loss": 1.0 / step, "kd": 0.5 / step, "lm": 0.0, "lr": 1e-4,
            "grad_norm": 0.3, "tokens_per_s": 10.0, "elapsed_s": 0.1 * step}


def read_csv(run) -> list[dict]:
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_csv_logger_writes_metrics_and_a_resume_appends(tmp_path):
    log = MetricsLog(tmp_path, 0)
    for step in (1, 2, 3):
        log.log(row(step))
    log.close()
    rows = read_csv(tmp_path)
    assert list(rows[0]) == list(CSVTracker.FIELDS)
    assert [(r["step"], float(r["loss"])) for r in rows] == [("1", 1.0), ("2", 0.5), ("3", 1 / 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]  # no tracker beside it

    log = MetricsLog(tmp_path, 2)  # resumed from step 2's checkpoint: step 3 is logged again
    assert [r["step"] for r in read_csv(tmp_path)] == ["1", "2"]
    log.log({**row(3), "loss": 9.0})
    log.close()
    assert [(r["step"], float(r["loss"])) for r in read_csv(tmp_path)] == [("1", 1.0), ("2", 0.5), ("3", 9.0)]


@pytest.mark.parametrize("content, why", [(b"step,loss\n1,0.5\n2,\xff\n", "utf-8"),
                                          (b"step,loss\n1,0.5\nabc,0.4\n", "line 3 has step 'abc'")])
def test_a_damaged_log_is_refused_on_resume_in_one_line(tmp_path, content, why):
    (tmp_path / "metrics.csv").write_bytes(content)
    with pytest.raises(FlextronError, match=why) as err:
        MetricsLog(tmp_path, 2)
    assert str(tmp_path / "metrics.csv") in str(err.value) and "delete it" in str(err.value)
    assert "\n" not in str(err.value) and (tmp_path / "metrics.csv").read_bytes() == content


def test_unknown_logger_is_refused():
    with pytest.raises(FlextronError, match="--logger must be one of csv, tensorboard, wandb, not 'mlflow'"):
        TrainOptions(max_steps=1, logger="mlflow")


@pytest.mark.parametrize("logger", ["tensorboard", "wandb"])
def test_missing_tracker_package_is_one_line(tmp_path, monkeypatch, logger):
    monkeypatch.setitem(sys.modules, logger, None)  # `import` fails as if it were not installed
    with pytest.raises(FlextronError) as e:
        MetricsLog(tmp_path, 0, logger)
    assert str(e.value) == f"--logger {logger} needs the {logger} package: pip install {logger}"
    assert not (tmp_path / "metrics.csv").exists()  # refused before anything is written


def test_tensorboard_logger_writes_event_files_beside_the_csv(tmp_path):
    pytest.importorskip("tensorboard")
    log = MetricsLog(tmp_path, 0, "tensorboard")
    log.log(row(1))
    log.close()
    assert [r["step"] for r in read_csv(tmp_path)] == ["1"]
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(p.stat().st_size > 0 for p in events)


class FakeWandb(types.ModuleType):
    """Records what accelerate's WandBTracker asks of `wandb`."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class Run:
            def log(self, values, step=None):
                fake.logged.append((values, step))

            def finish(self):
                fake.finished += 1

        return Run()


def test_wandb_logger_runs_offline_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    run = tmp_path / "run"
    run.mkdir()
    log = MetricsLog(run, 0, "wandb", {"lr": 1e-4})
    log.log(row(1))
    log.close()
    first = wandb.inits[0]
    assert first["project"] == "flextron" and first["name"] == "run" and first["dir"] == str(run)
    assert first["mode"] == "offline" and first["resume"] == "allow" and first["config"] == {"lr": 1e-4}
    assert wandb.logged == [({f"train/{k}": v for k, v in row(1).items() if k != "step"}, 1)]
    assert wandb.finished == 1 and [r["step"] for r in read_csv(run)] == ["1"]  # metrics.csv as well

    monkeypatch.setenv("WANDB_MODE", "online")  # the user's choice wins
    MetricsLog(run, 1, "wandb").close()
    assert wandb.inits[1]["id"] == first["id"] and wandb.inits[1]["mode"] == "online"
