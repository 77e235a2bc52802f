"""A run folder: config.json, metrics.jsonl, summary.json, curves.png and checkpoint.pt
(and tensorboard/ with --tensorboard).
Files are replaced atomically (written beside, then renamed), and a folder that already
holds a run is refused unless the caller resumes it or asks to overwrite it. One process at
a time works in a folder: it holds the folder's lock (FolderLock) while it uses it.

A failed write (disk full, quota) stops the run with a message that names the file and the
checkpoint that is still intact: checkpoint.pt is only ever replaced by a complete file, and
a metrics record that could not be written whole is taken back."""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import math
import os
import pickle
import re
import shutil
import socket
import sys
import threading
import weakref
from pathlib import Path
from typing import Optional

import torch

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "curves.png", "checkpoint.pt")
RUN_FOLDERS = ("tensorboard",)  # a run's own folders (tensorboard_log.py)
LOCK_FILE = ".lock"  # not a run file: a folder holding only a lock file holds no run


def _finite_or_none(x):
    """JSON has no NaN or infinity: a non-finite number is written as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def dumps(record: dict) -> str:
    return json.dumps({k: _finite_or_none(v) for k, v in record.items()}, allow_nan=False)


class FolderLock:
    """An exclusive lock on a folder (made if missing) for this process, held from creation
    until close(), the object's collection or the process's end. It is an OS file lock (flock)
    on <folder>/.lock: a stopped or slow holder keeps it, and a dead one (even kill -9) has
    lost it, so no lock outlives its process. The file names the holder, for the error another
    process gets at once; a holder that lets go removes it. Within one process the lock is
    shared: a folder opened again (a resume after a run whose trainer is not collected yet)
    is not refused, and the last user to let go releases it."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.folder)
        with _HELD_LOCK:
            if key in _HELD:
                _HELD[key].users += 1
            else:
                _HELD[key] = _Held(_acquire(self.folder))
        self._release = weakref.finalize(self, _let_go, key)

    def close(self) -> None:
        self._release()

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Held:
    """The lock this process holds on one folder: its file, and how many FolderLocks use it."""

    def __init__(self, fd: int):
        self.fd, self.pid, self.users = fd, os.getpid(), 1


_HELD: dict[str, _Held] = {}  # the real path of each folder this process holds
_HELD_LOCK = threading.RLock()  # reentrant: a collection (which lets go) can run inside the block


def _acquire(folder: Path) -> int:
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = (os.read(fd, 256).decode(errors="replace").splitlines() or [""])[0].strip()
            os.close(fd)
            raise ValueError(f"{folder} is in use by {holder or 'another process'} (it holds {path}); "
                             "wait for it to end, or use another folder") from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the previous holder removed the file as it let go: lock the one there now
    with contextlib.suppress(OSError):  # the holder's name is a courtesy: a full disk must not stop the lock
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        st, now = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)


def _let_go(key: str) -> None:
    with _HELD_LOCK:
        held = _HELD[key]
        held.users -= 1
        if held.users:
            return
        del _HELD[key]
        if os.getpid() == held.pid:  # not a forked child's exit: the lock is its parent's
            # removed while still locked: a process that opened it meanwhile sees it gone and retries
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(key, LOCK_FILE))
        os.close(held.fd)


