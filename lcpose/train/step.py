"""Pure train / eval steps, identical on one device and under ``jax.pmap`` over local devices.

A step is built from three model-agnostic pieces:

* ``model_apply(variables, batch, *, train, rng) -> (outputs, new_batch_stats)`` -- the network;
  :func:`flax_model_apply` makes one from a linen module (``make_train_step`` does so itself
  when handed a module). ``outputs`` is a dict of arrays.
* ``loss_fn(outputs, batch, rng, step) -> (loss, metrics)`` -- scalar loss, the *mean* over the
  (local) batch, and a dict of scalar (or fixed-shape) metrics.
* ``tx`` -- an optax transformation (:func:`lcpose.train.optim.ranger`).

Data parallelism: ``jax.pmap(make_train_step(..., axis_name="batch"), axis_name="batch")``
with a replicated state and a batch from :func:`shard_batch`. Gradients, metrics and BatchNorm
statistics are ``pmean``-ed over the device axis, so with equal shards the update equals the
single-device update on the global batch, *provided* the model's BatchNorm layers are given
the same ``axis_name`` (flax ``nn.BatchNorm(axis_name=...)`` then normalises with global-batch
statistics). Without it each device normalises by its shard's statistics (the running averages
are still pmean-ed), which is what PyTorch DataParallel-without-SyncBN does, and not equal.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lcpose.train.optim import clip_by_running_norm, sharded_output_norm
from lcpose.train.state import TrainState, eval_params

__all__ = [
    "AXIS_NAME",
    "flax_model_apply",
    "make_train_step",
    "make_eval_step",
    "step_rng",
    "replicate",
    "unreplicate",
    "shard_batch",
    "local_device_count",
]

AXIS_NAME = "batch"

ModelApply = Callable[..., Any]
LossFn = Callable[[Mapping[str, Any], Any, jax.Array, jax.Array], Any]


def flax_model_apply(model: nn.Module, input_key: Optional[str] = "image",
                     rng_collections=("dropout",), **apply_kwargs) -> ModelApply:
    """Canonical ``model_apply`` for a linen module called as ``model(x, train=...)``.

    ``x = batch[input_key]`` (the whole batch if ``input_key`` is None). In training mode the
    ``batch_stats`` collection is mutable and its new value is returned; in eval mode the
    running statistics are used and returned unchanged. ``rng`` feeds the named collections
    (dropout); ``apply_kwargs`` are passed to every call.
    """

    def apply(variables, batch, *, train: bool, rng=None):
        x = batch if input_key is None else batch[input_key]
        rngs = None
        if rng is not None and rng_collections:
            keys = jax.random.split(rng, len(rng_collections))
            rngs = {name: k for name, k in zip(rng_collections, keys)}
        has_bs = bool(jax.tree.leaves(variables.get("batch_stats", {})))
        if train and has_bs:
            out, mutated = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                       rngs=rngs, **apply_kwargs)
            return out, mutated["batch_stats"]
        out = model.apply(variables, x, train=train, rngs=rngs, **apply_kwargs)
        return out, variables.get("batch_stats", {})

    return apply


def _as_apply(model_apply) -> ModelApply:
    return flax_model_apply(model_apply) if isinstance(model_apply, nn.Module) else model_apply


def _variables(params, batch_stats):
    variables = {"params": params}
    if jax.tree.leaves(batch_stats):
        variables["batch_stats"] = batch_stats
    return variables


def step_rng(base_rng, step, axis_name: Optional[str] = None):
    """Per-step key ``fold_in(base, step)``, further folded with the device index under pmap."""
    rng = jax.random.fold_in(base_rng, step)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    return rng


def make_train_step(model_apply: Union[ModelApply, nn.Module], loss_fn: LossFn,
                    tx: optax.GradientTransformation, axis_name: Optional[str] = None, *,
                    output_clip: Optional[Mapping[str, Mapping[str, float]]] = None,
                    learning_rate_fn: Optional[Callable[[Any], Any]] = None,
                    cotangent_metrics_fn: Optional[Callable[..., Mapping[str, Any]]] = None):
    """Build the pure ``train_step(state, batch) -> (state, metrics)``.

    Per step: the network's forward pass is linearised once (``jax.vjp``); ``loss_fn`` is
    differentiated w.r.t. the network *outputs*; the output gradients named in ``output_clip``
    are clipped by :func:`~lcpose.train.optim.clip_by_running_norm` (this is the LC recipe's
    clipper on the weight-logit gradient: the PyTorch reference registers it as a tensor hook
    on the weight-logit output, i.e. on the total gradient w.r.t. that output); the result is
    pulled back to the parameters, averaged over devices and handed to ``tx``.

    Args:
      model_apply: ``model_apply(variables, batch, *, train, rng) -> (outputs, batch_stats)``,
        or a linen module (wrapped by :func:`flax_model_apply` with ``input_key="image"``).
      loss_fn: ``loss_fn(outputs, batch, rng, step) -> (loss, metrics)``; ``loss`` is the mean
        over the batch it sees (one device's shard under pmap).
      tx: the optimiser; its state is ``state.opt_state``.
      axis_name: the pmap axis name (``AXIS_NAME``), or None on one device.
      output_clip: ``{output_name: clipper_kwargs}`` (e.g. ``{"w2d_logits": {}}`` for the
        defaults rel_thresh 0.7, momentum 0.1); the state must have been created with
        ``clip_names`` covering these names. Metrics ``clip/<name>_norm`` (pre-clip norm) and
        ``clip/<name>_threshold`` are added.
      learning_rate_fn: the schedule, to report ``lr`` (value used by this update).
      cotangent_metrics_fn: optional ``f(outputs, output_grads, batch) -> metrics`` evaluated on
        the (clipped) output gradients, e.g. gradient-correctness statistics.

    Metrics always include ``loss`` and ``grad_norm`` (global norm of the averaged gradient),
    and for dict outputs ``grad/<name>_norm``: the norm of the (clipped) gradient w.r.t. each
    output over the global batch.
    """
    apply = _as_apply(model_apply)
    clip_cfg = {str(k): dict(v or {}) for k, v in (output_clip or {}).items()}
    grad_loss = jax.value_and_grad(loss_fn, has_aux=True, allow_int=True)

    def train_step(state: TrainState, batch):
        step = state.step
        rng = step_rng(state.rng, step, axis_name)
        model_rng, loss_rng = jax.random.split(rng)

        def forward(params):
            return apply(_variables(params, state.batch_stats), batch, train=True, rng=model_rng)

        outputs, pullback, new_batch_stats = jax.vjp(forward, state.params, has_aux=True)
        (loss, metrics), out_grads = grad_loss(outputs, batch, loss_rng, step)
        metrics = dict(metrics)

        clip_state = dict(state.clip_state)
        if clip_cfg:
            if not isinstance(out_grads, Mapping):
                raise ValueError("output_clip needs model outputs that are a dict, got "
                                 f"{type(outputs).__name__}")
            clipped = {}
            for name, kwargs in clip_cfg.items():
                if name not in out_grads:
                    raise ValueError(f"output_clip: model has no output {name!r} "
                                     f"(outputs: {sorted(out_grads)})")
                if name not in clip_state:
                    raise ValueError(f"output_clip: state has no clipper state for {name!r}; "
                                     f"create the state with clip_names=[{name!r}, ...]")
                clipped[name], clip_state[name] = clip_by_running_norm(
                    out_grads[name], clip_state[name], axis_name=axis_name, **kwargs)
                metrics[f"clip/{name}_norm"] = clip_state[name].last_norm
                metrics[f"clip/{name}_threshold"] = clip_state[name].max_norm
            # same container type as the outputs (dict or FrozenDict), as the pullback requires
            if isinstance(out_grads, flax.core.FrozenDict):
                out_grads = out_grads.copy(clipped)
            else:
                out_grads = type(out_grads)({**out_grads, **clipped})
        if isinstance(out_grads, Mapping):
            # which output the (clipped) gradient enters through: spikes show where they start
            for name, g in out_grads.items():
                if jnp.issubdtype(jnp.result_type(g), jnp.inexact):
                    metrics[f"grad/{name}_norm"] = sharded_output_norm(g, axis_name)
        if cotangent_metrics_fn is not None:
            metrics.update(cotangent_metrics_fn(outputs, out_grads, batch))

        (grads,) = pullback(out_grads)
        # integer/bool metrics (counts) become float so that they can be averaged over devices
        metrics = {k: (v if jnp.issubdtype(jnp.result_type(v), jnp.inexact)
                       else jnp.asarray(v, jnp.float32)) for k, v in metrics.items()}
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
            loss = jax.lax.pmean(loss, axis_name)
            metrics = jax.lax.pmean(metrics, axis_name)
            new_batch_stats = jax.lax.pmean(new_batch_stats, axis_name)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        metrics["loss"] = loss
        metrics["grad_norm"] = optax.global_norm(grads)
        if learning_rate_fn is not None:
            metrics["lr"] = jnp.asarray(learning_rate_fn(step))
        new_state = state.replace(step=step + 1, params=params, batch_stats=new_batch_stats,
                                  opt_state=opt_state, clip_state=clip_state)
        return new_state, metrics

    return train_step


def make_eval_step(model_apply: Union[ModelApply, nn.Module],
                   eval_fn: Optional[Callable[[Any, Any], Any]] = None, *,
                   use_slow_params: bool = True):
    """Build ``eval_step(state, batch) -> eval_fn(outputs, batch)`` (or the outputs).

    Inference mode (BatchNorm running statistics, no dropout), with :func:`eval_params`
    (Lookahead slow weights unless ``use_slow_params=False``). Per-example results are not
    reduced, so the same function runs under ``jit`` or ``pmap`` (any axis name).
    """
    apply = _as_apply(model_apply)

    def eval_step(state: TrainState, batch):
        params = eval_params(state, slow=use_slow_params)
        outputs, _ = apply(_variables(params, state.batch_stats), batch, train=False, rng=None)
        return outputs if eval_fn is None else eval_fn(outputs, batch)

    return eval_step


# ----------------------------------------------------------------------------------------------
# Host-side helpers for pmap
# ----------------------------------------------------------------------------------------------

def local_device_count() -> int:
    return jax.local_device_count()


def replicate(tree, devices=None, axis_name: str = AXIS_NAME):
    """Copy a pytree onto every local device (leading axis = device), ready for ``pmap``.

    The arrays get the sharding that ``jax.pmap(..., axis_name=axis_name)`` gives its outputs,
    so feeding a step's output state back in does not trigger a second compilation.
    """
    devices = list(devices) if devices is not None else jax.local_devices()
    n = len(devices)
    mesh = jax.sharding.Mesh(np.asarray(devices), (axis_name,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis_name))

    def put(x):
        x = jnp.asarray(x)
        return jax.device_put(jnp.broadcast_to(x[None], (n,) + x.shape), sharding)

    return jax.tree.map(put, tree)


def unreplicate(tree):
    """The first device's copy of a replicated pytree (e.g. to save or evaluate)."""
    return jax.tree.map(lambda x: x[0], tree)


def shard_batch(batch, n_devices: Optional[int] = None):
    """Reshape every leaf's leading axis B to (n_devices, B / n_devices) for ``pmap``.

    Raises ValueError naming the offending key when B is not divisible by ``n_devices`` or the
    leaves disagree on B. Works on numpy arrays (no device transfer) and jax arrays.
    """
    n = jax.local_device_count() if n_devices is None else int(n_devices)
    if n < 1:
        raise ValueError(f"n_devices must be >= 1, got {n_devices}")
    flat, treedef = jax.tree_util.tree_flatten_with_path(batch)
    if not flat:
        return batch
    sizes = {}
    out = []
    for path, x in flat:
        name = jax.tree_util.keystr(path) or "batch"
        shape = np.shape(x)
        if len(shape) == 0:
            raise ValueError(f"shard_batch: {name} is a scalar; every leaf needs a batch axis")
        b = shape[0]
        sizes.setdefault(b, name)
        if len(sizes) > 1:
            raise ValueError(f"shard_batch: leading axes differ: {name} has {b}, "
                             f"{next(iter(sizes.values()))} has {next(iter(sizes))}")
        if b % n:
            raise ValueError(f"shard_batch: batch size {b} of {name} is not divisible by "
                             f"{n} devices")
        out.append(x.reshape((n, b // n) + tuple(shape[1:])))
    return jax.tree_util.tree_unflatten(treedef, out)
