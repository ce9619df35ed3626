"""ZebraPose-style network with coordinate-wise binary codes (the LC paper's Sec. 4.2, Fig. 4, Table 7).

Model "zebra" of :mod:`lcpose.models.registry`: the shared dense trunk (ResNet encoder + the
CDPN/GDR-Net decoder of :mod:`lcpose.models.gdrnet`) with one more decoder stage, so the maps
are 1/2 of the input crop as in the official setting (256 -> 128; ZebraPose itself uses a
DeepLabV3 ResNet-34 with skip connections, here the project's one decoder is reused). Per
pixel the head predicts

    mask_logits   (1)             visible-mask logit (L1 mask loss on its sigmoid, as ZebraPose)
    weight_logits (2)             -> w2d: one spatial softmax taken jointly over both channels
                                  x exp(log_scale) (the scale branch), exactly as GDRNet
    code_logits   (sum_c M_c)     the Gray-coded bits of x, y, z (lcpose.binary_codes), MSB first

Outputs of ``ZebraNet(images, train)`` (B = batch, h = w = map side):

    code_logits (B, h, w, 3, max_bits)  bit logits in the padded layout of lcpose.binary_codes
                                        (axis c uses bits 0 .. code_bits[c] - 1; padding = 0)
    xyz         (B, h, w, 3)            test-time decoded normalised coordinates
                                        (binary_codes.decode_without_gt with ``code_bits``)
    w2d, weight_logits (B, h, w, 2), mask_logits (B, h, w, 1), log_scale (B, 2)

``code_bits`` is static: the per-object bit counts M_c = round(7 + log2(s_c / s_max)) of the
object a network is trained for (``binary_codes.bit_counts`` of its box extents), or
(7, 7, 7) for a class-agnostic network whose examples then use the first M_c bits of each
axis. The head's functions below take the bit counts of every example from its ``bbox3d``
(the same formula), so they agree with ``code_bits`` for a per-object network.

Bit targets are computed on the fly from the example's rendered xyz map (mm) inside the
objective (``binary_codes.encode_xyz``): the data path stays the one of GDR-Net (no new
loader key, no stored 21-channel code maps), the codes see exactly the crop, resampling and
augmentation of the xyz target (nearest-neighbour resampling keeps them exact), and encoding
costs a few integer operations per pixel, nothing next to the network.

Head contract (one instance each; :mod:`lcpose.models.registry`):

* ``surrogate_loss``: ZebraPose's base loss ``mask_weight L_mask + xyz_weight L_hier`` of the
  ObjectiveConfig (the paper: 1 and 3; ``xyz_weight`` weighs the coordinate loss of whichever
  head, here the hierarchical bit loss). L_hier is taken over the ground-truth visible mask
  (ZebraPose uses its thresholded predicted mask and a rendered all-zero code outside the
  object; the xyz target here is only defined on the object). Per-bit weights
  exp(3 min(h_b, 0.51 - h_b)) from the bit-error rates h_b of the same instance (ZebraPose
  keeps a 0.95/0.05 moving average of the batch histogram; the project's losses carry no
  state between steps, so the weights are recomputed each step, per instance).
* ``decode_train``: coordinates decoded WITH ground truth (``decode_with_gt``: the most
  significant wrong bit unrounded, the other wrong bits corrected, else the LSB unrounded;
  pixels outside the visible mask, without ground truth, as at test time), converted to mm,
  sampled on the grid with the weights as GDR-Net does
  (:func:`lcpose.models.gdrnet.train_correspondences`).
* ``decode_test``: coordinates decoded without ground truth; with ``PnPConfig.use_mask`` the
  points are the predicted-mask pixels whose weight is at least the (1 - fraction) quantile
  of the weights in the mask (the official ZebraPose-LC test: quantile 0.2 in the predicted
  mask, i.e. ``fraction=0.8``); without it GDR-Net's top-``fraction`` selection.
* ``pose_warmup_loss``: GDR-Net's BCE of the weight logits against the visible mask.
"""
from __future__ import annotations

from typing import Any, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcpose import binary_codes as bc
from lcpose.correspondences import Correspondences, select_top_weights
from lcpose.geometry import box_extent_center, mm_to_xyz, xyz_to_mm
from lcpose.models.gdrnet import (
    GDRNet,
    check_images,
    dense_trunk,
    pose_warmup_loss as _gdr_pose_warmup_loss,
    spatial_softmax_weights,
    train_correspondences,
    weight_log_scale,
)
from lcpose.models.resnet import output_stride

__all__ = [
    "ZebraNet", "PRESETS", "EXAMPLE_KEYS", "build", "map_size", "decode_train", "decode_test",
    "surrogate_loss", "pose_warmup_loss", "example_codes", "select_in_mask_quantile",
    "object_overrides", "predicted_xyz_mm",
]

# Batch keys the head reads in training (besides lcpose.models.registry.BASE_EXAMPLE_KEYS).
EXAMPLE_KEYS = ("xyz", "mask_visib")

