"""Atomic commits: every file and directory flexcli writes appears whole or not at all.

One primitive, :func:`commit`: fsync what was written into a temporary sibling, then swap it into place
with renames. On top of it: :func:`atomic_dir` (a new output directory), :func:`atomic_file` (a new
output file), :func:`update_dir` (replace some
files of an existing directory in one step) and :func:`atomic_write` (one file). Temporary siblings are
named ``.NAME.flex-tmp-PID`` so a later run can remove the ones whose process is gone.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import RuntimeFailure, UsageError

TMP_TAG = ".flex-tmp-"


def _fsync_path(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory below `root` (a file: just that file)."""
    if root.is_file():
        _fsync_path(root)
        return
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync_path(os.path.join(dirpath, f))
        _fsync_path(dirpath)


def sibling(path: Path, tag: str | int | None = None) -> Path:
    """The temporary sibling of `path` for this process (or for `tag`)."""
    return path.parent / f".{path.name}{TMP_TAG}{os.getpid() if tag is None else tag}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_siblings(out: Path) -> None:
    """Remove temporary siblings left by killed runs (their pid is gone)."""
    for p in out.parent.glob(f".{out.name}{TMP_TAG}*"):
        try:
            pid = int(p.name.rsplit("-", 1)[-1])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def commit(tmp: Path, final: Path) -> None:
    """fsync `tmp` (file or directory) and move it to `final`, replacing what was there in one swap."""
    fsync_tree(tmp)
    if tmp.is_file():
        os.replace(tmp, final)
    else:
        old = None
        if final.exists():
            old = sibling(final, f"old-{os.getpid()}")
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    _fsync_path(final.parent)


def check_output(out: Path, force: bool, file: bool = False) -> None:
    """Fail early (before heavy work) when OUT exists and replacing it was not asked for (OUT is a
    directory, or with `file` a single file)."""
    if out.exists() and not force:
        raise UsageError(f"output {out} already exists; pass {{flag:force=True}} to replace it")
    if out.exists() and out.is_dir() == file:
        raise UsageError(f"output {out} exists and is {'a directory' if file else 'not a directory'}")
    if not out.parent.exists():
        raise UsageError(f"parent directory of output {out} does not exist")


@contextmanager
def atomic_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling to write into; on success commit it as `out`."""
    out = out.resolve()
    check_output(out, force)
    clean_stale_siblings(out)
    tmp = sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling file path to write; on success commit it as `out`."""
    out = out.resolve()
    check_output(out, force, file=True)
    clean_stale_siblings(out)
    tmp = sibling(out)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        commit(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def update_dir(path: Path, writers: dict[str, Callable[[Path], None] | None]) -> None:
    """Replace some files of an existing directory as one atomic step.

    The temporary sibling gets hard links to every other file and, per name, `writer(dest_path)` (None:
    the file is dropped); it is then committed in place of `path`. A crash leaves the old directory or
    the new one, whole.
    """
    path = path.resolve()
    clean_stale_siblings(path)
    tmp = sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for f in path.iterdir():
            if f.name in writers or not f.is_file():
                continue
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
        for name, write in writers.items():
            if write is not None:
                write(tmp / name)
        commit(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write one file atomically (temporary sibling, fsync, rename)."""
    tmp = sibling(path)
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_files(files: Iterable[Path], dst: Path) -> None:
    """Copy files verbatim (with their metadata) into the directory `dst`."""
    for f in files:
        try:
            shutil.copy2(f, dst / f.name)
        except OSError as e:
            raise RuntimeFailure(f"cannot copy {f} to {dst}: {e.strerror}") from None
