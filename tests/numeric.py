"""Helpers shared by the derivative tests."""
import jax.numpy as jnp
import numpy as np


def central_differences(f, args, eps=1e-6):
    """d f / d args[i] by central differences, for every argument (float64 arrays)."""
    out = []
    for i, a in enumerate(args):
        a = np.asarray(a)
        num = np.zeros(a.shape)
        for idx in np.ndindex(a.shape):
            d = np.zeros(a.shape)
            d[idx] = eps
            ap = [jnp.asarray(b) for b in args]
            am = list(ap)
            ap[i] = jnp.asarray(a + d)
            am[i] = jnp.asarray(a - d)
            num[idx] = (float(f(*ap)) - float(f(*am))) / (2 * eps)
        out.append(num)
    return out
