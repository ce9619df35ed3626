"""Networks and their heads chosen by name (big_vision style: one module per model).

    from lcpose.models.registry import get_model, model_module
    model = get_model("gdrnet", preset="cpu", scale_branch=True)   # lcpose.models.gdrnet.build(...)
    head = model_module("gdrnet")                                  # or model_module(model)

``get_model(name, **kwargs)`` imports ``lcpose.models.<name>`` and calls its
``build(**kwargs) -> flax Module``. The module also defines the head's contract, as module-level
functions of ONE instance (the caller vmaps them; ``outputs`` is the model's output dict without
the batch axis, ``example`` one element of a batch of :mod:`lcpose.data.pipeline`):

    decode_train(key, outputs, example, cfg) -> (Correspondences, aux dict)   # training points
    decode_test(outputs, example, cfg) -> Correspondences                      # test points
    surrogate_loss(outputs, example, cfg) -> (loss scalar, metrics dict)       # the head's own loss

(``cfg``: the :class:`lcpose.train.objective.ObjectiveConfig` in training, the
:class:`lcpose.evaluate.PnPConfig` at test time), and may define

    pose_warmup_loss(outputs, example, cfg) -> scalar   # what the pose loss is blended in from
                                                        # (and the baseline's "pose" term)
    EXAMPLE_KEYS: tuple of str                          # batch keys the head reads in training
    map_size(model, input_size) -> int                  # side of the output maps

The objective is then ``surrogate_loss + pose_weight * (f * pose loss on decode_train's
correspondences + (1 - f) * pose_warmup_loss)``, evaluation a registered solver
(:mod:`lcpose.pnp.registry`) on ``decode_test``'s correspondences.
"""
from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any, Tuple, Union

__all__ = ["get_model", "model_module", "example_keys", "map_size", "BASE_EXAMPLE_KEYS"]

# What the pose losses and the train step read of every example (whatever the head).
BASE_EXAMPLE_KEYS: Tuple[str, ...] = ("image", "K_out", "R", "t", "bbox3d")
_REQUIRED = ("build", "decode_train", "decode_test", "surrogate_loss")


def model_module(model: Union[str, Any], default: Union[str, None] = None) -> ModuleType:
    """The module of a model: ``lcpose.models.<name>`` for a name, or the module that defines
    the class of a flax Module instance (so a trained model finds its own head). ``default``:
    the model name to use for an instance whose class is not defined in a model module (a
    stand-in with that model's outputs, e.g. a test oracle)."""
    if default is not None and not isinstance(model, (str, ModuleType)):
        try:
            return model_module(model)
        except ValueError:
            return model_module(default)
    if isinstance(model, ModuleType):
        mod = model
    elif isinstance(model, str):
        if not model.isidentifier():
            raise ValueError(f"model name must be a Python identifier, got {model!r}")
        try:
            mod = importlib.import_module(f"lcpose.models.{model}")
        except ModuleNotFoundError as err:
            if err.name != f"lcpose.models.{model}":
                raise
            raise ValueError(f"unknown model {model!r}: no module lcpose.models.{model}") from None
    else:
        mod = sys.modules.get(type(model).__module__)
        if mod is None:
            raise ValueError(f"cannot find the module of model {model!r}")
    missing = [f for f in _REQUIRED if not callable(getattr(mod, f, None))]
    if missing:
        raise ValueError(f"{mod.__name__} is not a model module: it lacks {', '.join(missing)}")
    return mod


def get_model(name: str, **kwargs):
    """``lcpose.models.<name>.build(**kwargs)``: the flax Module of model ``name``."""
    return model_module(name).build(**kwargs)


def example_keys(model: Union[str, Any]) -> Tuple[str, ...]:
    """The batch keys a training step of this model reads: BASE_EXAMPLE_KEYS + the head's
    ``EXAMPLE_KEYS`` (order kept, no duplicates)."""
    extra = tuple(getattr(model_module(model), "EXAMPLE_KEYS", ()))
    return tuple(dict.fromkeys(BASE_EXAMPLE_KEYS + extra))


def map_size(model, input_size: int) -> int:
    """Side of the model's output maps for square crops of ``input_size``: the head's
    ``map_size`` when it defines one, else traced with ``jax.eval_shape`` (the first map output)."""
    mod = model_module(model)
    if callable(getattr(mod, "map_size", None)):
        return int(mod.map_size(model, int(input_size)))
    import jax
    import jax.numpy as jnp

    x = jax.ShapeDtypeStruct((1, int(input_size), int(input_size), 3), jnp.float32)
    out = jax.eval_shape(lambda im: model.init_with_output(jax.random.key(0), im, train=False)[0], x)
    maps = [v.shape[1] for v in jax.tree.leaves(out) if len(v.shape) == 4]
    if not maps:
        raise ValueError(f"{mod.__name__}: the model returns no (B, h, w, C) map; define map_size")
    return int(maps[0])
