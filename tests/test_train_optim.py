"""Ranger, the flat+cosine schedule and the running-norm clipper against hand-derived references."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lcpose.train import optim


# ---------------------------------------------------------------------------------------------
# schedule
# ---------------------------------------------------------------------------------------------

def test_flat_cosine_schedule_key_steps():
    base, total = 2e-4, 10000
    f = optim.flat_cosine_schedule(base, total)           # warm-up 1000 from 0.001, anneal at 72 %
    probe = [0, 500, 999, 1000, 7199, 7200, 8600, 7900, 10000, 12000]
    table = dict(zip(probe, np.asarray(jax.jit(f)(jnp.asarray(probe)), np.float64)))
    lr = lambda s: float(table[s])
    assert lr(0) == pytest.approx(base * 0.001, rel=1e-6)
    assert lr(500) == pytest.approx(base * (0.001 * 0.5 + 0.5), rel=1e-6)
    assert lr(999) == pytest.approx(base * (0.001 * (1 - 0.999) + 0.999), rel=1e-6)
    assert lr(1000) == pytest.approx(base, rel=1e-6)
    assert lr(7199) == pytest.approx(base, rel=1e-6)
    assert lr(7200) == pytest.approx(base, rel=1e-6)         # cos(0) = 1: anneal starts at full lr
    mid = 7200 + (10000 - 7200) // 2
    assert lr(mid) == pytest.approx(base * 0.5, rel=1e-5)
    quarter = 7200 + 2800 // 4
    assert lr(quarter) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-5)
    assert lr(10000) == pytest.approx(0.0, abs=1e-12)
    assert lr(12000) == pytest.approx(0.0, abs=1e-12)         # stays at the final lr
    g = optim.flat_cosine_schedule(1.0, 100, anneal_start=0.5, warmup_steps=0, final_factor=0.1)
    np.testing.assert_allclose(g(jnp.array([0, 75, 100])), [1.0, 0.1 + 0.9 * 0.5, 0.1], rtol=1e-6)
    with pytest.raises(ValueError, match="total_steps"):
        optim.flat_cosine_schedule(1.0, 0)
    with pytest.raises(ValueError, match="anneal_start"):
        optim.flat_cosine_schedule(1.0, 10, anneal_start=1.5)


# ---------------------------------------------------------------------------------------------
# Ranger vs a step-by-step transcription of PyTorch Ranger 20.4.11 (numpy, float64)
# ---------------------------------------------------------------------------------------------

def _ranger_reference(params, grad_fn, lrs, wd, b1=0.95, b2=0.999, eps=1e-5, k=6, alpha=0.5,
                      use_gc=True):
    p = {n: v.copy() for n, v in params.items()}
    slow = {n: v.copy() for n, v in params.items()}
    m = {n: np.zeros_like(v) for n, v in params.items()}
    v2 = {n: np.zeros_like(v) for n, v in params.items()}
    nmax = 2.0 / (1.0 - b2) - 1.0
    for step, lr in enumerate(lrs, start=1):
        grads = grad_fn(p)
        for n in p:
            g = grads[n].copy()
            if use_gc and g.ndim > 1:                        # PyTorch: mean over dims 1.. (out first)
                g_t = np.moveaxis(g, -1, 0)
                g_t = g_t - g_t.reshape(g_t.shape[0], -1).mean(1).reshape((-1,) + (1,) * (g.ndim - 1))
                g = np.moveaxis(g_t, 0, -1)
            v2[n] = b2 * v2[n] + (1 - b2) * g * g
            m[n] = b1 * m[n] + (1 - b1) * g
            b2t = b2 ** step
            nsma = nmax - 2 * step * b2t / (1 - b2t)
            if nsma > 5:
                ss = math.sqrt((1 - b2t) * (nsma - 4) / (nmax - 4) * (nsma - 2) / nsma
                               * nmax / (nmax - 2)) / (1 - b1 ** step)
            else:
                ss = 1.0 / (1 - b1 ** step)
            p[n] = p[n] - wd * lr * p[n]
            if nsma > 5:
                p[n] = p[n] - ss * lr * m[n] / (np.sqrt(v2[n]) + eps)
            else:
                p[n] = p[n] - ss * lr * m[n]
            if step % k == 0:
                slow[n] = slow[n] + alpha * (p[n] - slow[n])
                p[n] = slow[n].copy()
    return p, slow


def _quadratic_problem():
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(3, 2, 4, 5)), "dense": rng.normal(size=(6, 3)),
              "bias": rng.normal(size=(5,))}
    targets = {n: rng.normal(size=v.shape) for n, v in params.items()}
    scales = {n: 10.0 ** rng.uniform(-5, -2, size=v.shape) for n, v in params.items()}

    def grad_fn(p):                                # gradient of sum 0.5 s (p - target)^2
        return {n: scales[n] * (p[n] - targets[n]) for n in p}

    return params, grad_fn


@pytest.mark.parametrize("use_gc", [True, False])
def test_ranger_matches_pytorch_ranger_transcription(use_gc):
    params, grad_fn = _quadratic_problem()
    steps, wd = 20, 1e-2
    sched = optim.flat_cosine_schedule(3e-2, steps, anneal_start=0.5, warmup_steps=4,
                                       warmup_factor=0.1)
    lrs = [float(sched(s)) for s in range(steps)]
    ref_fast, ref_slow = _ranger_reference(params, grad_fn, lrs, wd, use_gc=use_gc)

    tx = optim.ranger(sched, weight_decay=wd, use_gc=use_gc)
    p = {n: jnp.asarray(v) for n, v in params.items()}
    state = tx.init(p)
    update = jax.jit(tx.update)
    for _ in range(steps):
        g = {n: jnp.asarray(v) for n, v in grad_fn({n: np.asarray(x) for n, x in p.items()}).items()}
        u, state = update(g, state, p)
        p = optax.apply_updates(p, u)
    slow = optim.lookahead_slow_params(state)
    for n in params:
        assert p[n].dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(p[n]), ref_fast[n], rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(np.asarray(slow[n]), ref_slow[n], rtol=1e-10, atol=1e-13)
    # the run crossed both RAdam regimes (SGD for t <= 5, rectified after) and 3 lookahead syncs
    assert int(state.inner.steps_since_sync) == steps % 6


def test_ranger_eps_placement_differs_from_optax_radam():
    """Ranger's eps sits outside sqrt(v): same update as optax.radam only when eps -> 0."""
    g = {"w": jnp.full((4,), 3e-5)}
    p = {"w": jnp.zeros(4)}

    def run(tx, n=8):
        def body(carry, _):
            s, q = carry
            u, s = tx.update(g, s, q)
            return (s, optax.apply_updates(q, u)), None
        (_, q), _ = jax.lax.scan(body, (tx.init(p), p), None, length=n)
        return np.asarray(q["w"])

    ours = run(optim.ranger(1.0, weight_decay=0.0, use_gc=False, lookahead_steps=1000))
    theirs = run(optax.radam(1.0, b1=0.95, b2=0.999, eps=1e-5))
    assert not np.allclose(ours, theirs, rtol=1e-3)
    ours0 = run(optim.ranger(1.0, weight_decay=0.0, use_gc=False, lookahead_steps=1000, eps=1e-30))
    theirs0 = run(optax.radam(1.0, b1=0.95, b2=0.999, eps=1e-30))
    np.testing.assert_allclose(ours0, theirs0, rtol=1e-9)


