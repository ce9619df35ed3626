"""Guards of a run's working folder: one run at a time, no silent loss of a previous run.

* :class:`WorkdirLock` -- an exclusive ``flock`` on ``<workdir>/.lcpose.lock`` held for the
  whole run; the file names the holder's pid, host and start time, so a second run on the same
  folder is refused with a message that names the first. The kernel drops the lock when its
  process dies (also on ``kill -9``), so a lock file left by a dead process is taken over (with
  a message) instead of blocking the folder for ever.
* :func:`check_start` -- what a run may do with a folder that already holds one: without
  ``resume`` a folder with checkpoints or results is refused unless ``overwrite``; ``resume``
  on an empty folder says that it starts fresh; ``resume`` on a folder written by another
  experiment or with another configuration is refused, naming the differences. The
  experiment's identity is kept in ``<workdir>/experiment.json``.
* :func:`config_differences` -- the field-by-field comparison used by these checks and by
  :func:`lcpose.train.loop.train`'s resume check.

All refusals raise :class:`WorkdirError` (a ValueError) with a one-line message naming the
folder; a command-line entry point prints it as ``error: ...``.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
from typing import Iterable, List, Mapping, Optional

__all__ = ["WorkdirError", "WorkdirLock", "check_start", "config_differences", "find_runs",
           "read_identity", "write_identity", "clear_previous_run", "LOCK_FILE", "IDENTITY_FILE"]

LOCK_FILE = ".lcpose.lock"
IDENTITY_FILE = "experiment.json"
RESULTS_FILE = "results.json"
_RUN_MARKERS = ("ckpt", "config.json")     # what lcpose.train.loop.train leaves in a run folder


class WorkdirError(ValueError):
    """A working folder cannot be used as asked (the message names the folder and why)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:        # exists, owned by someone else
        return True
    return True


class WorkdirLock:
    """Exclusive lock of a working folder for the lifetime of a run (a context manager).

    ``WorkdirLock(workdir).acquire()`` raises :class:`WorkdirError` naming the holder when
    another live process holds it. ``stale_pid`` is the pid named by a lock file whose process
    had died (taken over), else None.
    """

    def __init__(self, workdir, *, log=None):
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self._fd: Optional[int] = None
        self._log = log if log is not None else (lambda msg: print(msg, file=sys.stderr))
        self.stale_pid: Optional[int] = None

    def _holder(self, fd) -> dict:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            text = os.read(fd, 4096).decode("utf-8", "replace")
            return json.loads(text) if text.strip() else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "WorkdirLock":
        os.makedirs(self.workdir, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)   # e.g. ENOLCK: a file system without locks
                    raise WorkdirError(f"cannot lock {self.path}: {err.strerror}") from None
                h = self._holder(fd)
                os.close(fd)
                who = (f"pid {h.get('pid', '?')} on {h.get('host', '?')}, started {h.get('started', '?')}"
                       if h else "pid unknown")
                raise WorkdirError(f"{self.workdir} is in use by another run ({who}; lock file "
                                   f"{self.path}); wait for it to finish or use another workdir") from None
            # A releasing holder unlinks the file: make sure we locked the file that is there now.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            h = self._holder(fd)
            pid = h.get("pid")
            if isinstance(pid, int) and pid != os.getpid():
                self.stale_pid = pid
                state = "no longer running" if not _pid_alive(pid) else "its lock was released"
                self._log(f"lcpose: taking over the stale lock {self.path} of pid {pid} ({state})")
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "argv": list(sys.argv)}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(info) + "\n").encode())
            os.fsync(fd)
            self._fd = fd
            return self
        raise WorkdirError(f"could not lock {self.path} (it keeps being replaced)")

    def release(self):
        if self._fd is None:
            return
        try:
            os.unlink(self.path)      # a clean exit leaves no lock file behind
        except FileNotFoundError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def config_differences(saved: Mapping, now: Mapping, *, ignore: Iterable[str] = ()) -> List[str]:
    """``"key: saved X, now Y"`` for every differing entry; nested dicts are compared one level
    down (``"train.learning_rate: ..."``). Keys in ``ignore`` (plain or dotted) are skipped;
    values are compared after a JSON round trip (tuples == lists)."""
    ignore = set(ignore)

    def norm(v):
        return json.loads(json.dumps(v))

    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if k in ignore:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for kk in sorted(set(a) | set(b)):
                if kk in ignore or f"{k}.{kk}" in ignore:
                    continue
                if norm(a.get(kk)) != norm(b.get(kk)):
                    out.append(f"{k}.{kk}: saved {a.get(kk)!r}, now {b.get(kk)!r}")
        elif norm(a) != norm(b):
            out.append(f"{k}: saved {a!r}, now {b!r}")
    return out


