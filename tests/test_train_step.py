"""The pure train/eval step on one device: output-gradient clipping, BatchNorm, slow weights, helpers.

``TinyNet``/``tiny_loss``/``tiny_batch`` are shared with the pmap and checkpoint tests.
"""
import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lcpose import train


class TinyNet(nn.Module):
    """Conv + BatchNorm (global statistics across ``axis_name``) with two output heads."""

    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Conv(4, (3, 3))(x)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name=self.axis_name)(h)
        h = nn.relu(h)
        logits = nn.Conv(1, (1, 1))(h)
        pred = nn.Dense(2)(jnp.mean(h, axis=(1, 2)))
        return {"pred": pred, "logits": logits}


def tiny_loss(outputs, batch, rng, step):
    del rng, step
    mse = jnp.mean(jnp.square(outputs["pred"] - batch["target"]))
    bce = jnp.mean(optax.sigmoid_binary_cross_entropy(outputs["logits"], batch["mask"]))
    return mse + bce, {"mse": mse, "bce": bce}


def tiny_batch(n=8, seed=0, dtype=np.float32):
    r = np.random.default_rng(seed)
    return {"image": r.normal(size=(n, 6, 6, 3)).astype(dtype),
            "target": r.normal(size=(n, 2)).astype(dtype),
            "mask": (r.uniform(size=(n, 6, 6, 1)) > 0.5).astype(dtype)}


@functools.lru_cache(maxsize=None)
def ranger_setup():
    """One compiled Ranger train step and state constructor, shared with the checkpoint tests."""
    model = TinyNet()
    sched = train.flat_cosine_schedule(5e-2, 40, warmup_steps=2)
    tx = train.ranger(sched, lookahead_steps=6)
    step = jax.jit(train.make_train_step(model, tiny_loss, tx, output_clip={"logits": None},
                                         learning_rate_fn=sched))
    example = tiny_batch()["image"]

    def fresh_state(seed=0):
        return train.create_train_state(jax.random.PRNGKey(seed), model, example, tx,
                                        clip_names=["logits"], train=False)

    return model, sched, tx, step, fresh_state


@pytest.fixture(scope="module")
def fresh():
    model, _, _, _, fresh_state = ranger_setup()
    state = fresh_state()
    return model, tiny_batch(), {"params": state.params, "batch_stats": state.batch_stats}


def test_clipped_output_gradient_reaches_params_as_vjp(fresh):
    """SGD(lr=1) step == params - VJP of the loss with the 'logits' cotangent clipped by hand."""
    model, batch, variables = fresh
    tx = optax.sgd(1.0)
    state = train.TrainState.create(params=variables["params"], tx=tx, rng=jax.random.PRNGKey(1),
                                    batch_stats=variables["batch_stats"], clip_names=["logits"])
    step = jax.jit(train.make_train_step(model, tiny_loss, tx,
                                         output_clip={"logits": {"initial_max_norm": 1e-3}}))
    new_state, metrics = step(state, batch)

    def fwd(p):
        return model.apply({"params": p, "batch_stats": variables["batch_stats"]}, batch["image"],
                           train=True, mutable=["batch_stats"])

    @jax.jit
    def reference(params):
        out, pullback, mutated = jax.vjp(fwd, params, has_aux=True)
        g_out = jax.grad(lambda o: tiny_loss(o, batch, None, 0)[0])(out)
        norm = jnp.linalg.norm(g_out["logits"])
        g_out = dict(g_out, logits=g_out["logits"] * jnp.minimum(1e-3 / (norm + 1e-6), 1.0))
        (clipped,) = pullback(g_out)
        full = jax.grad(lambda p: tiny_loss(fwd(p)[0], batch, None, 0)[0])(params)
        return clipped, full, norm, mutated, tiny_loss(out, batch, None, 0)[0]

    expected, full, norm, mutated, loss = reference(variables["params"])
    norm = float(norm)
    assert norm > 1e-3                                            # so the clip is active
    got = jax.tree.map(lambda a, b: a - b, state.params, new_state.params)
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(expected))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        # (the pre-BatchNorm conv bias has a zero gradient up to rounding: absolute tolerance)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5 * scale)
    # the unclipped path would be the plain gradient, which differs
    assert not np.allclose(np.asarray(full["Conv_1"]["kernel"]),
                           np.asarray(got["Conv_1"]["kernel"]))
    assert float(metrics["clip/logits_norm"]) == pytest.approx(norm, rel=1e-5)
    assert float(metrics["clip/logits_threshold"]) == pytest.approx(1.7 * norm, rel=1e-5)
    # the per-output gradient norms are those of the cotangents the pullback received
    assert float(metrics["grad/logits_norm"]) == pytest.approx(1e-3, rel=1e-4)
    assert int(new_state.step) == 1
    np.testing.assert_allclose(np.asarray(new_state.batch_stats["BatchNorm_0"]["mean"]),
                               np.asarray(mutated["batch_stats"]["BatchNorm_0"]["mean"]), rtol=1e-6)
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-6)