def test_ranger_float32_stays_float32_and_checks_args():
    p = {"w": jnp.ones((2, 3), jnp.float32)}
    tx = optim.ranger(optim.flat_cosine_schedule(1e-3, 10, warmup_steps=2))
    s = tx.init(p)
    u, s = tx.update({"w": jnp.ones((2, 3), jnp.float32)}, s, p)
    assert u["w"].dtype == jnp.float32
    assert optim.lookahead_slow_params(s)["w"].dtype == jnp.float32
    with pytest.raises(ValueError, match="lookahead_alpha"):
        optim.ranger(1e-3, lookahead_alpha=2.0)
    with pytest.raises(ValueError, match="lookahead_steps"):
        optim.ranger(1e-3, lookahead_steps=0)
    with pytest.raises(ValueError, match="params"):
        tx.update({"w": jnp.ones((2, 3))}, s, None)
    # found through an optax.chain around it
    chained = optax.chain(optax.clip_by_global_norm(1.0), tx)
    assert optim.lookahead_slow_params(chained.init(p)) is not None
    assert optim.lookahead_slow_params(optax.adam(1e-3).init(p)) is None


# ---------------------------------------------------------------------------------------------
# running-norm clipper (LC NormClipper semantics)
# ---------------------------------------------------------------------------------------------

