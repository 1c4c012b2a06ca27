import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from flextron.errors import FlextronError
from flextron.fsutil import atomic_dir, atomic_write, clean_leftovers, remove_tree, save_torch
from helpers import dead_pid, full_disk, make_device, safetensors_full


def write_text(text: str):
    return lambda p: Path(p).write_text(text)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_write_refuses_symlinks_fifos_devices_and_directories(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    link = tmp_path / "link.json"
    link.symlink_to(victim)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    (tmp_path / "dir.json").mkdir()
    device = make_device(tmp_path / "device.json")
    targets = [(link, "a symlink"), (fifo, "a device, FIFO or socket"), (tmp_path / "dir.json", "a directory")]
    for path, kind in targets + ([(device, "a device, FIFO or socket")] if device else []):
        with pytest.raises(FlextronError, match=f"is {kind}, not a regular file"):
            atomic_write(path, write_text("new"))
    assert victim.read_text() == "keep" and link.is_symlink() and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_atomic_dir_refuses_a_symlink_even_with_overwrite(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "f").write_text("keep")
    (tmp_path / "out").symlink_to(real)
    with pytest.raises(FlextronError, match="is a symlink, not a directory"):
        with atomic_dir(tmp_path / "out", overwrite=True):
            pass
    assert (real / "f").read_text() == "keep" and (tmp_path / "out").is_symlink()


def test_outputs_get_normal_permissions(tmp_path, umask_022):
    atomic_write(tmp_path / "a.json", write_text("{}"))
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("x")
    assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o755


def test_os_errors_become_one_line_with_path_and_reason(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FlextronError, match=f"cannot write {blocker}/out.json: a part of {blocker} is not a directory"):
        atomic_write(blocker / "out.json", write_text("{}"))

    def full(p):
        raise OSError(28, "No space left on device")

    with pytest.raises(FlextronError, match="out.json: No space left on device"):
        atomic_write(tmp_path / "out.json", full)
    with pytest.raises(FlextronError, match="cannot write .*ckpt: No space left on device"):
        with atomic_dir(tmp_path / "ckpt") as tmp:
            full(tmp)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_leftovers_of_dead_processes_are_cleaned_by_the_next_writer(tmp_path):
    dead, alive = dead_pid(), os.getpid()
    (tmp_path / f".ckpt.tmp-{dead}-abc").mkdir()
    (tmp_path / f".ckpt.tmp-{dead}-abc" / "model.safetensors").write_text("partial")
    (tmp_path / f".eval.json.tmp-{dead}-x.json").write_text("partial")
    (tmp_path / f".other.tmp-{alive}-x").mkdir()  # a running writer's: kept
    atomic_write(tmp_path / "results.json", write_text("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".other.tmp-{alive}-x", "results.json"]


def test_an_overwrite_killed_between_its_renames_is_restored(tmp_path):
    dead = dead_pid()
    hidden = tmp_path / f".ckpt.old-{dead}"
    hidden.mkdir()
    (hidden / "flextron.json").write_text("old")
    clean_leftovers(tmp_path)
    assert (tmp_path / "ckpt" / "flextron.json").read_text() == "old" and not hidden.exists()
    # killed after the second rename: the new copy is in place, the old one goes
    hidden.mkdir()
    clean_leftovers(tmp_path)
    assert not hidden.exists() and (tmp_path / "ckpt").is_dir()


def test_remove_tree_takes_the_directory_out_of_sight_first(tmp_path, monkeypatch):
    d = tmp_path / "step-1"
    d.mkdir()
    (d / "a").write_text("x")

    def killed(path, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("shutil.rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        remove_tree(d)
    assert not d.exists() and len(list(tmp_path.iterdir())) == 1
    monkeypatch.undo()
    remove_tree(tmp_path / next(tmp_path.iterdir()).name)
    assert not list(tmp_path.iterdir())


def test_a_checkpoint_hidden_by_a_killed_in_place_route_is_found_by_eval(elastic_ckpt, tmp_path):
    from flextron import api

    ckpt = elastic_ckpt(name="ck")
    ckpt.rename(tmp_path / f".ck.old-{dead_pid()}")
    em, _ = api.open_model(ckpt, [], "cpu")
    assert ckpt.is_dir() and em.space.n_layers == 2


def test_a_full_disk_under_a_library_s_own_error_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """safetensors reports ENOSPC as a SafetensorError, torch's writer as a RuntimeError over the file's
    OSError: both become the one line of an OS error, with what to do, and no temp file stays."""
    full_disk(monkeypatch, "fsutil")
    for write in (safetensors_full, lambda p: save_torch({"w": torch.zeros(4)}, p)):
        with pytest.raises(FlextronError, match="out.pt: No space left on device; free some space"):
            atomic_write(tmp_path / "out.pt", write)
        with pytest.raises(FlextronError, match="ckpt: No space left on device; free some space"):
            with atomic_dir(tmp_path / "ckpt") as tmp:
                write(tmp / "model.safetensors")
    assert not list(tmp_path.iterdir())
    # Anything else is a bug, not the environment: it stays itself.
    for error in (RuntimeError("unexpected pos 704 vs 598"), SafetensorError("invalid tensor name")):
        with pytest.raises(type(error)):
            with atomic_dir(tmp_path / "ckpt"):
                raise error
    assert not list(tmp_path.iterdir())
