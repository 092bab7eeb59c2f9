"""Output folders that are complete or absent, never mixed, and never someone else's.

:func:`publishing` is how ``generate`` and ``preprocess`` write ``--out``:

- a lock (``.<out>.lock`` next to it, ``fcntl.flock``; released by the kernel when the process
  dies, so it never goes stale) makes a second run into the same ``--out`` fail at once;
- leftovers of killed runs next to ``--out`` (``.<out>.tmp-<pid>-*`` build folders and
  ``.<out>.old-<pid>-*`` previous outputs, their pid gone) are removed and reported, except a
  previous output whose swap was cut short with ``--out`` missing: that one is put back;
- the output is built in ``.<out>.tmp-<pid>-<id>`` and swapped in by two renames; a failure
  in between puts the previous output back;
- an existing ``--out`` is replaced only if ``owned`` says this tool wrote it (its own marker or
  manifest): a folder with another tool's ``_SUCCESS`` is left alone.

:func:`file_digests` / :func:`check_digests` record and verify the size and SHA-256 of files.

Example:
    >>> # with publishing(out, "preprocess", owned=is_mine) as (tmp, cleaned):
    >>> #     write everything into tmp  # published as out when the block ends without error
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import DataError, OutputError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_pid(name: str, marker: str) -> bool:
    """``name`` is ``<prefix><marker><pid>[-...]`` with a pid that is not alive (nor ours)."""
    pid = name.rsplit(marker, 1)[1].split("-", 1)[0]
    return pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid))


@contextmanager
def _lock(out: Path) -> Iterator[None]:
    """Hold ``.<out>.lock`` exclusively; :class:`OutputError` naming the holder if taken."""
    path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            try:
                holder = path.read_text().strip() or "?"
            except OSError:
                holder = "?"
            raise OutputError(f"{out}: another run (pid {holder}) is writing this folder; wait for it to "
                              f"finish or choose another --out (lock file {path})") from None
        # the holder before us may have unlinked the file we opened: lock the file on disk
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: a waiting run then retries on a new file
        os.close(fd)


def remove_stale(out: Path, tool: str) -> list[str]:
    """Remove killed runs' ``.<out>.tmp-<pid>-*`` and ``.<out>.old-<pid>-*`` folders (pid gone);
    an ``.old`` folder is put back as ``out`` when ``out`` is missing (a swap cut short).
    Returns the names handled (also printed on stderr)."""
    handled: list[str] = []
    restored = None
    for d in sorted(out.parent.glob(f".{out.name}.old-*")):
        if d.is_dir() and _dead_pid(d.name, ".old-"):
            if not out.exists():
                d.rename(out)
                restored = d.name
            else:
                shutil.rmtree(d, ignore_errors=True)
            handled.append(d.name)
    for d in sorted(out.parent.glob(f".{out.name}.tmp-*")):
        if d.is_dir() and _dead_pid(d.name, ".tmp-"):
            shutil.rmtree(d, ignore_errors=True)
            handled.append(d.name)
    if restored:
        print(f"{tool}: put back {out} from {restored}, left by a run killed while replacing it", file=sys.stderr)
    removed = [n for n in handled if n != restored]
    if removed:
        print(f"{tool}: removed {len(removed)} unfinished build folder(s) of killed runs: {removed}", file=sys.stderr)
    return handled


@contextmanager
def publishing(out: str | Path, tool: str, owned: Callable[[Path], bool], marker: str) -> Iterator[tuple[Path, list[str]]]:
    """Build ``out`` in a temporary sibling folder and swap it in when the block succeeds.

    Args:
        out: the output folder.
        tool: the stage's name, for messages (``preprocess``).
        owned: says whether an existing folder was written by this tool (it may be replaced).
        marker: the file that marks the tool's output, named in the refusal message.

    Yields:
        (the temporary folder to write into, names of killed runs' leftovers handled).

    Raises:
        OutputError: ``out`` is a file, is a folder this tool did not write, or another run
            holds it.
    """
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; --out must name a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError(f"{out}: a parent of this path is a file, not a folder") from None
    with _lock(out):
        cleaned = remove_stale(out, tool)
        if out.exists() and any(out.iterdir()) and not owned(out):
            raise OutputError(f"{out}: exists and was not written by pipeline {tool} (no {marker} of its own); "
                              "refusing to replace it: remove it or choose another --out")
        # the pid in the name lets a later run tell a killed run's leftovers from a live run's work
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = out.parent / f".{out.name}.tmp-{tag}"
        tmp.mkdir()
        try:
            yield tmp, cleaned
            if out.exists():
                old = out.parent / f".{out.name}.old-{tag}"
                out.rename(old)
                try:
                    tmp.rename(out)
                except BaseException:
                    old.rename(out)  # never leave the user without the previous output
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def file_digests(folder: Path, rels: list[str]) -> dict[str, dict[str, int | str]]:
    """``{rel: {"bytes": size, "sha256": hex}}`` for files under ``folder``."""
    out: dict[str, dict[str, int | str]] = {}
    for rel in rels:
        h = hashlib.sha256()
        with (folder / rel).open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        out[rel] = {"bytes": (folder / rel).stat().st_size, "sha256": h.hexdigest()}
    return out


def check_digests(folder: Path, manifest_name: str, recorded: dict[str, dict[str, int | str]], rels: list[str]) -> None:
    """Raise :class:`DataError` if a file of ``rels`` listed in ``recorded`` is missing or its
    size or SHA-256 differs (a folder mixing two datasets, or edited since it was written)."""
    for rel in rels:
        if rel not in recorded:
            continue
        want = recorded[rel]
        path = folder / rel
        hint = (f"the folder mixes two datasets or was edited after {manifest_name} was written "
                f"(delete {manifest_name} to use edited files)")
        if not path.is_file():
            raise DataError(f"{path}: listed in {folder / manifest_name} but missing; {hint}")
        got = file_digests(folder, [rel])[rel]
        for key in ("bytes", "sha256"):
            if key in want and got[key] != want[key]:
                raise DataError(f"{path}: {key} {got[key]} differs from {want[key]} in {folder / manifest_name}; {hint}")
