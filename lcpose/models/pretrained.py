"""Saving, loading and merging converted ImageNet encoder weights.

`python -m data_prep.convert_resnet --pth resnet34-b627a593.pth --out DIR` writes

    DIR/encoder.msgpack   {"params": ..., "batch_stats": ...} of `ResNet` (flax.serialization msgpack)
    DIR/meta.json         depth, widths, source file name and its sha256, tensor count

msgpack (one small file, no Orbax checkpoint directory) keeps the weights readable by any Flax
program; train checkpoints still go through Orbax. Use:

    enc = load_encoder_weights(DIR)
    variables = init_variables(model, key, 256)
    variables = merge_encoder_weights(variables, enc)      # into variables["params"]["encoder"]
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from flax import serialization

ENCODER_FILE = "encoder.msgpack"
META_FILE = "meta.json"


def save_encoder_weights(encoder_vars: Mapping[str, Any], out_dir: str, meta: Mapping[str, Any] | None = None):
    """Write {'params', 'batch_stats'} of a ResNet encoder (numpy leaves) and meta.json to out_dir."""
    if set(encoder_vars) != {"params", "batch_stats"}:
        raise ValueError(f"encoder_vars must have keys 'params' and 'batch_stats', got {sorted(encoder_vars)}")
    os.makedirs(out_dir, exist_ok=True)
    tree = jax.tree_util.tree_map(np.asarray, {k: dict(v) for k, v in encoder_vars.items()})
    path = os.path.join(out_dir, ENCODER_FILE)
    with open(path, "wb") as f:
        f.write(serialization.msgpack_serialize(tree))
    if meta is not None:
        with open(os.path.join(out_dir, META_FILE), "w") as f:
            json.dump(dict(meta), f, indent=2)
    return path


def load_encoder_weights(path: str) -> dict:
    """Read converted encoder weights: `path` is the converter's out dir or its encoder.msgpack."""
    file = os.path.join(path, ENCODER_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"encoder weights file not found: {file}")
    with open(file, "rb") as f:
        data = f.read()
    try:
        tree = serialization.msgpack_restore(data)
    except Exception as e:  # msgpack raises several types on corrupt input
        raise ValueError(f"cannot read encoder weights from {file}: {e}") from e
    if not isinstance(tree, dict) or set(tree) != {"params", "batch_stats"}:
        raise ValueError(f"{file} does not hold {{'params', 'batch_stats'}} of an encoder")
    return tree


def merge_encoder_weights(variables: Mapping[str, Any], encoder_vars: Mapping[str, Any], name: str = "encoder"):
    """Return `variables` with params/batch_stats[name] replaced by `encoder_vars` (shape-checked).

    Every leaf of the model's encoder must be present in `encoder_vars` with the same shape
    (e.g. ImageNet weights need the torchvision widths); dtypes follow the model's variables.
    """
    out = {k: dict(v) for k, v in variables.items()}
    for col in ("params", "batch_stats"):
        if col not in out or name not in out[col]:
            raise ValueError(f"variables[{col!r}] has no {name!r} sub-tree to load the encoder into")
        target = out[col][name]
        flat_t = _flatten(target)
        flat_s = _flatten(encoder_vars[col])
        missing = sorted(set(flat_t) - set(flat_s))
        extra = sorted(set(flat_s) - set(flat_t))
        if missing or extra:
            raise ValueError(
                f"encoder {col} do not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''} (check depth)"
            )
        for k, v in flat_t.items():
            if np.shape(flat_s[k]) != np.shape(v):
                raise ValueError(
                    f"encoder {col} {'/'.join(k)} has shape {np.shape(flat_s[k])}, the model expects "
                    f"{np.shape(v)} (check depth and encoder_widths)"
                )
        out[col][name] = _unflatten({k: jax.numpy.asarray(flat_s[k], dtype=v.dtype) for k, v in flat_t.items()})
    return out


def _flatten(tree, prefix=()):
    flat = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(_flatten(v, prefix + (k,)))
        else:
            flat[prefix + (k,)] = v
    return flat


def _unflatten(flat):
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


__all__ = ["save_encoder_weights", "load_encoder_weights", "merge_encoder_weights", "ENCODER_FILE", "META_FILE"]
