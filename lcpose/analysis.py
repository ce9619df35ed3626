"""Analysis experiments behind the notebooks in `notebooks/` (the paper's Fig. 2, Fig. 7 / Table 3,
and the linearisation of Sec. 3): scene generation, the learnable-correspondence training used to
measure gradient correctness, the scalar averaging toy, and predicted-vs-empirical pose covariances.

Everything numeric is jitted and vmapped (repeated eager calls of `pnp.solve` would recompile its
while-loop each time). Plotting stays in the notebooks.
"""
from __future__ import annotations

import os
import time
from functools import partial
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lcpose import geometry, metrics, pnp

__all__ = [
    "LMO_K",
    "BoxScenes",
    "box_scenes",
    "perturb_correspondences",
    "pose_loss_fn",
    "CorrespondenceTraining",
    "CorrespondenceTrainer",
    "train_correspondences",
    "tail_mean",
    "descend_pose_loss",
    "reprojection_errors",
    "solve_batch",
    "pose_errors",
    "scalar_toy",
    "pnp_gradient_masks",
    "covariance_study",
    "mahalanobis_ratio",
    "notebook_settings",
    "format_table",
]

# LM-O's camera (BOP), as in bench.common.
LMO_K = np.array([[572.4114, 0.0, 325.2611], [0.0, 573.57043, 242.04899], [0.0, 0.0, 1.0]])


def notebook_settings(full: bool = False, out_dir: str = ".") -> tuple[bool, str]:
    """(full, out_dir) of a notebook run: the notebook's own values, overridden by the environment.

    LCPOSE_NOTEBOOK_FULL=1 (or true/yes/on) switches the full setting on; LCPOSE_NOTEBOOK_OUT names
    the folder for figures and JSON (created if missing). Defaults: the small setting, and the
    working directory (next to the notebook when it runs in Jupyter).
    """
    env_full = os.environ.get("LCPOSE_NOTEBOOK_FULL", "").strip().lower() in ("1", "true", "yes", "on")
    out = os.environ.get("LCPOSE_NOTEBOOK_OUT", "").strip() or out_dir
    os.makedirs(out, exist_ok=True)
    return bool(full) or env_full, out


def format_table(headers, rows, floatfmt: str = ".3g") -> str:
    """A Markdown table (str) of `rows` (sequences) under `headers`; floats with `floatfmt`."""

    def cell(v):
        if isinstance(v, (float, np.floating)):
            return format(float(v), floatfmt)
        return str(v)

    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Scenes: dense correspondences of a box-shaped object in a 64x64 zoom-in crop
# ----------------------------------------------------------------------------------------------


class BoxScenes(NamedTuple):
    """B instances of N dense correspondences each (NumPy, float64).

    x2d (B, N, 2): pixel centres of the output grid (px of the crop, intrinsics K (B, 3, 3)).
    x3d (B, N, 3): the true object coordinates seen at those pixels (front surface of the box, mm),
      so project(x3d, R, t, K) == x2d exactly.
    R (B, 3, 3), t (B, 3): ground-truth poses; bbox3d (8, 3): the box corners (mm);
    extent (3,): box side lengths (mm); diameter: box diagonal (mm).
    """

    x2d: np.ndarray
    x3d: np.ndarray
    R: np.ndarray
    t: np.ndarray
    K: np.ndarray
    bbox3d: np.ndarray
    extent: np.ndarray
    diameter: float


def _random_rotation(rng):
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    return np.asarray(geometry.quat_to_matrix(jnp.asarray(q)), np.float64)


def _ray_box(origin, dirs, half):
    """First intersection parameter of rays origin + s * dirs (M, 3) with the box |x| <= half."""
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / dirs
        s1 = (-half - origin) * inv
        s2 = (half - origin) * inv
    s_near = np.max(np.minimum(s1, s2), axis=1)
    s_far = np.min(np.maximum(s1, s2), axis=1)
    hit = (s_far >= s_near) & (s_near > 0) & np.isfinite(s_near)
    return s_near, hit


