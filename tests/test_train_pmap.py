"""One train step on 4 host devices equals the single-device step on the same global batch.

The 4 devices need ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before JAX starts, so
the comparison runs in a subprocess: this file executed as a script (``python
tests/test_train_pmap.py``) is the worker; it prints one JSON line with the relative errors.
"""
import json
import os
import subprocess
import sys

import pytest

N_DEV = 4
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _rel(a, b):
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _tree_rel(a, b):
    import jax
    import numpy as np
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    fa = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in la])
    fb = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in lb])
    return _rel(fa, fb)


def worker():
    import tempfile

    import jax
    import numpy as np

    from lcpose import train
    from test_train_step import TinyNet, tiny_batch, tiny_loss

    assert jax.local_device_count() == N_DEV, jax.devices()
    steps = 3
    batch = tiny_batch(8)                    # global batch 8 -> 2 per device
    batches = [tiny_batch(8, seed=s) for s in range(steps)]
    sched = train.flat_cosine_schedule(1e-2, 10, warmup_steps=2)
    tx = train.ranger(sched, lookahead_steps=2)   # a Lookahead sync within the 3 steps
    clip = {"logits": {"initial_max_norm": 1e-3}}  # the clipper is active from step one

    single_model, multi_model = TinyNet(axis_name=None), TinyNet(axis_name=train.AXIS_NAME)
    state0 = train.create_train_state(jax.random.PRNGKey(0), single_model, batch["image"], tx,
                                      clip_names=["logits"], train=False)

    one = jax.jit(train.make_train_step(single_model, tiny_loss, tx, output_clip=clip,
                                        learning_rate_fn=sched))
    many = jax.pmap(train.make_train_step(multi_model, tiny_loss, tx, train.AXIS_NAME,
                                          output_clip=clip, learning_rate_fn=sched),
                    axis_name=train.AXIS_NAME)

    s1, sn = state0, train.replicate(state0)
    m1s, mns = [], []
    for b in batches:
        s1, m1 = one(s1, b)
        sn, mn = many(sn, train.shard_batch(b, N_DEV))
        m1s.append(m1)
        mns.append(mn)
    sn_host = train.unreplicate(sn)
    # every device holds the same state
    same = all(np.array_equal(np.asarray(x)[0], np.asarray(x)[i])
               for x in jax.tree.leaves(sn) for i in range(N_DEV))

    d1 = jax.tree.map(lambda a, b: a - b, s1.params, state0.params)
    dn = jax.tree.map(lambda a, b: a - b, sn_host.params, state0.params)
    report = {
        "devices": jax.local_device_count(),
        "replicas_identical": bool(same),
        "param_update_rel": _tree_rel(dn, d1),
        "slow_params_rel": _tree_rel(jax.tree.map(lambda a, b: a - b, train.eval_params(sn_host),
                                                  state0.params),
                                     jax.tree.map(lambda a, b: a - b, train.eval_params(s1),
                                                  state0.params)),
        "batch_stats_rel": _tree_rel(sn_host.batch_stats, s1.batch_stats),
        "opt_state_rel": _tree_rel(sn_host.opt_state, s1.opt_state),
        "clip_state_rel": _tree_rel(sn_host.clip_state, s1.clip_state),
        "metrics_rel": max(_rel(np.asarray(mn[k])[0], m1[k]) for m1, mn in zip(m1s, mns)
                           for k in m1),
        "metric_keys": sorted(m1s[0]),
        "step": int(sn_host.step),
    }
    # restore a saved (unreplicated) state straight into a replicated target
    with tempfile.TemporaryDirectory() as tmp:
        ck = train.Checkpointer(tmp, save_interval_steps=1, async_save=False)
        ck.save(int(s1.step), sn, replicated=True, data_state=b"\x00grain", meta={"k": 1})
        r = ck.restore(sn, replicated=True)
        ck.close()
    report["restored_replicated_shape_ok"] = all(
        np.shape(x) == np.shape(y) for x, y in zip(jax.tree.leaves(r.state), jax.tree.leaves(sn)))
    report["restored_replicated_equal"] = all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(r.state), jax.tree.leaves(sn)))
    report["restored_data_state_ok"] = r.data_state == b"\x00grain" and r.meta == {"k": 1}
    print("RESULT " + json.dumps(report))


@pytest.mark.slow
def test_pmap_step_equals_single_device_step_on_global_batch():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={N_DEV}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, HERE, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"worker failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["devices"] == N_DEV and r["step"] == 3
    assert r["replicas_identical"]
    for key in ("param_update_rel", "slow_params_rel", "batch_stats_rel", "opt_state_rel",
                "clip_state_rel", "metrics_rel"):
        assert r[key] < 1e-5, (key, r)
    assert {"loss", "mse", "bce", "grad_norm", "lr", "clip/logits_norm"} <= set(r["metric_keys"])
    assert r["restored_replicated_shape_ok"] and r["restored_replicated_equal"]
    assert r["restored_data_state_ok"]


if __name__ == "__main__":
    worker()