_clip = jax.jit(optim.clip_by_running_norm, static_argnames=("initial_max_norm",))


def _grad_with_norm(n):
    return {"a": jnp.array([0.6 * n, 0.0]), "b": jnp.array([[0.8 * n]])}


def test_clip_by_running_norm_hand_derived_sequence():
    st = optim.init_running_norm_clip()
    # 1st: norm 50 < initial 100 -> untouched; threshold = 1.7 * 50 = 85
    g, st = _clip(_grad_with_norm(50.0), st)
    assert float(optax.global_norm(g)) == pytest.approx(50.0, rel=1e-6)
    assert float(st.max_norm) == pytest.approx(85.0, rel=1e-6)
    # 2nd: norm 200 > 85 -> clipped to 85; T = 0.9*85 + 0.1*1.7*min(200, 1.7*85) = 101.065
    g, st = _clip(_grad_with_norm(200.0), st)
    assert float(optax.global_norm(g)) == pytest.approx(85.0, rel=1e-5)
    np.testing.assert_allclose(np.asarray(g["a"]), [0.6 * 85.0, 0.0], rtol=1e-5)   # direction kept
    assert float(st.max_norm) == pytest.approx(0.9 * 85 + 0.17 * 144.5, rel=1e-6)
    assert float(st.last_norm) == pytest.approx(200.0, rel=1e-6)
    # 3rd: norm 10 -> untouched; T = 0.9*101.065 + 0.17*10
    g, st = _clip(_grad_with_norm(10.0), st)
    assert float(optax.global_norm(g)) == pytest.approx(10.0, rel=1e-6)
    assert float(st.max_norm) == pytest.approx(0.9 * 101.065 + 1.7, rel=1e-6)
    # non-finite gradient: passed through, state kept
    t_before = float(st.max_norm)
    g, st = _clip({"a": jnp.array([jnp.nan, 1.0])}, st)
    assert float(st.max_norm) == t_before and np.isnan(np.asarray(g["a"])[0])


def test_clip_first_call_uses_initial_max_norm_and_optax_form_agrees():
    st = optim.init_running_norm_clip()
    g, st = _clip(_grad_with_norm(500.0), st, initial_max_norm=100.0)
    assert float(optax.global_norm(g)) == pytest.approx(100.0, rel=1e-5)
    assert float(st.max_norm) == pytest.approx(850.0, rel=1e-6)        # 1.7 x the unclipped norm

    tx = optim.adaptive_grad_clip()
    s_tx, s_fn = tx.init(None), optim.init_running_norm_clip()
    upd = jax.jit(tx.update)
    for n in (50.0, 200.0, 10.0, 3000.0):
        u1, s_tx = upd(_grad_with_norm(n), s_tx)
        u2, s_fn = _clip(_grad_with_norm(n), s_fn)
        np.testing.assert_allclose(np.asarray(u1["b"]), np.asarray(u2["b"]), rtol=1e-6)
    assert float(s_tx.max_norm) == pytest.approx(float(s_fn.max_norm), rel=1e-6)