def box_scenes(
    seed: int,
    batch: int,
    n_points: int,
    *,
    half_extent=(50.0, 35.0, 25.0),
    out_size: int = 64,
    stride: int = 2,
    K=LMO_K,
    z_range=(500.0, 1000.0),
    pad_scale: float = 1.5,
) -> BoxScenes:
    """Dense correspondences as a GDR-Net-style network sees them, for a box-shaped object.

    Each instance: a random rotation, a translation z in `z_range` (mm) and a lateral offset in the
    image, the zoom-in crop of side pad_scale x the projected box size resized to out_size^2
    (intrinsics K_out = crop_intrinsics(K, ...)), the grid of every `stride`-th output pixel
    (random 0/1 offset, as the paper's dense sampling), and the box surface point that each grid
    pixel's ray hits first (ray casting, so the 2D-3D pairs are exact). `n_points` of the hit
    pixels are drawn at random (static N for jit).
    """
    grid_points = len(range(0, out_size, stride)) ** 2
    if not 4 <= n_points <= grid_points // 2:
        raise ValueError(
            f"n_points must be in [4, {grid_points // 2}] (half the {out_size}/{stride} grid: the object covers at "
            f"most about that much of its crop), got {n_points}"
        )
    rng = np.random.default_rng(seed)
    half = np.asarray(half_extent, np.float64)
    bbox3d = np.asarray(geometry.bbox3d_corners(jnp.asarray(-half), jnp.asarray(half)), np.float64)
    out = {k: [] for k in ("x2d", "x3d", "R", "t", "K")}
    K = np.asarray(K, np.float64)
    attempts = 0
    while len(out["R"]) < batch:
        attempts += 1
        if attempts > 100 * batch:
            raise ValueError(f"n_points={n_points}: too few grid pixels hit the object in {attempts} random poses")
        R = _random_rotation(rng)
        z = rng.uniform(*z_range)
        t = np.array([rng.uniform(-0.2, 0.2) * z, rng.uniform(-0.15, 0.15) * z, z])
        uvw = (bbox3d @ R.T + t) @ K.T
        uv = uvw[:, :2] / uvw[:, 2:]
        lo, hi = uv.min(0), uv.max(0)
        K_out = geometry.crop_intrinsics_np(K, 0.5 * (lo + hi), pad_scale * np.max(hi - lo), out_size)
        off = rng.integers(0, stride, size=2)
        us, vs = np.meshgrid(np.arange(off[0], out_size, stride), np.arange(off[1], out_size, stride))
        pix = np.stack([us.ravel(), vs.ravel()], 1).astype(np.float64)
        rays_c = np.concatenate([pix, np.ones((len(pix), 1))], 1) @ np.linalg.inv(K_out).T
        origin = -R.T @ t  # camera centre in the object frame
        dirs = rays_c @ R  # R^T d per row
        s, hit = _ray_box(origin[None], dirs, half)
        if hit.sum() < n_points:
            continue
        idx = rng.choice(np.flatnonzero(hit), n_points, replace=False)
        out["x2d"].append(pix[idx])
        out["x3d"].append(origin + s[idx, None] * dirs[idx])
        out["R"].append(R)
        out["t"].append(t)
        out["K"].append(K_out)
    arr = {k: np.stack(v) for k, v in out.items()}
    return BoxScenes(bbox3d=bbox3d, extent=2 * half, diameter=float(2 * np.linalg.norm(half)), **arr)


def perturb_correspondences(scenes: BoxScenes, seed: int, *, noise_mm: float = 5.0, outlier_rate: float = 0.2):
    """A noisy start: x3d + N(0, noise_mm^2) per coordinate, and a fraction of outliers replaced by
    uniform points of the box volume (a network's wrong guesses). Returns (x3d0, outlier mask)."""
    rng = np.random.default_rng(seed)
    x3d = scenes.x3d + rng.normal(size=scenes.x3d.shape) * noise_mm
    out = rng.random(scenes.x3d.shape[:2]) < outlier_rate
    half = 0.5 * scenes.extent
    x3d = np.where(out[..., None], rng.uniform(-half, half, size=scenes.x3d.shape), x3d)
    return x3d, out


# ----------------------------------------------------------------------------------------------
# Pose losses with one signature, and the correspondence training of Fig. 7 / Table 3
# ----------------------------------------------------------------------------------------------


