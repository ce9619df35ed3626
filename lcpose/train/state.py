"""The train state: everything a step reads and writes, as one pytree (pmap- and Orbax-friendly)."""
from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from lcpose.train.optim import init_running_norm_clip, lookahead_slow_params

__all__ = ["TrainState", "create_train_state", "eval_params", "as_key_data"]


def as_key_data(rng) -> jax.Array:
    """A PRNG key as raw uint32 key data of the default PRNG implementation.

    The state stores raw key data so that it checkpoints as a plain integer array. Typed keys
    (``jax.random.key``) are unwrapped; a typed key of another implementation (e.g. the "rbg"
    keys ``lcpose.models.init_variables`` uses for fast initialisation) seeds a default key.
    """
    if isinstance(rng, int):
        return jax.random.PRNGKey(rng)
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if rng.shape != ():
            raise ValueError(f"rng must be a single key, got shape {rng.shape}")
        default = jax.random.key_impl(jax.random.key(0))
        if jax.random.key_impl(rng) == default:
            return jax.random.key_data(rng)
        return jax.random.PRNGKey(jax.random.bits(rng, (), jnp.uint32))
    if rng.dtype != jnp.uint32:
        raise ValueError(f"rng must be a jax PRNG key (typed or uint32 key data), got dtype {rng.dtype}")
    return rng


@flax.struct.dataclass
class TrainState:
    """Train state of one run (unreplicated; ``replicate`` it for ``pmap``).

    step:        int32 scalar, number of optimiser updates done.
    params:      parameters the gradients are taken on (with :func:`~lcpose.train.optim.ranger`:
                 the Lookahead *fast* weights; :func:`eval_params` gives the slow ones).
    batch_stats: BatchNorm running statistics (``{}`` for a model without them).
    opt_state:   optax state of ``tx``.
    rng:         base PRNG key data (uint32); step ``s`` on device ``d`` uses
                 ``fold_in(fold_in(rng, s), d)``, so a run is reproducible and resumable.
    clip_state:  ``{output_name: RunningNormClipState}`` of the output-gradient clippers.

    The optimiser itself is not part of the state (it is a pair of functions, not data): pass
    the same ``tx`` to :func:`create_train_state` and :func:`~lcpose.train.step.make_train_step`.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    clip_state: Any

    @classmethod
    def create(cls, *, params, tx: optax.GradientTransformation, rng, batch_stats=None,
               clip_names: Iterable[str] = (), step: int = 0) -> "TrainState":
        """State for given parameters (e.g. converted ImageNet weights), a fresh optimiser state."""
        clip_state = {str(name): init_running_norm_clip() for name in clip_names}
        return cls(step=jnp.asarray(step, jnp.int32), params=params,
                   batch_stats={} if batch_stats is None else batch_stats,
                   opt_state=tx.init(params), rng=as_key_data(rng), clip_state=clip_state)


def create_train_state(rng, model, example_input, tx: optax.GradientTransformation, *,
                       clip_names: Iterable[str] = (), init_rngs: Optional[Mapping[str, Any]] = None,
                       params: Any = None, **init_kwargs) -> TrainState:
    """Initialise a Flax (linen) ``model`` and the optimiser; returns an unreplicated TrainState.

    ``model.init({"params": k, "dropout": k'}, example_input, **init_kwargs)`` runs under ``jit``
    (pass e.g. ``train=False``). ``rng`` is split three ways: parameter init, the init-time
    dropout stream, and the state's training key. ``params`` (optional) replaces the
    initialised parameters (e.g. an ImageNet-converted tree with the same structure) while the
    BatchNorm statistics still come from ``init``. ``clip_names`` are the model outputs whose
    gradients the train step clips (``make_train_step(output_clip=...)``).
    """
    rng = as_key_data(rng)
    k_params, k_dropout, k_train = jax.random.split(rng, 3)
    rngs = {"params": k_params, "dropout": k_dropout}
    if init_rngs:
        rngs.update(init_rngs)
    init = _jitted_init(model, init_kwargs)
    variables = flax.core.unfreeze(init(rngs, example_input))
    if "params" not in variables:
        raise ValueError("model.init returned no 'params' collection")
    init_params = variables.pop("params")
    if params is not None:
        want = jax.tree.structure(init_params)
        got = jax.tree.structure(params)
        if want != got:
            raise ValueError(f"params: tree structure differs from the model's\n{got}\nvs\n{want}")
        init_params = params
    batch_stats = variables.pop("batch_stats", {})
    return TrainState.create(params=init_params, tx=tx, rng=k_train, batch_stats=batch_stats,
                             clip_names=clip_names)


@functools.lru_cache(maxsize=32)
def _cached_init(model, kw_items):
    return jax.jit(functools.partial(model.init, **dict(kw_items)))


def _jitted_init(model, init_kwargs):
    # One compiled init per (module, kwargs): a fresh jax.jit(partial(...)) would recompile.
    try:
        return _cached_init(model, tuple(sorted(init_kwargs.items())))
    except TypeError:                                    # unhashable module or kwargs
        return jax.jit(functools.partial(model.init, **init_kwargs))


def eval_params(state: TrainState, slow: bool = True):
    """Parameters to evaluate/export with: Lookahead's slow weights if the optimiser has them."""
    if slow:
        found = lookahead_slow_params(state.opt_state)
        if found is not None:
            return found
    return state.params
