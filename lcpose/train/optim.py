"""Optimiser, learning-rate schedule and gradient clipping of the LC / GDR-Net training recipe.

* :func:`ranger` -- Ranger (RAdam + Lookahead, with gradient centralisation) as one
  ``optax.GradientTransformation`` on ordinary parameter trees. It reproduces the PyTorch
  ``Ranger`` (version 20.4.11) that GDR-Net and the LC reference code train with; see its
  docstring for every detail that differs from a plain ``optax.chain(optax.radam, ...)``.
* :func:`flat_cosine_schedule` -- GDR-Net's ``flat_and_anneal`` policy: linear warm-up, flat,
  cosine anneal from 72 % of training.
* :func:`clip_by_running_norm` / :func:`adaptive_grad_clip` -- the gradient-norm clipper the LC
  reference code puts on the weight-logit gradients (``NormClipper``: a running clipping
  threshold, momentum 0.1, relative threshold 0.7), as a pure function and as an optax
  transformation.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "ranger",
    "scale_by_ranger_radam",
    "centralize_gradients",
    "lookahead",
    "LookaheadSlowState",
    "lookahead_slow_params",
    "flat_cosine_schedule",
    "RunningNormClipState",
    "init_running_norm_clip",
    "clip_by_running_norm",
    "adaptive_grad_clip",
]


# ----------------------------------------------------------------------------------------------
# Ranger
# ----------------------------------------------------------------------------------------------

def scale_by_ranger_radam(b1: float = 0.95, b2: float = 0.999, eps: float = 1e-5,
                          threshold: float = 5.0) -> optax.GradientTransformation:
    """Rectified Adam direction exactly as PyTorch Ranger computes it (without the learning rate).

    With moments m_t, v_t (no bias correction stored), rho_inf = 2 / (1 - b2) - 1 and
    rho_t = rho_inf - 2 t b2^t / (1 - b2^t) (Liu et al. 2020, Alg. 2):

    * rho_t > threshold:  d = r_t sqrt(1 - b2^t) / (1 - b1^t) * m_t / (sqrt(v_t) + eps),
      r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t));
    * otherwise (first steps): d = m_t / (1 - b1^t)  (momentum SGD).

    This differs from ``optax.scale_by_radam`` only in where ``eps`` sits: Ranger adds it to
    sqrt(v_t), not to the bias-corrected sqrt(v_t / (1 - b2^t)), i.e. its effective epsilon is
    eps / sqrt(1 - b2^t) (about 13x larger at step 6, 1.3x at step 1000). With Ranger's
    eps = 1e-5 and small conv gradients this is visible, so it is reproduced here.
    """
    rho_inf = 2.0 / (1.0 - b2) - 1.0
    log_b1, log_b2 = (math.log(b) if b > 0 else -math.inf for b in (b1, b2))

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=zeros,
                                      nu=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * (g * g), state.nu, updates)
        count = optax.safe_increment(state.count)
        # Scalars in the default float dtype (float64 under jax_enable_x64); 1 - b^t through
        # expm1, which float32 gets right to ~1e-7 even at t = 1 (1 - 0.999 loses 4 digits).
        t = count.astype(jnp.result_type(float))
        one_m_b1t = -jnp.expm1(t * log_b1)
        one_m_b2t = -jnp.expm1(t * log_b2)
        rho = rho_inf - 2.0 * t * (1.0 - one_m_b2t) / one_m_b2t
        rectified = rho > threshold
        # max(., 0): the argument is negative for rho < 4, a branch jnp.where discards anyway.
        r = jnp.sqrt(jnp.maximum((rho - 4.0) * (rho - 2.0) * rho_inf
                                 / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho), 0.0))
        step_rect = r * jnp.sqrt(one_m_b2t) / one_m_b1t
        step_sgd = 1.0 / one_m_b1t

        def direction(m, v):
            adaptive = step_rect.astype(m.dtype) * m / (jnp.sqrt(v) + eps)
            return jnp.where(rectified, adaptive, step_sgd.astype(m.dtype) * m)

        return jax.tree.map(direction, mu, nu), optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def centralize_gradients(conv_only: bool = False) -> optax.GradientTransformation:
    """Gradient centralisation (Yong et al., ECCV 2020), as in PyTorch Ranger's ``use_gc``.

    Every gradient with ndim >= 2 (>= 4 with ``conv_only``) gets its mean over all axes except
    the output-feature axis removed. PyTorch puts output features first (``(out, in, kh, kw)``),
    Flax puts them last (Dense ``(in, out)``, Conv ``(kh, kw, in, out)``), so the mean here is
    over all axes but the last -- the same per-output-unit mean. 1-D leaves (biases, BatchNorm
    scales) are left alone.
    """
    min_ndim = 4 if conv_only else 2

    def centre(g):
        if g.ndim < min_ndim:
            return g
        return g - jnp.mean(g, axis=tuple(range(g.ndim - 1)), keepdims=True)

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(centre, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class LookaheadSlowState(NamedTuple):
    """State of :func:`lookahead`: optax's lookahead state plus the slow parameters.

    ``slow`` are the parameters to evaluate with (Zhang et al. 2019); the trainer's
    ``params`` stay the fast ones, on which gradients are taken.
    """

    inner: optax.LookaheadState
    slow: Any


def lookahead(fast_optimizer: optax.GradientTransformation, sync_period: int = 6,
              slow_step_size: float = 0.5) -> optax.GradientTransformation:
    """Lookahead that keeps the slow weights in its own state, like PyTorch Ranger.

    ``optax.lookahead`` wants the parameters as ``optax.LookaheadParams(fast, slow)``, which
    every piece of training code (model apply, checkpoint layout, export) would then have to
    know about. This wrapper stores ``slow`` in the optimiser state instead and takes and
    returns ordinary parameter trees: the parameters the train state carries are the fast
    weights, the update it returns moves them, and after every ``sync_period``-th update both
    become slow + alpha (fast - slow) (the computation is ``optax.lookahead``'s, so fast and
    slow agree to rounding, not bitwise, right after a sync). Read the slow weights with
    :func:`lookahead_slow_params` (``lcpose.train.state.eval_params`` does).
    """
    inner_tx = optax.lookahead(fast_optimizer, sync_period=sync_period,
                               slow_step_size=slow_step_size)

    def init_fn(params):
        synced = optax.LookaheadParams.init_synced(params)
        return LookaheadSlowState(inner=inner_tx.init(synced), slow=params)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("lookahead needs `params` (the fast weights) in update()")
        pair = optax.LookaheadParams(fast=params, slow=state.slow)
        pair_updates, inner = inner_tx.update(updates, state.inner, pair)
        slow = optax.apply_updates(state.slow, pair_updates.slow)
        return pair_updates.fast, LookaheadSlowState(inner=inner, slow=slow)

    return optax.GradientTransformation(init_fn, update_fn)


def lookahead_slow_params(opt_state) -> Optional[Any]:
    """The slow (evaluation) weights inside an optimiser state, or None if it has no lookahead.

    Searches through ``optax.chain`` / ``optax.masked`` / ``inject_hyperparams`` nesting; with
    more than one lookahead in the state the first one found is returned.
    """
    if isinstance(opt_state, LookaheadSlowState):
        return opt_state.slow
    if isinstance(opt_state, dict):
        children = list(opt_state.values())
    elif isinstance(opt_state, (tuple, list)):
        children = list(opt_state)
    elif hasattr(opt_state, "inner_state"):          # optax.MaskedState & co
        children = [opt_state.inner_state]
    else:
        return None
    for child in children:
        found = lookahead_slow_params(child)
        if found is not None:
            return found
    return None


def ranger(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 1e-4, b1: float = 0.95,
           b2: float = 0.999, eps: float = 1e-5, lookahead_steps: int = 6,
           lookahead_alpha: float = 0.5, *, threshold: float = 5.0, use_gc: bool = True,
           gc_conv_only: bool = False,
           weight_decay_mask: Any = None) -> optax.GradientTransformation:
    """Ranger = RAdam + Lookahead (+ gradient centralisation), PyTorch Ranger 20.4.11 semantics.

    Defaults are Ranger's (b1 0.95, b2 0.999, eps 1e-5, k = 6, alpha = 0.5, RAdam threshold 5,
    gradient centralisation on for conv and dense kernels) with the LC/GDR-Net LM-O weight
    decay 1e-4; the paper's learning rate is 2e-4 under :func:`flat_cosine_schedule`.

    Per step, with lr the scheduled learning rate (``learning_rate(count)`` for a schedule):

    1. g <- g - mean(g)  per output unit (``use_gc``; :func:`centralize_gradients`);
    2. RAdam direction d (:func:`scale_by_ranger_radam`, eps outside the square root);
    3. fast <- fast - lr (d + weight_decay * fast)   -- *decoupled* weight decay: PyTorch
       Ranger does ``p -= weight_decay * lr * p`` on the weights, not ``g += weight_decay * p``,
       so the decay is not normalised by the Adam denominator (AdamW-like, scaled by the
       scheduled lr as in torch's AdamW). It applies to every parameter (biases and BatchNorm
       included) unless ``weight_decay_mask`` (an optax mask) says otherwise;
    4. every ``lookahead_steps``-th step: slow <- slow + alpha (fast - slow), fast <- slow.
       The RAdam moments are not reset at a sync (Ranger does not).

    The result acts on ordinary parameter trees; the slow weights live in the optimiser state
    (:class:`LookaheadSlowState`) -- evaluate with ``lcpose.train.eval_params(state)``. (The
    PyTorch reference evaluates the fast weights, at most k - 1 steps away from the slow ones.)
    """
    if not 0.0 <= lookahead_alpha <= 1.0:
        raise ValueError(f"lookahead_alpha must be in [0, 1], got {lookahead_alpha}")
    if int(lookahead_steps) < 1:
        raise ValueError(f"lookahead_steps must be >= 1, got {lookahead_steps}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"b1 and b2 must be in [0, 1), got b1={b1}, b2={b2}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    parts = []
    if use_gc:
        parts.append(centralize_gradients(conv_only=gc_conv_only))
    parts.append(scale_by_ranger_radam(b1=b1, b2=b2, eps=eps, threshold=threshold))
    if weight_decay > 0:
        parts.append(optax.add_decayed_weights(weight_decay, mask=weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return lookahead(optax.chain(*parts), sync_period=int(lookahead_steps),
                     slow_step_size=lookahead_alpha)


# ----------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------

def flat_cosine_schedule(base_lr: float, total_steps: int, anneal_start: float = 0.72,
                         warmup_steps: int = 1000, warmup_factor: float = 0.001,
                         final_factor: float = 0.0) -> optax.Schedule:
    """GDR-Net's ``flat_and_anneal`` learning-rate policy (linear warm-up, cosine anneal).

    With A = anneal_start * total_steps and s the number of updates done so far (optax's
    ``count``; PyTorch's ``LambdaLR`` step counter), lr(s) = base_lr * f(s),

    * s < warmup_steps:  f = warmup_factor (1 - s / W) + s / W      (warm-up wins over anneal)
    * s >= A:            f = final + (1 - final) (1 + cos(pi (s - A) / (T - A))) / 2
    * otherwise:         f = 1.

    Beyond ``total_steps`` the lr stays at ``final_factor * base_lr`` (the PyTorch lambda would
    climb back up the cosine; nothing trains there in the reference code).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0.0 <= anneal_start <= 1.0:
        raise ValueError(f"anneal_start must be in [0, 1], got {anneal_start}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    total = float(total_steps)
    a = anneal_start * total
    span = total - a

    def schedule(count):
        s = jnp.asarray(count).astype(jnp.result_type(float))   # float64 under x64
        if warmup_steps > 0:
            alpha = s / float(warmup_steps)
            warm = warmup_factor * (1.0 - alpha) + alpha
        else:
            warm = jnp.ones_like(s)
        if span > 0:
            progress = jnp.clip((s - a) / span, 0.0, 1.0)
            anneal = final_factor + 0.5 * (1.0 - final_factor) * (1.0 + jnp.cos(math.pi * progress))
        else:
            anneal = jnp.full_like(s, final_factor)
        factor = jnp.where(s < warmup_steps, warm, jnp.where(s >= a, anneal, 1.0))
        return base_lr * factor

    return schedule


# ----------------------------------------------------------------------------------------------
# Running-norm gradient clipper (LC reference code's NormClipper)
# ----------------------------------------------------------------------------------------------

class RunningNormClipState(NamedTuple):
    """State of the running-norm clipper.

    max_norm:  current clipping threshold; <= 0 means "not initialised" (no gradient seen yet).
    last_norm: norm of the last gradient seen, before clipping (for logging).
    """

    max_norm: jax.Array
    last_norm: jax.Array


def init_running_norm_clip() -> RunningNormClipState:
    """Fresh clipper state (float32 scalars)."""
    return RunningNormClipState(max_norm=jnp.asarray(-1.0, jnp.float32),
                                last_norm=jnp.asarray(0.0, jnp.float32))


def sharded_output_norm(grads, axis_name: Optional[str] = None):
    """Global L2 norm (float32) of a gradient w.r.t. per-example network outputs.

    Inside ``pmap`` (``axis_name`` set) each device holds the gradient of its shard's *mean*
    loss w.r.t. its own examples' outputs; the global-batch gradient is their concatenation
    divided by the number of devices, whose norm is sqrt(psum ||g_d||^2) / n_devices. The same
    value on every device, and equal to the single-device figure on the whole batch.
    """
    sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(grads))
    if axis_name is not None:
        n_dev = jax.lax.psum(1, axis_name)
        sq = jax.lax.psum(sq, axis_name) / (n_dev * n_dev)
    return jnp.sqrt(sq)


def clip_by_running_norm(grads, state: RunningNormClipState, *, rel_thresh: float = 0.7,
                         momentum: float = 0.1, initial_max_norm: float = 100.0,
                         axis_name: Optional[str] = None, eps: float = 1e-6):
    """Clip ``grads`` (any pytree, one global L2 norm) against a running threshold.

    Semantics of the LC reference ``NormClipper`` (defaults initial 100, rel_thresh 0.7,
    momentum 0.1), with n = ||grads||_2 and c = 1 + rel_thresh:

    * first call (threshold not initialised): clip to ``initial_max_norm``; threshold <- c n.
    * later: clip to the threshold T; then T <- (1 - momentum) T + momentum c min(n, c T).

    Clipping scales the whole tree by min(1, T / (n + eps)). So T is an exponential moving
    average of 1.7x the gradient norm, each sample capped at 1.7x the current threshold: a
    single exploding gradient is cut back to T and can raise T by at most 17 %, while a slow
    drift of the norm is followed. (The reference calls this a running max; it is this EMA.)

    A non-finite norm leaves ``grads`` and the state unchanged (the reference would poison its
    threshold with NaN for the rest of training); the NaN then shows up in the loss/grad
    metrics instead of being hidden.

    Multi-device (``axis_name`` set, inside ``pmap``): ``grads`` are taken to be one device's
    gradient of its *mean* loss over its shard of the batch, to be ``pmean``-ed later. The norm
    is then that of the global-batch gradient, sqrt(psum ||g_d||^2) / n_devices, so every device
    clips by the same factor and keeps the same state as a single device would on the whole batch.

    Returns ``(clipped_grads, new_state)``.
    """
    if not jax.tree.leaves(grads):
        return grads, state
    norm = sharded_output_norm(grads, axis_name)
    scale = 1.0 + rel_thresh
    max_norm = state.max_norm.astype(jnp.float32)
    fresh = max_norm <= 0.0
    limit = jnp.where(fresh, jnp.float32(initial_max_norm), max_norm)
    ema = (1.0 - momentum) * max_norm + momentum * scale * jnp.minimum(norm, max_norm * scale)
    new_max = jnp.where(fresh, norm * scale, ema)
    finite = jnp.isfinite(norm)
    coef = jnp.where(finite, jnp.minimum(limit / (norm + eps), 1.0), 1.0)
    clipped = jax.tree.map(lambda g: g * coef.astype(g.dtype), grads)
    new_state = RunningNormClipState(
        max_norm=jnp.where(finite, new_max, max_norm).astype(state.max_norm.dtype),
        last_norm=norm.astype(state.last_norm.dtype))
    return clipped, new_state


def adaptive_grad_clip(rel_thresh: float = 0.7, momentum: float = 0.1,
                       initial_max_norm: float = 100.0) -> optax.GradientTransformation:
    """:func:`clip_by_running_norm` as an optax transformation (state: :class:`RunningNormClipState`).

    Clips the global norm of all updates it sees; restrict it to a subtree with
    ``optax.masked`` / ``optax.partition``. Not to be confused with ``optax.adaptive_grad_clip``
    (Brock et al.'s unit-wise AGC, relative to parameter norms): this one is relative to the
    running gradient norm. In the LC recipe the clipped gradient is the one w.r.t. the
    network's weight-logit *output*, which no optimiser sees; the train step applies
    :func:`clip_by_running_norm` there (``make_train_step(..., output_clip=...)``).
    """

    def init_fn(params):
        del params
        return init_running_norm_clip()

    def update_fn(updates, state, params=None):
        del params
        return clip_by_running_norm(updates, state, rel_thresh=rel_thresh, momentum=momentum,
                                    initial_max_norm=initial_max_norm)

    return optax.GradientTransformation(init_fn, update_fn)