def pose_loss_fn(name: str, **kwargs) -> Callable:
    """Per-instance pose loss f(key, x2d, x3d, w2d, K, R_gt, t_gt, bbox3d) -> scalar.

    name: a loss of :mod:`lcpose.losses.registry` ("lc", "bpnp", "epropnp", ...), every point
    valid; kwargs go to the loss. The key is used by the Monte Carlo losses (EPro-PnP) only.
    """
    from lcpose.correspondences import Correspondences
    from lcpose.losses.registry import PoseLossInputs, get_pose_loss

    loss = get_pose_loss(name)

    def f(key, x2d, x3d, w2d, K, R, t, bbox3d):
        corr = Correspondences(x2d=x2d, x3d=x3d, w2d=w2d, valid=jnp.ones(jnp.shape(x2d)[:1], bool))
        return loss.fn(PoseLossInputs(corr=corr, K=K, R=R, t=t, bbox3d=bbox3d, key=key), **kwargs)[0]

    return f


@jax.jit
def solve_batch(x3d, x2d, w2d, K):
    """Weighted PnP (EPnP + LM, `pnp.solve`) of a batch: (R (B,3,3), t (B,3), converged (B,))."""
    res = jax.vmap(lambda a, b, c, k: pnp.solve(a, b, c, k))(x3d, x2d, w2d, K)
    return res.R, res.t, res.converged


def pose_errors(R, t, R_gt, t_gt):
    """Rotation errors (deg) and translation errors (mm) of a batch, NumPy arrays."""
    re = np.asarray(jax.vmap(metrics.rotation_error_deg)(jnp.asarray(R), jnp.asarray(R_gt)))
    te = np.linalg.norm(np.asarray(t) - np.asarray(t_gt), axis=-1)
    return re, te


class CorrespondenceTraining(NamedTuple):
    """History of `train_correspondences` (NumPy arrays).

    steps (S,): the steps at which the correctness was recorded (before the update of that step);
    correctness (S,): pooled fraction of correct pose-loss gradients over all points of the batch;
    pose_loss (S,), surrogate (S,): the batch losses; eval_steps (E,), rot_err_deg (E,),
    trans_err_mm (E,): median pose errors of a weighted PnP solve on the current correspondences;
    x3d, w2d: final correspondences and weights; correct, counted (B, N): the per-point masks of
    the final measurement (`metrics.gradient_correct_mask`); step_ms: fwd+bwd time of one training step (ms,
    median after compilation, batch B); compile_s: first-call time of the step.
    """

    steps: np.ndarray
    correctness: np.ndarray
    pose_loss: np.ndarray
    surrogate: np.ndarray
    eval_steps: np.ndarray
    rot_err_deg: np.ndarray
    trans_err_mm: np.ndarray
    x3d: np.ndarray
    w2d: np.ndarray
    correct: np.ndarray
    counted: np.ndarray
    step_ms: float
    compile_s: float