def test_ranger_training_reduces_loss_and_eval_uses_slow_weights(fresh):
    model, batch, _ = fresh
    _, sched, _, step, fresh_state = ranger_setup()
    state = fresh_state()
    init_params = state.params
    losses = []
    for i in range(20):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
        if i == 2:                                    # 3 updates, no lookahead sync yet
            for a, b in zip(jax.tree.leaves(train.eval_params(state)), jax.tree.leaves(init_params)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert losses[-1] < 0.95 * losses[0]
    assert float(m["lr"]) == pytest.approx(float(sched(19)), rel=1e-6)
    assert set(m) >= {"loss", "mse", "bce", "grad_norm", "lr", "clip/logits_norm"}
    assert int(state.step) == 20
    # 20 updates: last sync at 18, so fast != slow; eval_step evaluates the slow weights
    eval_slow = jax.jit(train.make_eval_step(model))
    eval_fast = jax.jit(train.make_eval_step(model, use_slow_params=False))
    slow = train.eval_params(state)
    out = eval_slow(state, batch)
    np.testing.assert_array_equal(np.asarray(out["pred"]),
                                  np.asarray(eval_fast(state.replace(params=slow), batch)["pred"]))
    assert not np.allclose(np.asarray(out["pred"]), np.asarray(eval_fast(state, batch)["pred"]))


def test_step_errors_name_the_problem(fresh):
    model, batch, variables = fresh
    tx = optax.sgd(0.1)
    state = train.TrainState.create(params=variables["params"], tx=tx, rng=jax.random.key(0),
                                    batch_stats=variables["batch_stats"])
    assert state.rng.dtype == jnp.uint32                          # typed keys stored as key data
    for key in (jax.random.key(0, impl="rbg"), 3):               # models.init_variables' rbg keys
        k = train.state.as_key_data(key)
        assert k.shape == (2,) and k.dtype == jnp.uint32
    with pytest.raises(ValueError, match="rng"):
        train.state.as_key_data(jnp.zeros(2, jnp.float32))
    # (trace only: the checks happen while the step is traced)
    with pytest.raises(ValueError, match="no output 'w2d'"):
        jax.eval_shape(train.make_train_step(model, tiny_loss, tx, output_clip={"w2d": {}}),
                       state, batch)
    with pytest.raises(ValueError, match="clip_names"):
        jax.eval_shape(train.make_train_step(model, tiny_loss, tx, output_clip={"logits": {}}),
                       state, batch)


def test_shard_batch_and_replicate():
    batch = tiny_batch(8)
    sharded = train.shard_batch(batch, 4)
    assert sharded["image"].shape == (4, 2, 6, 6, 3)
    np.testing.assert_array_equal(sharded["target"].reshape(8, 2), batch["target"])
    with pytest.raises(ValueError, match=r"\['target'\].*not divisible by 3"):
        train.shard_batch({"target": batch["target"]}, 3)
    with pytest.raises(ValueError, match="leading axes differ"):
        train.shard_batch({"a": np.zeros((4, 1)), "b": np.zeros((2, 1))}, 2)
    rep = train.replicate({"w": jnp.arange(3.0)})
    assert rep["w"].shape == (jax.local_device_count(), 3)
    np.testing.assert_array_equal(np.asarray(train.unreplicate(rep)["w"]), [0.0, 1.0, 2.0])
    k = jnp.asarray(jax.random.PRNGKey(3))
    assert not np.array_equal(train.step_rng(k, 0), train.step_rng(k, 1))
    np.testing.assert_array_equal(train.step_rng(k, 5), train.step_rng(k, 5))
