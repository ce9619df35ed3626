"""Evaluation of a dense-correspondence network: network -> correspondences -> PnP -> BOP metrics.

Per test instance (a crop from a detection or the ground-truth box, :mod:`lcpose.data.pipeline`
with ``train=False``):

1. the network's head decodes its outputs into test correspondences (``decode_test`` of the
   model's module, :mod:`lcpose.models.registry`); for GDR-Net: xyz (normalised, converted to
   mm with the model's box) and weights, the ceil(0.3 h w) pixels with the largest mean weight
   (:func:`lcpose.correspondences.top_weight_correspondences`, the paper's quantile selection);
2. the solver named by ``PnPConfig.solver`` (:mod:`lcpose.pnp.registry`) gives the pose; the
   default ``"weighted"``: PnP RANSAC (:func:`lcpose.pnp.ransac`: EPnP hypotheses, MSAC, LM on
   the inliers) gives an initial pose, from which the weighted Levenberg-Marquardt solver
   (:func:`lcpose.pnp.solve`, the paper's "PnP weighted": cost 0.5 sum ||w_i r_i||^2 over all
   selected points) gives the estimate. Both poses are kept (``R``/``t`` and
   ``R_ransac``/``t_ransac``).

2D points live on the output grid with its crop intrinsics ``K_out``, so the pose is directly
the camera-frame pose of the full image. :func:`make_predict_fn` is this whole pipeline as one
pure function of (variables, images, K_out, bbox3d, key); it is what
:mod:`lcpose.export` serialises.

Metrics (BOP definitions, :mod:`lcpose.metrics`): ADD(-S) recall at 10 % of the diameter
(ADD-S for objects with a declared symmetry), AUC of ADD-S and of ADD(-S) up to 100 mm (the
YCB-V protocol), AR_MSPD (BOP19, over all instances, and per object), mean rotation /
translation errors. Instances without a detection (``has_box == 0``) count as failures with
infinite errors. :func:`format_table` prints one column per variant; :func:`write_bop_csv`
writes the estimates in the BOP challenge format (``scene_id,im_id,obj_id,score,R,t,time``)
for bop_toolkit's ``eval_bop19_pose.py``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lcpose import metrics as M
from lcpose.models.registry import model_module
from lcpose.pnp.registry import get_solver

__all__ = [
    "PnPConfig",
    "make_predict_fn",
    "evaluate",
    "compute_errors",
    "summarize",
    "format_table",
    "write_bop_csv",
    "weight_map_stats",
    "coordinate_errors",
    "PREDICT_KEYS",
    "YCBV_METRICS",
]

PREDICT_KEYS = ("R", "t", "converged", "R_ransac", "t_ransac", "inliers")


@dataclasses.dataclass(frozen=True)
class PnPConfig:
    """Test-time PnP (hashable).

    fraction: share of the output pixels kept by weight (0.3); with ``use_mask``, of the pixels
      in the predicted mask. The reference's ``quantile`` q keeps the top 1 - q: its GDR-Net
      LM-O setting (0.3) is fraction 0.7, its ZebraPose one (0.2, in the mask) 0.8.
    solver: the test-time solver, a name of :mod:`lcpose.pnp.registry` ("weighted": RANSAC
      then weighted LM, the paper's; "ransac": RANSAC alone; "weighted_epnp": weighted LM from
      weighted EPnP).
    ransac: run PnP RANSAC first; False is ``solver="weighted_epnp"`` (kept for callers that
      set it).
    hypotheses / sample_size / threshold_px: RANSAC (threshold in output-grid pixels).
    iters: LM iterations of both solves; huber: Huber threshold of the weighted solve on
      ||w_i r_i|| (None: least squares, as the paper's weighted solver).
    use_mask: rank only pixels inside the predicted visible mask (GDR-Net style) -- off in the
      paper's LC pipeline, which relies on the weights alone.
    """

    fraction: float = 0.3
    ransac: bool = True
    hypotheses: int = 128
    sample_size: int = 6
    threshold_px: float = 2.0
    iters: int = 30
    huber: Optional[float] = None
    use_mask: bool = False
    solver: str = "weighted"

    def __post_init__(self):
        get_solver(self.solver)   # ValueError naming the registered solvers
        if not self.ransac and self.solver not in ("weighted", "weighted_epnp"):
            raise ValueError(f"ransac=False asks for solver='weighted_epnp', got solver={self.solver!r}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.hypotheses < 1 or self.sample_size < 4 or self.iters < 1:
            raise ValueError("hypotheses >= 1, sample_size >= 4 and iters >= 1 are required")
        if not self.threshold_px > 0:
            raise ValueError(f"threshold_px must be positive, got {self.threshold_px}")

    @property
    def solver_name(self) -> str:
        """The registered solver this configuration runs."""
        return self.solver if self.ransac else "weighted_epnp"

    @property
    def solver_kwargs(self) -> dict:
        return dict(hypotheses=self.hypotheses, sample_size=self.sample_size,
                    threshold_px=self.threshold_px, iters=self.iters, huber=self.huber)


def make_predict_fn(model, pnp: PnPConfig = PnPConfig(), *, head=None):
    """``predict(variables, images, K_out, bbox3d, key) -> dict`` (pure; jit, pmap or export it).

    images (B, S, S, 3) RGB in [0, 1]; K_out (B, 3, 3) intrinsics of the output grid
    (``geometry.crop_intrinsics(K, center, scale, map_size)``); bbox3d (B, 8, 3) the model boxes
    (mm, to turn normalised xyz into mm); key: a PRNG key (raw uint32 (2,) data or typed) for
    RANSAC. Returns R (B, 3, 3), t (B, 3) (mm) of the solver, ``converged`` (B,),
    R_ransac, t_ransac, and ``inliers`` (B,) RANSAC's inlier count.

    ``extra`` (optional): a dict of further per-example arrays (B, ...) for the head's
    ``decode_test``, the batch keys of its ``TEST_KEYS`` (``lcpose.models.registry.test_keys``;
    e.g. the sparse head's model keypoints ``kpt3d``); GDR-Net needs none.

    ``head``: the model module whose ``decode_test`` turns the outputs into correspondences
    (default: the module of ``model``'s class, or GDR-Net's dense head for a stand-in object
    with an ``apply`` returning GDR-Net's outputs).
    """
    mod = model_module(head if head is not None else model, default="gdrnet")
    solver = get_solver(pnp.solver_name)
    solver_kw = pnp.solver_kwargs

    def predict(variables, images, K_out, bbox3d, key, extra=None):
        out = model.apply(variables, images, train=False)
        example = {**(extra or {}), "K_out": K_out, "bbox3d": bbox3d}
        corr = jax.vmap(lambda o, e: mod.decode_test(o, e, pnp))(out, example)
        K_out = jnp.asarray(K_out, corr.x3d.dtype)
        B = corr.x3d.shape[0]
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(B))
        res, m = jax.vmap(lambda k, c, K: solver(k, c, K, **solver_kw))(keys, corr, K_out)
        return {"R": res.R, "t": res.t, "converged": res.converged, "R_ransac": m["R_ransac"],
                "t_ransac": m["t_ransac"], "inliers": m["inliers"].astype(jnp.int32)}

    return predict


_INSTANCE_KEYS = ("obj_id", "obj_index", "scene_id", "im_id", "gt_idx", "score", "has_box",
                  "R", "t", "K", "visib_fract")


def weight_map_stats(model, variables, batch, path=None, *, count: int = 8) -> Dict[str, float]:
    """How the network spreads its correspondence weights over one evaluation batch.

    Returns ``weight_on_mask`` (%, median over the crops of the share of the weight mass, both
    channels, inside the ground-truth visible mask) and ``weight_n_eff`` (median effective
    number of weighted pixels, (sum w)^2 / sum w^2, per crop). A PnP loss can reward putting
    most of the weight on a few pixels (each point's information grows with w^2 while the
    spatial softmax fixes sum w); at test time the weighted solve then rests on those few
    points. With ``path``, also saves a PNG of the first ``count`` crops: image, visible mask,
    weights. Returns {} for a model without a ``w2d`` map output (e.g. the sparse head).
    """
    out = model.apply(variables, batch["image"], train=False)
    if "w2d" not in out:   # a head without dense weight maps (e.g. the sparse keypoint head)
        return {}
    w = np.asarray(out["w2d"]).sum(-1)                       # (B, h, w)
    m = np.asarray(batch["mask_visib"]) > 0
    keep = np.asarray(batch.get("valid_example", np.ones(len(w)))) > 0
    w, m, images = w[keep], m[keep], np.asarray(batch["image"])[keep]
    flat = w.reshape(len(w), -1)
    total = np.maximum(flat.sum(1), 1e-30)
    on_mask = (flat * m.reshape(len(w), -1)).sum(1) / total
    n_eff = total ** 2 / np.maximum((flat ** 2).sum(1), 1e-30)
    stats = {"weight_on_mask": round(100 * float(np.median(on_mask)), 2),
             "weight_n_eff": round(float(np.median(n_eff)), 1)}
    if path is not None and len(w):
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        k = min(count, len(w))
        fig, axes = plt.subplots(3, k, figsize=(1.6 * k, 5.0), squeeze=False)
        for j in range(k):
            for row, (img, kw) in enumerate(((images[j], {}), (m[j], {"cmap": "gray"}),
                                             (w[j] / max(w[j].max(), 1e-30), {"cmap": "viridis"}))):
                axes[row, j].imshow(np.clip(img, 0, 1) if row == 0 else img, **kw)
                axes[row, j].set_xticks([])
                axes[row, j].set_yticks([])
            axes[2, j].set_title(f"{100 * on_mask[j]:.0f} % on mask, n_eff {n_eff[j]:.0f}", fontsize=6)
        for row, label in enumerate(("crop", "visible mask", "weights")):
            axes[row, 0].set_ylabel(label, fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return stats


def coordinate_errors(model, variables, loader, table, *, head=None) -> Optional[Dict[str, np.ndarray]]:
    """Mean object-coordinate error (mm) of the network over the visible pixels, per instance.

    ``table``: the dataset's :class:`lcpose.symmetry.SymmetryTable` (rows = obj_index). Returns
    ``obj_id``, ``xyz_err_mm`` (against the annotated coordinates) and ``xyz_err_sym_mm`` (in
    the symmetric frame: the minimum over the object's equivalent coordinate maps,
    :func:`lcpose.symmetry.symmetric_xyz_error`); NaN for crops without a visible pixel.
    ``head``: as in :func:`make_predict_fn`; its ``predicted_xyz_mm(outputs, example)`` gives
    the predicted map; a head without one (sparse keypoints) gives None.
    """
    from lcpose.symmetry import symmetric_xyz_error

    mod = model_module(head if head is not None else model, default="gdrnet")
    if not hasattr(mod, "predicted_xyz_mm"):
        return None

    @jax.jit
    def errors(variables, images, xyz_gt, mask, bbox3d, sym_R, sym_t, sym_valid):
        out = model.apply(variables, images, train=False)
        pred = jax.vmap(mod.predicted_xyz_mm)(out, {"bbox3d": bbox3d})
        plain = sym_valid & (jnp.arange(sym_valid.shape[1]) == 0)[None]     # identity only
        f = jax.vmap(symmetric_xyz_error)
        return f(pred, xyz_gt, mask, sym_R, sym_t, plain), f(pred, xyz_gt, mask, sym_R, sym_t, sym_valid)

    rows: Dict[str, list] = {"obj_id": [], "xyz_err_mm": [], "xyz_err_sym_mm": []}
    for batch in loader:
        g = table.gather(batch["obj_index"])
        e, e_sym = jax.device_get(errors(variables, batch["image"], batch["xyz"], batch["mask_visib"],
                                         batch["bbox3d"], g["sym_R"], g["sym_t"], g["sym_valid"]))
        keep = np.asarray(batch["valid_example"]) > 0
        rows["obj_id"].append(np.asarray(batch["obj_id"])[keep])
        rows["xyz_err_mm"].append(np.asarray(e)[keep])
        rows["xyz_err_sym_mm"].append(np.asarray(e_sym)[keep])
    return {k: np.concatenate(v) for k, v in rows.items()}


def evaluate(predict, variables, loader, *, key=0, progress: bool = True,
             desc: str = "eval", extra_keys: Sequence[str] = ()) -> Dict[str, np.ndarray]:
    """Run a (jitted) ``predict`` over an evaluation loader; per-instance numpy arrays.

    ``extra_keys``: batch keys handed to ``predict`` as its ``extra`` dict (the head's
    ``TEST_KEYS``, ``lcpose.models.registry.test_keys``; none for GDR-Net).

    Returns a dict with the estimates (``R``, ``t``, ``converged``, ``R_ransac``,
    ``t_ransac``, ``inliers``), the ground truth (``R_gt``, ``t_gt``), the instance ids
    (``obj_id``, ``obj_index``, ``scene_id``, ``im_id``, ``gt_idx``), ``score``, ``has_box``,
    full-image ``K``, ``visib_fract`` and ``time`` (seconds of network + PnP per instance: the
    batch's wall time, measured after compilation, shared evenly by its instances).
    """
    from tqdm.auto import tqdm

    if isinstance(key, int):
        key = jax.random.PRNGKey(key)
    rows: Dict[str, list] = {}
    bar = tqdm(total=loader.steps_per_epoch, desc=desc, disable=not progress, dynamic_ncols=True)
    compiled = False
    for i, batch in enumerate(loader):
        args = (variables, batch["image"], batch["K_out"], batch["bbox3d"],
                jax.random.fold_in(key, i))
        if extra_keys:
            args += ({k: batch[k] for k in extra_keys},)
        if not compiled:                      # compile outside the timing
            jax.block_until_ready(predict(*args))
            compiled = True
        t0 = time.perf_counter()
        out = jax.device_get(jax.block_until_ready(predict(*args)))
        dt = time.perf_counter() - t0
        keep = np.asarray(batch["valid_example"]) > 0
        n = int(keep.sum())
        for k in PREDICT_KEYS:
            rows.setdefault(k, []).append(np.asarray(out[k])[keep])
        for k in _INSTANCE_KEYS:
            name = {"R": "R_gt", "t": "t_gt"}.get(k, k)
            rows.setdefault(name, []).append(np.asarray(batch[k])[keep])
        rows.setdefault("time", []).append(np.full((n,), dt / max(n, 1)))
        bar.update()
    bar.close()
    if not rows:
        raise ValueError(f"the evaluation loader {loader!r} gave no batches")
    return {k: np.concatenate(v) for k, v in rows.items()}


def _padded_symmetries(models):
    """Per object symmetry transformations padded to one count S (repeating the identity,
    which leaves MSSD/MSPD's minimum over symmetries unchanged): (n, S, 3, 3), (n, S, 3)."""
    syms = [M.symmetry_transformations(models.models_info[int(o)]) for o in models.obj_ids]
    S = max(len(r) for r, _ in syms)
    Rs = np.stack([np.concatenate([r, np.repeat(r[:1], S - len(r), 0)]) for r, _ in syms])
    ts = np.stack([np.concatenate([t, np.repeat(t[:1], S - len(t), 0)]) for _, t in syms])
    return Rs.astype(np.float32), ts.astype(np.float32)


@jax.jit
def _errors_core(R, t, R_gt, t_gt, K, pts, symmetric, sym_R, sym_t):
    def one(R, t, R_gt, t_gt, K, pts, sym, sR, st):
        e_add = M.add(R, t, R_gt, t_gt, pts)
        e_adds = M.add_s(R, t, R_gt, t_gt, pts)
        return (e_add, e_adds, jnp.where(sym, e_adds, e_add),
                M.mspd(R, t, R_gt, t_gt, K, pts, sR, st),
                M.rotation_error_deg(R, R_gt), M.translation_error(t, t_gt))

    return jax.lax.map(lambda a: one(*a), (R, t, R_gt, t_gt, K, pts, symmetric, sym_R, sym_t),
                       batch_size=64)


def compute_errors(result: Mapping[str, np.ndarray], models, *, image_width: float = 640.0,
                   prefix: str = "", symmetric_obj_ids=None) -> Dict[str, np.ndarray]:
    """Per-instance pose errors of ``result`` (from :func:`evaluate`): a dict of (M,) arrays.

    ``models`` is the dataset's :class:`lcpose.data.pipeline.ModelTable`. Keys: ``add``,
    ``add_s``, ``add_or_add_s`` (mm), ``mspd`` (px, full-image K), ``re_deg``, ``te_mm``, and
    ``symmetric``, ``diameter``, ``image_width`` per instance. ``prefix="ransac"`` scores
    ``R_ransac``/``t_ransac`` instead. Instances without a box or with a non-finite pose get
    +inf. One compiled function for all objects (points and symmetries gathered per instance).
    ``symmetric_obj_ids``: the objects scored with ADD-S in ADD(-S) (default: those whose
    models_info declares a symmetry; YCB-V's protocol, PoseCNN's, uses 13, 16, 19, 20, 21 only).
    MSPD always uses every declared symmetry (BOP).
    """
    R = np.asarray(result[f"R_{prefix}" if prefix else "R"], np.float32)
    t = np.asarray(result[f"t_{prefix}" if prefix else "t"], np.float32)
    oi = np.asarray(result["obj_index"])
    n = len(oi)
    ok = (np.asarray(result["has_box"]) > 0) & np.all(np.isfinite(R.reshape(n, -1)), 1) \
        & np.all(np.isfinite(t), 1)
    R = np.where(ok[:, None, None], R, np.eye(3, dtype=np.float32))
    t = np.where(ok[:, None], t, np.float32([0.0, 0.0, 1000.0]))
    sym_R, sym_t = _padded_symmetries(models)
    if symmetric_obj_ids is None:
        symmetric = np.asarray(models.symmetric)[oi]
    else:
        symmetric = np.isin(np.asarray(models.obj_ids)[oi], np.asarray(list(symmetric_obj_ids), int))
    errs = _errors_core(R, t, np.asarray(result["R_gt"], np.float32),
                        np.asarray(result["t_gt"], np.float32), np.asarray(result["K"], np.float32),
                        np.asarray(models.points, np.float32)[oi], symmetric, sym_R[oi], sym_t[oi])
    out = {}
    for name, e in zip(("add", "add_s", "add_or_add_s", "mspd", "re_deg", "te_mm"), errs):
        e = np.asarray(e, np.float64)
        out[name] = np.where(ok & np.isfinite(e), e, np.inf)
    out["symmetric"] = symmetric
    out["diameter"] = np.asarray(models.diameter, np.float64)[oi]
    out["image_width"] = np.full((n,), float(image_width))
    return out


def _pct(x) -> float:
    return round(100.0 * float(x), 2)


def summarize(result: Mapping[str, np.ndarray], errors: Mapping[str, np.ndarray],
              errors_ransac: Optional[Mapping[str, np.ndarray]] = None) -> dict:
    """Scores in percent: per object (keys = obj_id as str) and ``mean`` over objects.

    ``add_s_0.1d``: ADD(-S) recall at 0.1 d (ADD-S for symmetric objects; the paper's LM-O
    number); ``auc_add_s`` / ``auc_add_or_add_s``: AUC up to 100 mm (continuous, the
    YCB-Video toolbox's); ``auc_add_s_p11`` / ``auc_add_or_add_s_p11``: the same in the
    "11-point" form (:func:`lcpose.metrics.auc_11point`); ``ar_mspd``: BOP19
    AR_MSPD over all instances (a number) and ``ar_mspd_per_object``; ``re_deg`` / ``te_mm``:
    median errors; ``count``: instances per object. With ``errors_ransac`` also
    ``add_s_0.1d_ransac`` (the RANSAC pose alone).
    """
    obj = np.asarray(result["obj_id"])
    ids = [int(o) for o in np.unique(obj)]
    e = errors

    def per_object(fn, errs=e):
        d = {str(o): fn(errs, obj == o) for o in ids}
        d["mean"] = round(float(np.mean([d[str(o)] for o in ids])), 2)
        return d

    s = {
        "add_s_0.1d": per_object(lambda er, m: _pct(M.add_recall(er["add_or_add_s"][m], er["diameter"][m]))),
        "auc_add_s": per_object(lambda er, m: _pct(M.auc(er["add_s"][m], 100.0))),
        "auc_add_or_add_s": per_object(lambda er, m: _pct(M.auc(er["add_or_add_s"][m], 100.0))),
        "auc_add_s_p11": per_object(lambda er, m: _pct(M.auc_11point(er["add_s"][m], 100.0))),
        "auc_add_or_add_s_p11": per_object(lambda er, m: _pct(M.auc_11point(er["add_or_add_s"][m], 100.0))),
        "ar_mspd": _pct(M.ar_mspd(e["mspd"], e["image_width"])),
        "ar_mspd_per_object": per_object(lambda er, m: _pct(M.ar_mspd(er["mspd"][m], er["image_width"][m]))),
        "re_deg_median": per_object(lambda er, m: round(float(np.median(er["re_deg"][m])), 2)),
        "te_mm_median": per_object(lambda er, m: round(float(np.median(er["te_mm"][m])), 2)),
        "count": {str(o): int(np.sum(obj == o)) for o in ids},
        "converged": _pct(np.mean(result["converged"])),
    }
    s["count"]["mean"] = int(len(obj))
    if errors_ransac is not None:
        s["add_s_0.1d_ransac"] = per_object(
            lambda er, m: _pct(M.add_recall(er["add_or_add_s"][m], er["diameter"][m])), errors_ransac)
    return s


# Per-object columns of the YCB-V table (the paper's Table 2): summary key -> column label.
YCBV_METRICS = (("add_s_0.1d", "ADD(-S)"), ("auc_add_s", "AUC ADD-S"),
                ("auc_add_or_add_s", "AUC ADD(-S)"), ("auc_add_s_p11", "AUC ADD-S p11"),
                ("auc_add_or_add_s_p11", "AUC ADD(-S) p11"))


def format_table(summaries: Mapping[str, dict], *, title: str = "ADD(-S) 0.1d [%]",
                 use_rich: Optional[bool] = None, metrics=None) -> str:
    """A table with one row per object and one column per variant (``{variant: summarize(...)}``).

    Rows: each object's ADD(-S) 0.1d, their mean, the AUC of ADD(-S) to 10 cm, AR_MSPD and
    the RANSAC-only ADD(-S) mean (when available).
    ``metrics``: ((summary key, label), ...), e.g. :data:`YCBV_METRICS`: instead one column per
    variant and metric, rows = objects and their mean (the YCB-V table).
    Rendered with rich when installed (``use_rich``), plain text otherwise.
    """
    names = list(summaries)
    objs = sorted({k for s in summaries.values() for k in s["add_s_0.1d"] if k != "mean"}, key=int)
    if metrics is not None:
        cols = [(n, key) for n in names for key, _ in metrics]
        header = [""] + [f"{n}: {label}" if len(names) > 1 else label
                         for n in names for _, label in metrics]
        rows = [[f"obj {o}"] + [_fmt(summaries[n].get(key, {}).get(o)) for n, key in cols] for o in objs]
        rows.append(["mean"] + [_fmt(summaries[n].get(key, {}).get("mean")) for n, key in cols])
        return _render_table(title, header, rows, len(objs), use_rich)
    rows = [[f"obj {o}"] + [_fmt(summaries[n]["add_s_0.1d"].get(o)) for n in names] for o in objs]
    rows.append(["mean"] + [_fmt(summaries[n]["add_s_0.1d"]["mean"]) for n in names])
    extra = [("AUC ADD(-S) 10cm", lambda s: s["auc_add_or_add_s"]["mean"]),
             ("AR_MSPD", lambda s: s["ar_mspd"]),
             ("mean (RANSAC only)", lambda s: s.get("add_s_0.1d_ransac", {}).get("mean"))]
    for label, fn in extra:
        rows.append([label] + [_fmt(fn(summaries[n])) for n in names])
    header = [""] + names
    return _render_table(title, header, rows, len(objs), use_rich)


def _render_table(title, header, rows, n_objs, use_rich) -> str:
    if use_rich is None:
        try:
            import rich  # noqa: F401
            use_rich = True
        except ImportError:
            use_rich = False
    if use_rich:
        import io

        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right")
        for i, r in enumerate(rows):
            table.add_row(*r, end_section=(i == n_objs - 1 or i == n_objs))
        buf = io.StringIO()
        Console(file=buf, width=max(60, 22 + 14 * (len(header) - 1)), force_terminal=False).print(table)
        return buf.getvalue()
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    out = [title, line(header), "-" * (sum(widths) + 2 * len(widths))]
    out += [line(r) for r in rows]
    return "\n".join(out) + "\n"


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def write_bop_csv(path, result: Mapping[str, np.ndarray], *, unconverged: str = "score0") -> str:
    """Write estimates in the BOP challenge format; returns the path.

    One line per instance with a box: ``scene_id,im_id,obj_id,score,R,t,time`` with R the 9
    entries row-major and t the 3 entries (mm), space separated, and ``time`` the image's
    time (the sum over its instances; BOP requires one value per image). Name the file
    ``METHOD_DATASET-test.csv`` (method without underscores) for bop_toolkit.

    Instances whose solve did not converge (``result["converged"]`` False): the pose is the
    solver's last iterate, not a checked estimate. ``unconverged="score0"`` (default) writes
    it with score 0, so that such rows are told apart from estimates and bop_toolkit scores the
    same poses as :func:`compute_errors`; ``"omit"`` leaves them out (bop_toolkit counts a
    missing estimate as a miss). Rows that cannot be an estimate at all are always left out:
    no box (``has_box`` 0), a non-finite pose, or the object not in front of the camera
    (``t_z <= 0``, e.g. the R = I, t = 0 of a degenerate solve).
    """
    if unconverged not in ("score0", "omit"):
        raise ValueError(f"unconverged must be 'score0' or 'omit', got {unconverged!r}")
    scene, im = np.asarray(result["scene_id"]), np.asarray(result["im_id"])
    converged = np.asarray(result.get("converged", np.ones(len(scene), bool))).astype(bool)
    times: Dict[tuple, float] = {}
    for s, i, t in zip(scene, im, result["time"]):
        times[(int(s), int(i))] = times.get((int(s), int(i)), 0.0) + float(t)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("scene_id,im_id,obj_id,score,R,t,time\n")
        for j in range(len(scene)):
            if int(result["has_box"][j]) == 0 or (unconverged == "omit" and not converged[j]):
                continue
            R = np.asarray(result["R"][j], np.float64).reshape(-1)
            t = np.asarray(result["t"][j], np.float64).reshape(-1)
            if not (np.all(np.isfinite(R)) and np.all(np.isfinite(t))) or not t[2] > 0:
                continue
            score = float(result["score"][j]) if converged[j] else 0.0
            f.write(f"{int(scene[j])},{int(im[j])},{int(result['obj_id'][j])},"
                    f"{score:.6f},{' '.join(f'{x:.8f}' for x in R)},"
                    f"{' '.join(f'{x:.4f}' for x in t)},{times[(int(scene[j]), int(im[j]))]:.4f}\n")
    return os.fspath(path)