class CorrespondenceTrainer:
    """Learnable correspondences trained with a pose loss beside the paper's L1 surrogate.

    Parameters per instance: the N object coordinates x3d (init x3d0) and per-axis weight logits
    (w2d = w_init * exp(logit): inverse px of the crop grid, init w_init); x2d stays at the grid
    pixels, as a dense network's output grid does. Objective (batch means):

        pose_weight * pose_loss(x2d, x3d, w2d, ...) + l1_weight * mean |x3d - x3d_gt| / extent,

    the L1 on object coordinates normalised by the box extent (GDR-Net's normalised xyz target).
    Adam (optax) with separate learning rates for x3d (mm / step) and logits, cosine-decayed over
    `steps`. Each step also returns the correctness of the gradient of the *pose loss alone* w.r.t.
    x3d (`metrics.gradient_correct_mask`, pooled over the batch): the quantity of the paper's
    Table 3. One jitted step serves every pose weight (the weight is an argument).

    `loss`: a per-instance pose loss from `pose_loss_fn`.
    """

    def __init__(
        self,
        loss: Callable,
        scenes: BoxScenes,
        x3d0,
        *,
        steps: int = 200,
        l1_weight: float = 1.0,
        lr_x3d: float = 0.5,
        lr_logit: float = 0.05,
        w_init: float = 1.0,
        seed: int = 0,
        dtype=jnp.float32,
    ):
        import optax

        self.steps, self.seed, self.w_init = int(steps), int(seed), float(w_init)
        B, N = scenes.x3d.shape[:2]
        cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
        x2d, x3d_gt, K, R_gt, t_gt = map(cast, (scenes.x2d, scenes.x3d, scenes.K, scenes.R, scenes.t))
        bbox, extent = cast(scenes.bbox3d), cast(scenes.extent)
        self.data = (x2d, x3d_gt, K, R_gt, t_gt)
        self.params0 = {"x3d": cast(x3d0), "logit": jnp.zeros((B, N, 2), dtype)}

        def pose_mean(p, key):
            keys = jax.random.split(key, B)
            per = jax.vmap(loss, in_axes=(0, 0, 0, 0, 0, 0, 0, None))(
                keys, x2d, p["x3d"], self.weights(p), K, R_gt, t_gt, bbox
            )
            return jnp.mean(per)

        def surrogate(p):
            return l1_weight * jnp.mean(jnp.abs(p["x3d"] - x3d_gt) / extent)

        sched = lambda lr: optax.cosine_decay_schedule(lr, self.steps, alpha=0.05)  # noqa: E731
        self.opt = optax.multi_transform(
            {"x3d": optax.adam(sched(lr_x3d)), "logit": optax.adam(sched(lr_logit))},
            {"x3d": "x3d", "logit": "logit"},
        )

        @jax.jit
        def step(p, s, key, pose_weight):
            lp, gp = jax.value_and_grad(pose_mean)(p, key)
            ls, gs = jax.value_and_grad(surrogate)(p)
            correct, counted = jax.vmap(metrics.gradient_correct_mask)(gp["x3d"], p["x3d"], x2d, K, R_gt, t_gt)
            frac = jnp.sum(correct) / jnp.maximum(jnp.sum(counted), 1)
            # Typical size of the pose-loss gradient: RMS over instances of its norm over points.
            gnorm = jnp.sqrt(jnp.mean(jnp.sum(gp["x3d"] ** 2, axis=(1, 2))))
            g = jax.tree_util.tree_map(lambda a, b: pose_weight * a + b, gp, gs)
            upd, s = self.opt.update(g, s, p)
            return optax.apply_updates(p, upd), s, lp, ls, frac, gnorm, correct, counted

        self._step = step

    def weights(self, p):
        return self.w_init * jnp.exp(p["logit"])

    def initial_gradient(self):
        """(correctness, gradient RMS norm) of the unweighted pose loss at the start (no update)."""
        p = self.params0
        out = self._step(p, self.opt.init(p), jax.random.key(self.seed), jnp.float32(1.0))
        return float(out[4]), float(out[5])

    def run(
        self,
        pose_weight: float,
        *,
        record_every: int = 5,
        eval_every: int = 25,
        progress: bool = True,
        timing_repeats: int = 5,
        desc: str = "train",
    ) -> CorrespondenceTraining:
        """Train from the common start for `steps` steps; returns the history."""
        from tqdm.auto import tqdm

        x2d, x3d_gt, K, R_gt, t_gt = self.data
        params = self.params0
        opt_state = self.opt.init(params)
        pw = jnp.asarray(pose_weight, jnp.float32)
        key0 = jax.random.key(self.seed)
        rec = {k: [] for k in ("steps", "correctness", "pose_loss", "surrogate")}
        ev = {k: [] for k in ("eval_steps", "rot_err_deg", "trans_err_mm")}

        def evaluate(i, p):
            R, t, _ = solve_batch(p["x3d"], x2d, self.weights(p), K)
            re, te = pose_errors(R, t, R_gt, t_gt)
            ev["eval_steps"].append(i)
            ev["rot_err_deg"].append(float(np.median(re)))
            ev["trans_err_mm"].append(float(np.median(te)))

        t0 = time.perf_counter()
        compile_s = 0.0
        for i in tqdm(range(self.steps + 1), desc=desc, leave=False, disable=not progress):
            if i % eval_every == 0 or i == self.steps:
                evaluate(i, params)
            # The pose-loss gradient is measured at the current parameters, before the update;
            # the last iteration only measures.
            new_p, new_s, lp, ls, frac, _, correct, counted = self._step(
                params, opt_state, jax.random.fold_in(key0, i), pw
            )
            if i == 0:
                jax.block_until_ready(new_p)
                compile_s = time.perf_counter() - t0
            if i % record_every == 0 or i == self.steps:
                rec["steps"].append(i)
                rec["correctness"].append(float(frac))
                rec["pose_loss"].append(float(lp))
                rec["surrogate"].append(float(ls))
            if i < self.steps:
                params, opt_state = new_p, new_s

        # fwd + bwd (+ the mask and the Adam update, both negligible) of one step, final parameters.
        k = jax.random.fold_in(key0, self.steps + 1)
        times = []
        for _ in range(timing_repeats):
            t1 = time.perf_counter()
            jax.block_until_ready(self._step(params, opt_state, k, pw))
            times.append(time.perf_counter() - t1)
        return CorrespondenceTraining(
            **{k: np.asarray(v) for k, v in rec.items()},
            **{k: np.asarray(v) for k, v in ev.items()},
            x3d=np.asarray(params["x3d"]),
            w2d=np.asarray(self.weights(params)),
            correct=np.asarray(correct),
            counted=np.asarray(counted),
            step_ms=1e3 * float(np.median(times)),
            compile_s=compile_s,
        )


