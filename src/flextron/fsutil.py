"""Safe output writing: a file or directory appears whole or not at all, with normal permissions,
never over a symlink / device / FIFO, and what a killed process left behind is cleaned or restored
by the next writer to the same folder.

Temp paths are `.NAME.tmp-PID-XXXX` and an overwritten directory waits as `.NAME.old-PID` until
the new one is in place; both carry the writer's process id, so stale ones of dead processes are
recognised (an `.old` whose target is missing is renamed back).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError

from flextron.errors import FlextronError

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-.*)?$")
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) reports the OS error under its own
_FULL = (errno.ENOSPC, errno.EDQUOT)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def os_error(path: Path, e: OSError) -> FlextronError:
    """One line for an OS error on an output path: the path, the reason, and for a full disk what to do."""
    hint = "; free some space (or write elsewhere) and run again" if e.errno in _FULL else ""
    return FlextronError(f"cannot write {path}: {e.strerror or e}{hint}")


def write_failure(e: BaseException) -> OSError | None:
    """The OS error behind a failed write, where a library reports it as its own exception: safetensors'
    `SafetensorError` names the error code; torch's writer raises a RuntimeError over the OSError of the
    file object it wrote to (`save_torch`). None for anything else (a bug, not the environment)."""
    if isinstance(e, OSError):
        return e
    if isinstance(e, SafetensorError) and (m := _OS_ERROR_CODE.search(str(e))):
        code = int(m[1])
        return OSError(code, os.strerror(code))
    if isinstance(e, RuntimeError) and isinstance(cause := e.__cause__ or e.__context__, OSError):
        return cause
    return None


def save_torch(obj: object, path: Path) -> None:
    """`torch.save` through a Python file, so that a failed write (disk full) keeps its OSError."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def clean_leftovers(parent: Path) -> None:
    """Remove temp paths of dead flextron processes in `parent`; put back an overwritten directory
    whose replacement never arrived."""
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return
    for p in entries:
        m = _LEFTOVER.match(p.name)
        if m is None or _alive(int(m["pid"])):
            continue
        target = p.with_name(m["name"])
        try:
            if m["kind"] == "old" and not os.path.lexists(target):
                p.rename(target)
            elif p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError:
            pass


def _temp_name(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def check_target(path: Path, want_dir: bool = False) -> None:
    """Refuse a target that is anything but a regular file (or a directory, when `want_dir`)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise os_error(path, e) from None
    if want_dir and stat.S_ISDIR(mode) or not want_dir and stat.S_ISREG(mode):
        return
    kind = ("a symlink" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode)
            else "a regular file" if stat.S_ISREG(mode) else "a device, FIFO or socket")
    raise FlextronError(f"{path} is {kind}, not a {'directory' if want_dir else 'regular file'}; "
                        "choose another output path")


def prepare_parent(path: Path) -> None:
    """Create `path`'s parent folder and clean it of dead processes' leftovers."""
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise FlextronError(f"cannot write {path}: a part of {parent} is not a directory") from None
    except OSError as e:
        raise os_error(path, e) from None
    clean_leftovers(parent)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    prepare_parent(path)
    check_target(path, want_dir=False)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{_temp_name(path, 'tmp').name}-", suffix=path.suffix, dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        try:
            write(Path(tmp))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except Exception as e:
        if (failure := write_failure(e)) is None:
            raise
        raise os_error(path, failure) from None


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file (`write_jsonl`); none where it does not exist."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Rows as JSON lines, written atomically (a cache extended run after run is never left half written)."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output that is not a directory, or a non-empty directory unless `overwrite`."""
    out = Path(out)
    clean_leftovers(out.parent)
    check_target(out, want_dir=True)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FlextronError(f"{out} already exists and is not empty; pass --overwrite or choose another --out")


def remove_tree(path: Path) -> None:
    """Delete a directory so that a kill part-way leaves only a temp name (cleaned later), never a
    half-deleted `path`."""
    path = Path(path)
    doomed = path.with_name(f"{_temp_name(path, 'tmp').name}-rm")
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory that replaces `out` only when the block finishes without error.

    An existing non-empty `out` is refused unless `overwrite`; it is left untouched if the
    block fails. A kill between the two renames of an overwrite leaves `.NAME.old-PID`, which
    the next writer to the folder (or reader of `out`) renames back.
    """
    out = Path(out)
    prepare_parent(out)
    check_output_dir(out, overwrite)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{_temp_name(out, 'tmp').name}-", dir=out.parent))
        os.chmod(tmp, 0o777 & ~_umask())
    except OSError as e:
        raise os_error(out, e) from None
    try:
        yield tmp
        old = None
        if out.exists():
            old = _temp_name(out, "old")
            out.rename(old)
        try:
            tmp.rename(out)
        except OSError:
            if old is not None:
                old.rename(out)
            raise
        if old is not None:
            shutil.rmtree(old)
    except Exception as e:
        if (failure := write_failure(e)) is None:
            raise
        raise os_error(out, failure) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
