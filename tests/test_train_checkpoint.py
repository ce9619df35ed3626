"""Orbax checkpoints: a killed-and-resumed run reaches bitwise the same state as an uninterrupted one."""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from lcpose import train
from lcpose.train.checkpoint import decode_iterator_state, encode_iterator_state
from tests.test_train_step import ranger_setup

TOTAL, INTERVAL = 10, 4          # resumed from step 4, crossing a Lookahead sync at 6


class ToyIterator:
    """Deterministic shuffled epochs over a small array set; state as bytes, like grain.DataLoader."""

    def __init__(self, n=24, batch=8, seed=0):
        r = np.random.default_rng(seed)
        self.data = {"image": r.normal(size=(n, 6, 6, 3)).astype(np.float32),
                     "target": r.normal(size=(n, 2)).astype(np.float32),
                     "mask": (r.uniform(size=(n, 6, 6, 1)) > 0.5).astype(np.float32)}
        self.n, self.batch, self.seed = n, batch, seed
        self.epoch, self.pos = 0, 0

    def __next__(self):
        perm = np.random.default_rng(self.seed + self.epoch).permutation(self.n)
        idx = perm[self.pos:self.pos + self.batch]
        self.pos += self.batch
        if self.pos >= self.n:
            self.epoch, self.pos = self.epoch + 1, 0
        return {k: v[idx] for k, v in self.data.items()}

    def get_state(self):
        return json.dumps({"epoch": self.epoch, "pos": self.pos}).encode()

    def set_state(self, state):
        d = json.loads(state.decode())
        self.epoch, self.pos = d["epoch"], d["pos"]


@pytest.fixture(scope="module")
def setup():
    _, _, _, step, fresh_state = ranger_setup()       # Ranger with Lookahead k = 6
    return step, fresh_state


def _run(step, state, it, until, ckpt=None):
    while int(state.step) < until:
        state, _ = step(state, next(it))
        if ckpt is not None:
            ckpt.save(int(state.step), state, data_state=it.get_state(), meta={"variant": "toy"})
    return state


def test_kill_and_resume_equals_uninterrupted_run(setup, tmp_path):
    step, fresh_state = setup
    reference = _run(step, fresh_state(), ToyIterator(), TOTAL)

    # session 1: checkpoint at 4, "killed" after step 7
    ck = train.Checkpointer(tmp_path / "ckpt", save_interval_steps=INTERVAL, max_to_keep=2)
    _run(step, fresh_state(), ToyIterator(), 7, ck)
    ck.wait_until_finished()
    del ck                                           # all in-memory state is discarded

    # session 2: a new process would only have the directory and the code
    ck = train.Checkpointer(tmp_path / "ckpt", save_interval_steps=INTERVAL, max_to_keep=2)
    assert ck.latest_step() == 4
    target = jax.eval_shape(fresh_state)             # abstract: no initialisation work
    restored = ck.restore(target)
    assert restored.step == 4 and restored.meta == {"variant": "toy"}
    assert isinstance(restored.data_state, bytes)
    it = ToyIterator()
    it.set_state(restored.data_state)
    state = _run(step, restored.state, it, TOTAL, ck)
    assert ck.save(int(state.step), state, data_state=it.get_state(), force=True)
    assert not ck.save(int(state.step), state, force=True)        # that step exists: no-op
    ck.close()

    assert int(state.step) == TOTAL
    for name in ("params", "batch_stats", "opt_state", "clip_state", "rng", "step"):
        a, b = getattr(state, name), getattr(reference, name)
        assert jax.tree.structure(a) == jax.tree.structure(b), name
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
    assert train.Checkpointer(tmp_path / "ckpt").all_steps() == [8, 10]     # keep-2


def test_iterator_state_encoding_round_trips(tmp_path):
    for value in (b"\x00\xffraw", "text-state", {"a": [1, 2], "b": None}):
        enc = encode_iterator_state(value)
        json.dumps(enc)
        assert decode_iterator_state(json.loads(json.dumps(enc))) == value
    with pytest.raises(ValueError, match="data_state"):
        encode_iterator_state(object())
    ck = train.Checkpointer(tmp_path / "empty")
    assert ck.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ck.restore({"w": np.zeros(2)})
    ck.close()


_KILL_WORKER = r"""
import os, signal, sys
import numpy as np
from lcpose.train import Checkpointer
ck = Checkpointer(sys.argv[1], save_interval_steps=1, async_save=True)
ck.save(1, {"w": np.arange(1000, dtype=np.float32)}, data_state={"pos": 1})
ck.wait_until_finished()
big = np.random.default_rng(0).standard_normal(24_000_000, dtype=np.float32)
ck.save(2, {"w": big[:1000], "big": big}, data_state={"pos": 2})
os.kill(os.getpid(), signal.SIGKILL)          # killed while step 2 is being written
"""


@pytest.mark.slow
def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _KILL_WORKER, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    leftovers = [n for n in os.listdir(tmp_path) if "tmp" in n]
    ck = train.Checkpointer(tmp_path, save_interval_steps=1)
    latest = ck.latest_step()
    assert latest in (1, 2)
    if leftovers:                                    # the interrupted write never became a step
        assert latest == 1
    r = ck.restore({"w": np.zeros(1000, np.float32)}, step=1)
    np.testing.assert_array_equal(np.asarray(r.state["w"]), np.arange(1000, dtype=np.float32))
    assert r.data_state == {"pos": 1}
    # the resumed run can save that step again; the half-written directory is cleaned up
    assert ck.save(2, {"w": np.ones(3, np.float32)}, force=True)
    ck.close()
    assert not [n for n in os.listdir(tmp_path) if "tmp" in n]
    assert train.Checkpointer(tmp_path).all_steps() == [1, 2]