def train_correspondences(loss: Callable, scenes: BoxScenes, x3d0, *, pose_weight: float = 0.02, steps: int = 200,
                          l1_weight: float = 1.0, lr_x3d: float = 0.5, lr_logit: float = 0.05, w_init: float = 1.0,
                          seed: int = 0, dtype=jnp.float32, **run_kwargs) -> CorrespondenceTraining:
    """`CorrespondenceTrainer(loss, scenes, x3d0, ...).run(pose_weight, **run_kwargs)`."""
    trainer = CorrespondenceTrainer(loss, scenes, x3d0, steps=steps, l1_weight=l1_weight, lr_x3d=lr_x3d,
                                    lr_logit=lr_logit, w_init=w_init, seed=seed, dtype=dtype)
    return trainer.run(pose_weight, **run_kwargs)


def tail_mean(history: CorrespondenceTraining, fraction: float = 0.1) -> float:
    """Mean correctness over the records of the last `fraction` of training (at least the last
    record): the end-of-training figure, less noisy than one Monte Carlo step."""
    last = history.steps[-1]
    sel = history.steps >= (1.0 - fraction) * last
    return float(np.mean(history.correctness[sel]))


# ----------------------------------------------------------------------------------------------
# Fig. 2: the averaging effect
# ----------------------------------------------------------------------------------------------


def scalar_toy(values, target, weights=None):
    """The scalar example of Fig. 2: a "pose" y = weighted mean of correspondences x_i.

    Returns (y, grad_pose, grad_corr): the gradients w.r.t. x of the pose loss (y - target)^2 / 2
    and of the per-correspondence loss sum_i (x_i - target)^2 / 2. d/dx_i of the pose loss is
    w_i / sum(w) (y - target): every correspondence is pushed the same way, by the mean error,
    whatever its own error; the per-correspondence gradient is x_i - target, always towards it.
    """
    x = jnp.asarray(values, jnp.float32)
    w = jnp.ones_like(x) if weights is None else jnp.asarray(weights, jnp.float32)

    def pose(x):
        return jnp.sum(w * x) / jnp.sum(w)

    y = pose(x)
    g_pose = jax.grad(lambda x: 0.5 * (pose(x) - target) ** 2)(x)
    g_corr = jax.grad(lambda x: 0.5 * jnp.sum((x - target) ** 2))(x)
    return np.asarray(y), np.asarray(g_pose), np.asarray(g_corr)


def pnp_gradient_masks(loss: Callable, x2d, x3d, w2d, K, R_gt, t_gt, bbox3d, key=None):
    """Per-point gradient correctness of one pose loss on a batch: (correct (B, N), counted (B, N),
    grad_x3d (B, N, 3)), from `metrics.gradient_correct_mask` on d loss / d x3d."""
    B = x3d.shape[0]
    key = jax.random.key(0) if key is None else key

    @jax.jit
    def run(x2d, x3d, w2d, K, R_gt, t_gt, bbox3d, key):
        keys = jax.random.split(key, B)
        g = jax.vmap(jax.grad(loss, argnums=2), in_axes=(0, 0, 0, 0, 0, 0, 0, None))(
            keys, x2d, x3d, w2d, K, R_gt, t_gt, bbox3d
        )
        correct, counted = jax.vmap(metrics.gradient_correct_mask)(g, x3d, x2d, K, R_gt, t_gt)
        return correct, counted, g

    out = run(x2d, x3d, w2d, K, R_gt, t_gt, bbox3d, key)
    return tuple(np.asarray(o) for o in out)


