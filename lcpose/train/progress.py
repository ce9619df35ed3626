"""Training progress: tqdm bar with live metrics, a metrics history, ``metrics.jsonl`` and PNG curves."""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

__all__ = ["ProgressLogger", "read_metrics", "plot_curves"]


def _to_float(value) -> Optional[float]:
    arr = np.asarray(value)
    if arr.size != 1:
        return None                       # only scalars are logged
    return float(arr.reshape(()))


def read_metrics(path) -> List[dict]:
    """Records of a ``metrics.jsonl`` file (one JSON object per line, each with ``step``)."""
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                # a run killed mid-write leaves at most one broken last line
                raise ValueError(f"{path}:{lineno}: not a JSON line ({err})") from None
    return records


def plot_curves(records: Sequence[Mapping], path, keys: Optional[Iterable[str]] = None,
                title: Optional[str] = None, smooth: int = 0) -> str:
    """Save one subplot per metric (value vs step) as a PNG; returns the path.

    ``keys`` defaults to every numeric metric in ``records``; keys whose name contains
    ``loss`` get a log y-axis when all values are positive. ``smooth`` > 1 overlays a moving
    average of that window.
    """
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if keys is None:
        keys = []
        for r in records:
            for k, v in r.items():
                if k != "step" and k not in keys and isinstance(v, (int, float)):
                    keys.append(k)
    keys = list(keys)
    if not keys:
        raise ValueError("plot_curves: no metrics to plot")
    ncols = min(3, len(keys))
    nrows = int(math.ceil(len(keys) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    for ax, key in zip(axes.ravel(), keys):
        pts = [(r["step"], r[key]) for r in records
               if key in r and isinstance(r[key], (int, float)) and math.isfinite(r[key])]
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        if not pts:
            continue
        steps, vals = map(np.asarray, zip(*pts))
        ax.plot(steps, vals, lw=0.8, alpha=0.5 if smooth > 1 else 1.0)
        if smooth > 1 and len(vals) >= smooth:
            kernel = np.ones(smooth) / smooth
            ax.plot(steps[smooth - 1:], np.convolve(vals, kernel, mode="valid"), lw=1.4)
        if "loss" in key and np.all(vals > 0):
            ax.set_yscale("log")
    for ax in axes.ravel()[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.fspath(path)


class ProgressLogger:
    """tqdm progress with metrics postfix, an in-memory history, ``metrics.jsonl``, PNG curves.

    Args:
      total_steps: length of the run (the bar's total).
      workdir: where ``metrics.jsonl`` and the plots go (None: keep history in memory only).
      initial_step: first step of this session (> 0 when resuming). Existing records of
        ``metrics.jsonl`` with ``step <= initial_step`` are kept, later ones (logged after the
        checkpoint that was resumed from) are dropped, so the file matches the resumed run.
      desc: bar description. ``postfix_keys``: metrics shown on the bar (default: all,
        shortest names first, at most 4). ``disable``: no bar (history/files still kept).

    ``log(step, metrics)`` takes host or device scalars (device arrays are fetched, which waits
    for the step: log every few steps on accelerators). Non-scalar metrics are ignored.
    """

    def __init__(self, total_steps: int, workdir=None, *, initial_step: int = 0,
                 desc: str = "train", postfix_keys: Optional[Sequence[str]] = None,
                 disable: bool = False, filename: str = "metrics.jsonl"):
        from tqdm.auto import tqdm

        self.total_steps = int(total_steps)
        self.workdir = None if workdir is None else os.fspath(workdir)
        self.postfix_keys = None if postfix_keys is None else list(postfix_keys)
        self.history: List[dict] = []
        self._file = None
        self.path = None
        if self.workdir is not None:
            os.makedirs(self.workdir, exist_ok=True)
            self.path = os.path.join(self.workdir, filename)
            if os.path.exists(self.path) and initial_step > 0:
                # tolerant: a run killed mid-write may have left a broken last line
                self.history = self._read_tolerant(self.path, initial_step)
            with open(self.path, "w") as f:
                for r in self.history:
                    f.write(json.dumps(r) + "\n")
            self._file = open(self.path, "a", buffering=1)
        self._bar = tqdm(total=self.total_steps, initial=int(initial_step), desc=desc,
                         disable=disable, dynamic_ncols=True, file=sys.stderr)
        self._last_step = int(initial_step)

    @staticmethod
    def _read_tolerant(path, initial_step):
        kept = []
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if r.get("step", 0) <= initial_step:
                    kept.append(r)
        return kept

    def log(self, step: int, metrics: Mapping, **extra) -> dict:
        """Record metrics of ``step`` (number of updates done), advance the bar to it."""
        record: Dict[str, float] = {"step": int(step)}
        for source in (metrics, extra):
            for k, v in source.items():
                f = _to_float(v)
                if f is not None:
                    record[str(k)] = f
        self.history.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
        keys = self.postfix_keys
        if keys is None:
            keys = sorted((k for k in record if k != "step"), key=len)[:4]
        self._bar.set_postfix({k: f"{record[k]:.4g}" for k in keys if k in record}, refresh=False)
        if step > self._last_step:
            self._bar.update(int(step) - self._last_step)
            self._last_step = int(step)
        return record

    def write(self, message: str):
        """Print a line without breaking the bar."""
        self._bar.write(message)

    def series(self, key: str):
        """(steps, values) of one metric from the history."""
        pts = [(r["step"], r[key]) for r in self.history if key in r]
        if not pts:
            return np.zeros(0, np.int64), np.zeros(0)
        s, v = zip(*pts)
        return np.asarray(s), np.asarray(v)

    def plot(self, path=None, keys: Optional[Iterable[str]] = None, title: Optional[str] = None,
             smooth: int = 0) -> Optional[str]:
        """Save the curves (default ``<workdir>/curves.png``); None if nothing was logged."""
        if not self.history:
            return None
        if path is None:
            if self.workdir is None:
                raise ValueError("plot: give a path (the logger has no workdir)")
            path = os.path.join(self.workdir, "curves.png")
        return plot_curves(self.history, path, keys=keys, title=title, smooth=smooth)

    def close(self):
        self._bar.close()
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