def find_runs(workdir) -> List[str]:
    """Run folders of :func:`lcpose.train.loop.train` under ``workdir`` (itself included) that
    hold at least one checkpoint, as paths relative to ``workdir`` ("." for the folder itself)."""
    workdir = os.path.abspath(os.fspath(workdir))
    out = []
    for root, dirs, _ in os.walk(workdir):
        if "ckpt" in dirs:
            ck = os.path.join(root, "ckpt")
            if any(d.isdigit() for d in os.listdir(ck)):
                out.append(os.path.relpath(root, workdir))
            dirs.remove("ckpt")
        dirs[:] = [d for d in dirs if not d.startswith(".")]
    return sorted(out)


def read_identity(workdir) -> Optional[dict]:
    """The experiment identity saved in ``workdir`` (None if there is none)."""
    path = os.path.join(os.fspath(workdir), IDENTITY_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise WorkdirError(f"{path}: cannot read the experiment identity ({err})") from None


def write_identity(workdir, identity: Mapping):
    path = os.path.join(os.fspath(workdir), IDENTITY_FILE)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(dict(identity), f, indent=1)
    os.replace(tmp, path)


def clear_previous_run(workdir, extra_files: Iterable[str] = ()):
    """Delete what a previous run left in ``workdir``: its top-level folders that hold run
    folders (checkpoints or a run config), the identity, ``results.json`` and ``extra_files``.
    Other files are left alone; so is the lock."""
    workdir = os.path.abspath(os.fspath(workdir))
    for name in os.listdir(workdir):
        p = os.path.join(workdir, name)
        if name in _RUN_MARKERS:
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        elif os.path.isdir(p) and not name.startswith(".") and any(
                m in dirs or m in files for _, dirs, files in os.walk(p) for m in _RUN_MARKERS):
            shutil.rmtree(p)
    for name in (IDENTITY_FILE, RESULTS_FILE, *extra_files):
        p = os.path.join(workdir, name)
        if os.path.isfile(p):
            os.remove(p)


def check_start(workdir, identity: Mapping, *, resume: bool, overwrite: bool = False,
                ignore: Iterable[str] = (), extra_files: Iterable[str] = (), log=None) -> str:
    """Decide how a run starts in ``workdir``; returns "fresh", "resume" or "overwrite".

    ``identity``: a JSON dict that says which experiment and configuration the folder holds
    (``{"experiment": name, ...}``); it is saved as ``experiment.json`` (by the caller, via
    :func:`write_identity`, once the checks passed). ``ignore``: identity keys that may change
    between a run and its resumption (e.g. the objects of a per-object experiment, whose
    results are merged).

    * not ``resume``: refused when the folder holds checkpoints or ``results.json``, unless
      ``overwrite`` (then :func:`clear_previous_run` deletes them and "overwrite" is returned);
    * ``resume`` with nothing to resume: logs one line and returns "fresh";
    * ``resume`` on a folder of another experiment or configuration: refused, naming the
      differences.
    """
    log = log if log is not None else (lambda msg: print(msg, file=sys.stderr))
    workdir = os.path.abspath(os.fspath(workdir))
    runs = find_runs(workdir)
    results = os.path.isfile(os.path.join(workdir, RESULTS_FILE))
    saved = read_identity(workdir)
    if resume and overwrite:
        raise WorkdirError("resume and overwrite exclude each other")
    if not resume:
        if not runs and not results:
            return "fresh"
        if not overwrite:
            what = ", ".join(([f"checkpoints in {', '.join(runs[:3])}" + (" ..." if len(runs) > 3 else "")]
                              if runs else []) + (["results.json"] if results else []))
            raise WorkdirError(f"{workdir} holds a previous run ({what}); resume it (--resume) or "
                               f"delete it and start again (--overwrite)")
        clear_previous_run(workdir, extra_files)
        log(f"lcpose: --overwrite: deleted the previous run in {workdir}")
        return "overwrite"
    if saved is None:
        if "." in runs:
            raise WorkdirError(f"cannot resume {workdir}: it holds a run of lcpose.train.loop.train "
                               f"(ckpt/ at its top), not of {identity.get('experiment')}; use another workdir")
        if runs or results:
            raise WorkdirError(f"cannot resume {workdir}: it holds checkpoints or results but no "
                               f"{IDENTITY_FILE} (not a workdir of {identity.get('experiment')}); "
                               f"use another workdir")
        log(f"lcpose: --resume: nothing to resume in {workdir}, starting fresh")
        return "fresh"
    if saved.get("experiment") != identity.get("experiment"):
        raise WorkdirError(f"cannot resume {workdir}: it holds a run of experiment "
                           f"{saved.get('experiment')!r}, not {identity.get('experiment')!r}; use another workdir")
    diffs = config_differences(saved, identity, ignore=ignore)
    if diffs:
        raise WorkdirError(f"cannot resume {workdir}: the configuration differs ({'; '.join(diffs)}); "
                           f"use another workdir, or --overwrite without --resume")
    if not runs:
        log(f"lcpose: --resume: no checkpoints in {workdir}, starting fresh")
        return "fresh"
    return "resume"