# Output channels of the decoder's last 1x1 conv: mask, two weights, then the bits.
_MASK = slice(0, 1)
_WEIGHTS = slice(1, 3)
_BITS0 = 3


class ZebraNet(GDRNet):
    """ResNet encoder + GDR-Net decoder (``head_stages`` 4: maps at 1/2 of the input) with mask,
    weight and coordinate-wise bit outputs; see the module docstring. The attributes of
    :class:`lcpose.models.gdrnet.GDRNet` (its network), plus ``code_bits`` (M_x, M_y, M_z) and
    ``max_bits`` (the padded layout's bits per axis, the paper's n = 7)."""

    head_stages: int = 4
    code_bits: Tuple[int, int, int] = (bc.N_BITS,) * 3
    max_bits: int = bc.N_BITS

    @nn.compact
    def __call__(self, images, train: bool = False):
        images = check_images(images)
        bits = _check_code_bits(self.code_bits, self.max_bits)
        out, feats, head_feats = dense_trunk(self, images, train, _BITS0 + sum(bits))
        log_scale = weight_log_scale(self, feats, head_feats, out)
        weight_logits = out[..., _WEIGHTS]
        # the padded (3, max_bits) layout: axis c's M_c channels, then zeros
        axes, start = [], _BITS0
        for m in bits:
            seg = out[..., start:start + m]
            axes.append(jnp.pad(seg, [(0, 0)] * 3 + [(0, self.max_bits - m)]))
            start += m
        code_logits = jnp.stack(axes, axis=-2)
        return {
            "code_logits": code_logits,
            "xyz": bc.decode_without_gt(code_logits, jnp.asarray(bits)),
            "w2d": spatial_softmax_weights(weight_logits, log_scale),
            "weight_logits": weight_logits,
            "mask_logits": out[..., _MASK],
            "log_scale": log_scale,
        }


def _check_code_bits(code_bits, max_bits) -> Tuple[int, int, int]:
    try:
        bits = tuple(int(b) for b in code_bits)
    except (TypeError, ValueError):
        raise ValueError(f"code_bits must be three ints (M_x, M_y, M_z), got {code_bits!r}") from None
    if len(bits) != 3 or any(b != c for b, c in zip(bits, code_bits)) or not all(1 <= b <= max_bits for b in bits):
        raise ValueError(f"code_bits must be three ints in [1, max_bits={max_bits}], got {code_bits!r}")
    return bits


# ----------------------------------------------------------------------------------------------
# Configurations (the model registry's build)
# ----------------------------------------------------------------------------------------------

PRESETS: Mapping[str, Mapping[str, Any]] = {
    # the official setting: ResNet-34, 256x256 crops -> 128x128 maps
    "paper": dict(depth=34, head_stages=4),
    # CPU-sized: ResNet-18 at a quarter of the channels (GDRNet's "cpu" preset), maps at 1/2
    # (experiments.config's zebra_cpu overrides it to GDR-Net's 32-channel, 1/4 decoder)
    "cpu": dict(depth=18, encoder_widths=(16, 32, 64, 128), head_channels=64, head_stages=4),
}


