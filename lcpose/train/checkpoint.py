"""Orbax checkpoints of a training run: train state, data-iterator state and run metadata.

Layout (one Orbax step directory per saved step, ``<directory>/<step>/``):

* ``state``     -- the :class:`~lcpose.train.state.TrainState` as a nested dict of arrays
                   (params, opt_state incl. Lookahead slow weights, step, rng, batch_stats,
                   clipper states), Orbax ``StandardSave``;
* ``data_iter`` -- the input pipeline's iterator state, JSON (grain's ``get_state()`` returns a
                   dict, or bytes for ``grain.DataLoader`` iterators; both round-trip);
* ``meta``      -- a JSON dict of the caller's (config, variant name, ...).

Orbax writes each step into ``<step>.orbax-checkpoint-tmp-*`` and renames it when complete, so a
run killed while saving leaves the previous step as the latest complete checkpoint (tested).
Saves are asynchronous by default: ``save`` returns after the arrays are copied to host memory,
the files are written in the background; :meth:`Checkpointer.close` (or leaving the ``with``
block) waits for them.
"""
from __future__ import annotations

import base64
import json
import os
from typing import Any, NamedTuple, Optional

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from lcpose.train.step import replicate, unreplicate

__all__ = ["Checkpointer", "Restored", "encode_iterator_state", "decode_iterator_state"]


def encode_iterator_state(data_state) -> dict:
    """A data-iterator state (dict / str / bytes) as a JSON-able dict that remembers its type."""
    if isinstance(data_state, (bytes, bytearray)):
        return {"type": "bytes", "value": base64.b64encode(bytes(data_state)).decode("ascii")}
    if isinstance(data_state, str):
        return {"type": "str", "value": data_state}
    try:
        json.dumps(data_state)
    except (TypeError, ValueError) as err:
        raise ValueError(f"data_state must be bytes, str or JSON-serialisable, got "
                         f"{type(data_state).__name__}: {err}") from None
    return {"type": "json", "value": data_state}


def decode_iterator_state(encoded: dict):
    """Inverse of :func:`encode_iterator_state`."""
    kind = encoded.get("type")
    if kind == "bytes":
        return base64.b64decode(encoded["value"])
    if kind in ("str", "json"):
        return encoded["value"]
    raise ValueError(f"unknown data-iterator state type {kind!r} in checkpoint")


class Restored(NamedTuple):
    state: Any                  # TrainState with the target's structure
    data_state: Any             # what was passed as data_state (None if nothing was saved)
    meta: Optional[dict]        # what was passed as meta (None if nothing was saved)
    step: int


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Periodic, keep-N, atomic checkpoints of a TrainState (a thin layer over ``ocp.CheckpointManager``).

    Args:
      directory: where step directories go (created).
      save_interval_steps: :meth:`save` writes only when ``step % save_interval_steps == 0``
        (or ``force=True``).
      max_to_keep: keep the newest N checkpoints (None: all).
      async_save: write in a background thread (Orbax async checkpointing).

    Typical loop (``state`` replicated over devices)::

        ckpt = Checkpointer(workdir / "ckpt", save_interval_steps=1000, max_to_keep=3)
        if ckpt.latest_step() is not None:
            r = ckpt.restore(state, replicated=True)
            state = r.state; data_iter.set_state(r.data_state)
        for ... :
            state, metrics = p_train_step(state, shard_batch(next(data_iter)))
            ckpt.save(step + 1, state, data_state=data_iter.get_state(), replicated=True)
        ckpt.save(final_step, state, data_state=..., replicated=True, force=True)
        ckpt.close()

    Save the data-iterator state *after* drawing the batch of that step, so that a restored run
    continues with the next batch.
    """

    ITEMS = ("state", "data_iter", "meta")

    def __init__(self, directory, *, save_interval_steps: int = 1000,
                 max_to_keep: Optional[int] = 3, async_save: bool = True):
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(save_interval_steps=int(save_interval_steps),
                                               max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=self.ITEMS)

    # -- queries ---------------------------------------------------------------------------------
    def latest_step(self) -> Optional[int]:
        """Newest complete checkpoint's step, or None."""
        return self._mngr.latest_step()

    def all_steps(self) -> list:
        return list(self._mngr.all_steps())

    def should_save(self, step: int) -> bool:
        return self._mngr.should_save(int(step))

    # -- save / restore --------------------------------------------------------------------------
    def save(self, step: int, state, *, data_state=None, meta: Optional[dict] = None,
             force: bool = False, replicated: bool = False) -> bool:
        """Save ``state`` (and the iterator state / metadata) as ``step`` if the interval says so.

        ``replicated=True``: ``state`` is a pmap-replicated state; device 0's copy is saved.
        Returns whether a checkpoint was started; a step that is already saved is not written
        again (so a final ``force=True`` save after an interval save of the same step is a no-op).
        """
        step = int(step)
        if not force and not self._mngr.should_save(step):
            return False
        if step in self._mngr.all_steps():
            return False
        if replicated:
            state = unreplicate(state)
        items = {"state": ocp.args.StandardSave(flax.serialization.to_state_dict(state))}
        if data_state is not None:
            items["data_iter"] = ocp.args.JsonSave(encode_iterator_state(data_state))
        if meta is not None:
            items["meta"] = ocp.args.JsonSave(dict(meta))
        return bool(self._mngr.save(step, args=ocp.args.Composite(**items), force=force))

    def restore(self, target, step: Optional[int] = None, *, replicated: bool = False) -> Restored:
        """Restore into the structure of ``target`` (a TrainState; arrays or ShapeDtypeStructs).

        ``target`` only provides structure, shapes and dtypes (``jax.eval_shape`` of the state
        constructor is enough). ``replicated=True``: ``target`` is a pmap-replicated state (or
        its abstract version, leading device axis); the result is replicated over the local
        devices again. ``step`` defaults to the latest. Raises FileNotFoundError if there is no
        checkpoint.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        step = int(step)
        if step not in self._mngr.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} "
                                    f"(have {self.all_steps()})")
        template = target
        if replicated:
            template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), target)
        abstract = _abstract(flax.serialization.to_state_dict(template))
        present = self._present_items(step)
        items = {"state": ocp.args.StandardRestore(abstract)}
        for name in ("data_iter", "meta"):
            if name in present:
                items[name] = ocp.args.JsonRestore()
        out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        state = flax.serialization.from_state_dict(template, out["state"])
        if replicated:
            state = replicate(state)
        else:
            # Orbax hands back arrays committed to a device; a fresh state's arrays are not, and
            # jit keys its cache on that, so match a fresh state (no second compilation of the
            # step in a process that restores, e.g. tests and notebooks).
            state = jax.tree.map(lambda x: jax.device_put(np.asarray(x)), state)
        data_state = decode_iterator_state(out["data_iter"]) if "data_iter" in present else None
        meta = out["meta"] if "meta" in present else None
        return Restored(state=state, data_state=data_state, meta=meta, step=step)

    def _present_items(self, step: int) -> set:
        path = os.path.join(self.directory, str(step))
        return {name for name in self.ITEMS if os.path.isdir(os.path.join(path, name))}

    # -- lifetime --------------------------------------------------------------------------------
    def wait_until_finished(self):
        self._mngr.wait_until_finished()

    def close(self):
        """Wait for pending writes and release the manager."""
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