def reprojection_errors(x3d, x2d, K, R_gt, t_gt):
    """Per-point error ||project(x3d_i, R_gt, t_gt) - x2d_i|| (px) of a batch (B, N)."""
    return jax.vmap(lambda a, b, k, R, t: jnp.linalg.norm(geometry.project(a, R, t, k) - b, axis=-1))(
        x3d, x2d, K, R_gt, t_gt
    )


def descend_pose_loss(loss: Callable, x2d, x3d0, w2d, K, R_gt, t_gt, bbox3d, *, steps: int = 50, lr: float = 0.5,
                      key=None):
    """Gradient descent on x3d with a pose loss alone (weights fixed): how each point's own error moves.

    Update x3d <- x3d - lr * g / rms(g) per instance (a normalised step: lr mm per step for the
    typical point, each point moving exactly along its own negative gradient). Returns a dict of
    NumPy arrays: err (steps+1, B, N) reprojection errors under the ground truth (px);
    rot_err_deg, trans_err_mm (steps+1, B) of a weighted PnP solve on the current points;
    correct, counted (steps, B, N) the `metrics.gradient_correct_mask` of each step's gradient;
    grad0 (B, N, 3) the first gradient.
    """
    B = x3d0.shape[0]
    key = jax.random.key(0) if key is None else key

    def batch_loss(x3d, k):
        keys = jax.random.split(k, B)
        per = jax.vmap(loss, in_axes=(0, 0, 0, 0, 0, 0, 0, None))(keys, x2d, x3d, w2d, K, R_gt, t_gt, bbox3d)
        return jnp.sum(per)  # instances are independent: this gives the per-instance gradients

    def measure(x3d):
        res = jax.vmap(lambda a, b, c, k: pnp.solve(a, b, c, k))(x3d, x2d, w2d, K)
        re = jax.vmap(metrics.rotation_error_deg)(res.R, R_gt)
        te = jnp.linalg.norm(res.t - t_gt, axis=-1)
        return reprojection_errors(x3d, x2d, K, R_gt, t_gt), re, te

    @jax.jit
    def run(x3d0, key):
        def body(x3d, i):
            g = jax.grad(batch_loss)(x3d, jax.random.fold_in(key, i))
            correct, counted = jax.vmap(metrics.gradient_correct_mask)(g, x3d, x2d, K, R_gt, t_gt)
            rms = jnp.sqrt(jnp.mean(jnp.sum(g * g, axis=-1), axis=-1))  # (B,)
            x_new = x3d - lr * g / jnp.maximum(rms, jnp.finfo(g.dtype).tiny)[:, None, None]
            return x_new, (measure(x_new), correct, counted, g)

        m0 = measure(x3d0)
        _, (ms, correct, counted, g) = jax.lax.scan(body, x3d0, jnp.arange(steps))
        m = tuple(jnp.concatenate([a[None], b]) for a, b in zip(m0, ms))
        return m, correct, counted, g[0]

    (err, re, te), correct, counted, g0 = run(x3d0, key)
    return {
        "err": np.asarray(err),
        "rot_err_deg": np.asarray(re),
        "trans_err_mm": np.asarray(te),
        "correct": np.asarray(correct),
        "counted": np.asarray(counted),
        "grad0": np.asarray(g0),
    }


# ----------------------------------------------------------------------------------------------
# The linearised solver vs the empirical pose covariance
# ----------------------------------------------------------------------------------------------


def _pose_delta(R, t, R_ref, t_ref):
    """The 6-vector (omega, dt) with (R, t) = retract(R_ref, t_ref, delta)."""
    return jnp.concatenate([geometry.so3_log(R_ref.T @ R), t - t_ref])