def build(*, preset: str = "cpu", **overrides) -> ZebraNet:
    """The model registry's constructor: ``ZebraNet(**PRESETS[preset], **overrides)``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    kw = {**PRESETS[preset], **overrides}
    if "code_bits" in kw:
        kw["code_bits"] = _check_code_bits(kw["code_bits"], kw.get("max_bits", bc.N_BITS))
    return ZebraNet(**kw)


def object_overrides(bbox3d) -> dict:
    """Attributes of a network for ONE object with model box ``bbox3d`` (8, 3):
    ``{"code_bits": (M_x, M_y, M_z)}`` (``binary_codes.bit_counts`` of its extents)."""
    import numpy as np

    box = np.asarray(bbox3d, np.float64)
    if box.shape != (8, 3):
        raise ValueError(f"bbox3d must have shape (8, 3), got {box.shape}")
    extent = box.max(axis=0) - box.min(axis=0)
    return {"code_bits": tuple(int(b) for b in np.asarray(bc.bit_counts(extent, bc.N_BITS)))}


def map_size(model: ZebraNet, input_size: int) -> int:
    """Side of the output maps for square crops of ``input_size`` (256 -> 128 with 4 stages)."""
    return int(input_size) // output_stride() * 2 ** model.head_stages


# ----------------------------------------------------------------------------------------------
# The head's contract (one instance; vmapped by the objective and the evaluation)
# ----------------------------------------------------------------------------------------------


def example_codes(outputs, example):
    """(bits (3,), gt_code (h, w, 3, max_bits), visible mask (h, w), extent, center) of one
    example: the bit counts from its ``bbox3d``, the codes of its rendered ``xyz`` (mm)."""
    logits = outputs["code_logits"]
    dtype = logits.dtype
    extent, center = box_extent_center(jnp.asarray(example["bbox3d"], dtype))
    bits = bc.bit_counts(extent, bc.N_BITS)
    gt = bc.encode_xyz(jnp.asarray(example["xyz"], dtype), bits, extent=extent, center=center,
                       max_bits=logits.shape[-1])
    mask = jnp.asarray(example["mask_visib"], dtype)
    return bits, gt, mask, extent, center


def surrogate_loss(outputs, example, cfg):
    """``cfg.mask_weight L_mask + cfg.xyz_weight L_hier`` of one example (ZebraPose: 1 and 3).

    Metrics: ``loss/mask`` (L1 of the mask probabilities), ``loss/code`` (L_hier),
    ``code/bit_error`` (share of wrong bits inside the visible mask), ``loss/xyz`` (a
    diagnostic, not optimised: the mean |xyz* - xyz_gt| over the visible pixels and axes of
    the test-decoded normalised coordinates, comparable with GDR-Net's ``xyz_norm="mask"``),
    ``loss/weight_bce`` and ``log_scale``.
    """
    bits, gt, mask, extent, center = example_codes(outputs, example)
    l_code, code_metrics = bc.hierarchical_bit_loss(outputs["code_logits"], gt, bits, mask)
    l_mask = bc.l1_mask_loss(outputs["mask_logits"][..., 0], mask)
    target = mm_to_xyz(jnp.asarray(example["xyz"], mask.dtype), extent, center)
    xyz_err = jax.lax.stop_gradient(jnp.abs(outputs["xyz"] - target) * mask[..., None])
    loss = cfg.mask_weight * l_mask + cfg.xyz_weight * l_code
    return loss, {"loss/mask": l_mask, "loss/code": l_code, **code_metrics,
                  "loss/xyz": jnp.sum(xyz_err) / jnp.maximum(3.0 * jnp.sum(mask), 1.0),
                  "loss/weight_bce": pose_warmup_loss(outputs, example, cfg),
                  "log_scale": jnp.mean(outputs["log_scale"])}


def pose_warmup_loss(outputs, example, cfg):
    """GDR-Net's warm-up term (BCE of the weight logits against the visible mask)."""
    return _gdr_pose_warmup_loss(outputs, example, cfg)


def decode_train(key, outputs, example, cfg):
    """(Correspondences, aux) for the pose loss: the GT-decoded coordinates (module docstring)
    on the grid of ``cfg.stride`` with the weights from the logits; ``cfg``: an ObjectiveConfig
    (stride, pose_points). aux: ``{"xyz": the decoded map (h, w, 3), normalised}``."""
    bits, gt, mask, _, _ = example_codes(outputs, example)
    xyz, _ = bc.decode_with_gt(outputs["code_logits"], gt, bits, has_gt=mask > 0)
    point_mask = mask if cfg.pose_points == "mask" else None
    corr = train_correspondences(key, xyz, outputs["weight_logits"], outputs["log_scale"],
                                 jnp.asarray(example["bbox3d"], xyz.dtype), cfg.stride, point_mask)
    return corr, {"xyz": xyz}


def predicted_xyz_mm(outputs, example):
    """The coordinate map (h, w, 3) in mm decoded from the bit logits without ground truth (what
    the symmetry-aware ground truth and the coordinate error compare)."""
    logits = outputs["code_logits"]
    extent, center = box_extent_center(jnp.asarray(example["bbox3d"], logits.dtype))
    return xyz_to_mm(bc.decode_without_gt(logits, bc.bit_counts(extent, bc.N_BITS)), extent, center)


def decode_test(outputs, example, cfg):
    """Test points (a PnPConfig ``cfg``): coordinates decoded without ground truth, in mm by
    ``bbox3d``; with ``cfg.use_mask`` :func:`select_in_mask_quantile` keeping ``cfg.fraction`` of
    the predicted-mask pixels (0.8 = the official quantile 0.2), else the top ``cfg.fraction``
    of all pixels by weight."""
    xyz_mm = predicted_xyz_mm(outputs, example)
    mask = jax.nn.sigmoid(outputs["mask_logits"][..., 0]) if cfg.use_mask else None
    return select_top_weights(xyz_mm, outputs["w2d"], mask, cfg.fraction)


def select_in_mask_quantile(xyz_map, w2d_map, mask, keep: float = 0.8) -> Correspondences:
    """ZebraPose's test selection: the top ``keep`` share by weight of the pixels in ``mask``
    (probability > 0.5), i.e. those at or above its (1 - keep) quantile -- the one selection of
    :func:`lcpose.correspondences.select_top_weights` with a mask (N = ceil(keep H W) static,
    sorted by weight; invalid points carry zeros; an empty mask gives no valid point, and the
    solver flags it)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    xyz_map = jnp.asarray(xyz_map)
    if mask.shape != xyz_map.shape[:2]:
        raise ValueError(f"mask must have shape {xyz_map.shape[:2]}, got {mask.shape}")
    return select_top_weights(xyz_map, w2d_map, mask, keep)