class RunFolder:
    """The run folder at `path`, locked (FolderLock) for as long as this object lives or
    until close()."""

    def __init__(self, path, *, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        if resume and not self.path.is_dir():
            raise ValueError(f"--resume: {self.path} has no checkpoint.pt to resume from")
        self._lock = FolderLock(self.path)  # before looking: what it sees stays so
        self.checkpoint_step: Optional[int] = None  # of the checkpoint.pt this process read or wrote
        try:
            existing = [f for f in RUN_FILES + RUN_FOLDERS if (self.path / f).exists()]
            if resume:
                if not (self.path / "checkpoint.pt").exists():
                    raise ValueError(f"--resume: {self.path} has no checkpoint.pt to resume from")
            elif existing:
                if not overwrite:
                    raise ValueError(f"{self.path} already holds a run ({', '.join(existing)}); "
                                     "pass --resume to continue it or --overwrite to replace it")
                for f in existing:  # only the run's own files: anything else in the folder stays
                    shutil.rmtree(self.path / f) if f in RUN_FOLDERS else (self.path / f).unlink()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Let go of the folder's lock."""
        self._lock.close()

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def file(self, name: str) -> Path:
        return self.path / name

    def write_json(self, name: str, obj: dict) -> None:
        text = json.dumps({k: _finite_or_none(v) for k, v in obj.items()}, indent=2, allow_nan=False) + "\n"
        self._replace(name, text.encode())

    def read_json(self, name: str) -> Optional[dict]:
        f = self.file(name)
        if not f.exists():
            return None
        try:
            return json.loads(f.read_text())
        except ValueError as e:
            raise ValueError(f"{f} is not valid JSON ({e})") from None

    def append_metrics(self, record: dict) -> None:
        path = self.file("metrics.jsonl")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                _write_all(fd, (dumps(record) + "\n").encode())
            except OSError as e:
                with contextlib.suppress(OSError):  # take back a cut record (truncating frees space)
                    os.ftruncate(fd, size)
                raise self._write_failed(path, e) from e
        finally:
            os.close(fd)

    def read_metrics(self, *, allow_cut_last_line: bool = False) -> list[dict]:
        """The records of metrics.jsonl. A line that holds none is an error naming the file and
        the line, except, when allowed, a cut last line (a record whose write stopped midway:
        a full disk, a killed process), which is left out."""
        return self._parse_metrics(strict=not allow_cut_last_line)[0]

    def truncate_metrics(self, before_step: int) -> None:
        """Drop records of steps a resumed run will log again (they were written after the
        checkpoint it resumes from, and come back bit-identical), and a cut last line, saying so."""
        records, cut = self._parse_metrics()
        if cut is not None:
            print(f"catapult-train: {self.file('metrics.jsonl')}: dropped its cut last line {cut[:40]!r} "
                  f"(a write that stopped midway); the run logs from step {before_step} again", file=sys.stderr)
        kept = [r for r in records if r["step"] < before_step]
        self._replace("metrics.jsonl", "".join(dumps(r) + "\n" for r in kept).encode())

    def _parse_metrics(self, strict: bool = False) -> tuple[list[dict], Optional[str]]:
        """The records, and the cut last line left out (None if there is none)."""
        f = self.file("metrics.jsonl")
        if not f.exists():
            return [], None
        lines = f.read_text(errors="replace").split("\n")  # a complete file: the last piece is ""
        records = []
        for number, line in enumerate(lines, 1):
            if not line:
                continue
            record = _metrics_record(line)
            if record is not None:
                records.append(record)
            elif number == len(lines) and not strict:
                return records, line
            else:
                raise ValueError(f"{f} line {number} is not a metrics record: {line[:60]!r}")
        return records, None

    def save_checkpoint(self, state: dict) -> None:
        buffer = io.BytesIO()  # serialized whole first: a write error then surfaces as the OSError it is
        torch.save(state, buffer)
        self._replace("checkpoint.pt", buffer.getbuffer())
        self.checkpoint_step = state["step"]

    def load_checkpoint(self, map_location=None, *, mmap: bool = False) -> dict:
        """Tensors and plain data only (weights_only): loading a file never runs code from it.
        mmap: tensors are read when touched (cheap for reading the config alone)."""
        f = self.file("checkpoint.pt")
        try:
            ckpt = torch.load(f, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            raise ValueError(f"{f} holds more than tensors and plain data"
                             f"{f' ({found.group(1)})' if found else ''}, so it is not loaded: loading "
                             "it could run code. Resume only checkpoints that catapult-train wrote") from None
        except Exception as e:  # truncated, corrupt, or not written by torch.save
            reason = (str(e).strip().splitlines() or [""])[0][:100]
            raise ValueError(f"{f} is not a readable checkpoint ({type(e).__name__}: {reason})") from None
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("step"), int):
            raise ValueError(f"{f} is not a checkpoint of a run (no step count in it)")
        self.checkpoint_step = ckpt["step"]
        return ckpt

    def _replace(self, name: str, data) -> None:
        tmp, target = self.file(name + ".tmp"), self.file(name)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _write_all(fd, data)
                os.fsync(fd)  # a late write error (NFS, delayed allocation) shows here, before the rename
            finally:
                os.close(fd)
            os.replace(tmp, target)
        except BaseException as e:  # a failed write, or a second Ctrl-C or SIGTERM during it
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(e, OSError):
                raise self._write_failed(target, e) from e
            raise

    def _write_failed(self, path: Path, e: OSError) -> OSError:
        kept = (f"{self.file('checkpoint.pt')} (step {self.checkpoint_step}) is intact: --resume continues "
                "from it" if self.checkpoint_step is not None else "no checkpoint was written yet")
        return OSError(f"could not write {path} ({e.strerror or e}); the run stopped there, and {kept}")


def _metrics_record(line: str) -> Optional[dict]:
    """The record on one line of metrics.jsonl, or None if the line holds none."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