def covariance_study(
    key,
    x3d,
    x2d_clean,
    K,
    R_gt,
    t_gt,
    *,
    sigma_px: float,
    outlier_rate: float = 0.0,
    draws: int = 500,
    image_size=(64.0, 64.0),
    huber: Optional[float] = None,
):
    """Predicted vs empirical covariance of the PnP solution of one scene under image noise.

    Noise model: x2d = x2d_clean + N(0, sigma_px^2) per coordinate, and with probability
    `outlier_rate` a point is replaced by a uniform pixel of the image [0, W] x [0, H]. The solver
    is `pnp.solve` (weighted LM from EPnP, no ground truth) with w = 1 / sigma_px, least squares or
    Huber (`huber`, threshold on ||w r||).

    Predictions of the linearised solver y = A x2d at the ground truth (Eqs. 9-12 of the paper),
    A = dy/dx2d from `pnp.implicit_jacobian`, in the 6D update (omega, dt):
      * pred: A diag(M) A^T with M = sigma_px^2, the inlier noise the weights assume (= H^-1);
      * pred_true: A Cov(n) A^T with the true per-coordinate noise covariance of the mixture
        (inliers and uniform outliers; each coordinate independent), and bias_true = A E[n]:
        what the linearisation predicts when it is told the actual noise, the role of the
        per-point residual variances M in the LC loss.
    Empirical: covariance and mean of the 6-vectors of the converged solutions relative to the
    ground truth.

    Returns dict(pred, pred_true (6, 6), bias_true (6,), emp (6, 6), mean (6,), converged
    fraction, deltas (n_converged, 6)), NumPy.
    """
    dtype = x3d.dtype
    n = x3d.shape[0]
    sigma = jnp.asarray(sigma_px, dtype)
    w2d = jnp.ones((n, 2), dtype) / sigma
    A = np.asarray(pnp.implicit_jacobian(x3d, x2d_clean, w2d, K, R_gt, t_gt), np.float64)  # columns like x2d.ravel()
    pred = (A * float(sigma_px) ** 2) @ A.T
    # Moments of one coordinate's noise n = x - x_clean under the mixture.
    p = float(outlier_rate)
    size = np.broadcast_to(np.asarray(image_size, np.float64), (n, 2))
    xc = np.asarray(x2d_clean, np.float64)
    mean_out = 0.5 * size - xc
    second_out = size**2 / 12.0 + mean_out**2
    mean_n = p * mean_out
    var_n = (1 - p) * float(sigma_px) ** 2 + p * second_out - mean_n**2
    pred_true = (A * var_n.reshape(-1)) @ A.T
    bias_true = A @ mean_n.reshape(-1)
    deltas, ok = _sample_solutions_jit(
        key, x3d, x2d_clean, w2d, K, R_gt, t_gt, sigma, jnp.asarray(p, dtype), jnp.asarray(image_size, dtype),
        draws=int(draws), huber=None if huber is None else float(huber),
    )
    d = np.asarray(deltas, np.float64)[np.asarray(ok)]
    emp = np.cov(d.T) if len(d) > 6 else np.full((6, 6), np.nan)
    sym = lambda C: 0.5 * (C + C.T)  # noqa: E731
    return {
        "pred": sym(pred),
        "pred_true": sym(pred_true),
        "bias_true": bias_true,
        "emp": emp,
        "mean": d.mean(0) if len(d) else np.full(6, np.nan),
        "converged": float(np.mean(np.asarray(ok))),
        "deltas": d,
    }


def mahalanobis_ratio(deltas, cov, mean=None):
    """mean_k (d_k - mean)^T cov^-1 (d_k - mean) / 6: 1 when `cov` is the spread of the deltas."""
    d = np.asarray(deltas) - (0.0 if mean is None else np.asarray(mean))
    sol = np.linalg.solve(cov, d.T)
    return float(np.mean(np.sum(d.T * sol, axis=0)) / cov.shape[0])


@partial(jax.jit, static_argnames=("draws", "huber"))
def _sample_solutions_jit(key, x3d, x2d_clean, w2d, K, R_gt, t_gt, sigma, outlier_rate, image_size, *, draws, huber):
    n = x3d.shape[0]
    dtype = x3d.dtype

    def one(k):
        k1, k2, k3 = jax.random.split(k, 3)
        x2d = x2d_clean + sigma * jax.random.normal(k1, (n, 2), dtype)
        out = jax.random.uniform(k2, (n,), dtype) < outlier_rate
        x2d = jnp.where(out[:, None], jax.random.uniform(k3, (n, 2), dtype) * image_size, x2d)
        res = pnp.solve(x3d, x2d, w2d, K, huber=huber)
        return _pose_delta(res.R, res.t, R_gt, t_gt), res.converged

    return jax.vmap(one)(jax.random.split(key, draws))
