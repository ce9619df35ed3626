"""Coordinate-wise binary codes of object coordinates (the LC paper's ZebraPose variant, Sec. 4.2, Fig. 4).

ZebraPose predicts, per pixel, a hierarchical binary code of the surface vertex and looks the
code up in a vertex table, which is not differentiable. The LC paper instead codes each
coordinate separately: coordinate c in {x, y, z} of a point in the model's box
[c_min, c_max] is mapped linearly to [0, 2^M_c - 1]; the bits of round(c_n), most significant
first, are its code. Bit counts follow the object's sizes s_c (the box extents),

    M_c = round(n + log2(s_c / s_max)),   n = 7 (``N_BITS``),

so every bit has about the same length in millimetres on every axis (100, 50, 12.5 mm -> 7, 6,
4 bits). Objects are NOT rotated to minimise their span: the axes are the model box's (BOP
models_info size_x/y/z, the box the rest of lcpose uses), which is the simplest choice and
matches the models of LM-O, whose axes already follow the objects' shapes closely.

Gray code (``gray=True``, the default): the bits are those of the reflected Gray code of
round(c_n), g = c_n XOR (c_n >> 1), as in the LC paper's official implementation (the paper's
text says "the bits of round(c_n)"; ``gray=False`` gives that plain binary code). Both codes
have the same MSB, but Gray bit k changes half as often along a coordinate as binary bit k
(every 2^(M-k) levels, not every 2^(M-1-k)), and neighbouring levels differ in exactly one bit,
so each bit is a coarser, easier map for a network and a pixel on a level boundary is one bit
off, not several. Decoding converts the Gray logits to binary ones (:func:`decode_with_gt`) and
then follows the paper's rule unchanged. On the synthetic set this is what lets a CPU run learn
the codes at all (BUILD.md, "ZebraPose with coordinate-wise codes").

Layout and static shapes: codes are arrays (..., 3, max_bits) (axis -2: x, y, z; axis -1:
bit k, MSB first). Coordinate c uses bits 0 .. M_c - 1; the others are padding, zero in
codes and excluded by :func:`bit_mask`. ``max_bits`` is static (default ``N_BITS``), the
per-object counts ``bits`` (3,) int may be traced, so one compiled function serves every
object of a class-agnostic network.

Units: the functions work on *normalised* coordinates, xyz in [-0.5, 0.5]^3 with
``x_mm = center + extent * xyz`` (``lcpose.models.xyz_to_mm``; c_min = center - extent / 2,
c_max = center + extent / 2); :func:`encode_xyz` also takes millimetres with ``extent`` and
``center``.

Decoding (the LC paper's supplement):

* :func:`decode_with_gt` (training): per coordinate find the most significant bit whose
  rounded prediction differs from the ground truth, keep its predicted probability unrounded,
  set every other bit to the ground truth (i.e. correct the other wrong bits; right bits are
  the ground truth already), then take the weighted sum sum_k b_k 2^(M-1-k). If all bits are
  right, or the pixel has no ground truth, the least significant bit stays unrounded and the
  others are the rounded predictions. The decoded coordinate is differentiable w.r.t. the
  logit of exactly that one bit.
* :func:`decode_without_gt` (test): rounded predictions, the LSB unrounded.

The hierarchical bit loss of ZebraPose (:func:`hierarchical_bit_loss`) and the per-bit weights
from the bit-error histogram (:func:`hierarchical_bit_weights`) are here too, as is the L1
mask loss (:func:`l1_mask_loss`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "N_BITS",
    "bit_counts",
    "bit_mask",
    "encode_xyz",
    "code_value_to_xyz",
    "decode_with_gt",
    "decode_without_gt",
    "gray_to_binary",
    "bit_error_histogram",
    "hierarchical_bit_weights",
    "hierarchical_bit_loss",
    "l1_mask_loss",
]

N_BITS = 7   # the paper's n: bits of the largest extent


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def bit_counts(extent, n_bits: int = N_BITS):
    """M_c = round(n + log2(s_c / s_max)), clipped to [1, n]: int32 (3,) (or (..., 3)).

    ``extent`` (..., 3): the model box's sizes s_x, s_y, s_z (any unit). A concrete extent
    with a non-positive or non-finite entry raises ValueError naming ``extent``; under ``jit``
    (traced extent) such an entry gets 1 bit (the numeric core never raises).
    """
    if not isinstance(n_bits, (int, np.integer)) or n_bits < 1:
        raise ValueError(f"n_bits must be a positive int, got {n_bits!r}")
    if _is_concrete(extent):
        e = np.asarray(extent, dtype=np.float64)
        if e.ndim < 1 or e.shape[-1] != 3:
            raise ValueError(f"extent must have shape (..., 3) (sizes of the model box), got {e.shape}")
        if not np.all(np.isfinite(e) & (e > 0)):
            raise ValueError(f"extent must be finite and positive on every axis (a model box "
                             f"with zero extent cannot be coded), got {e.tolist()}")
    extent = jnp.asarray(extent)
    if not jnp.issubdtype(extent.dtype, jnp.floating):
        extent = extent.astype(jnp.float32)
    ok = jnp.isfinite(extent) & (extent > 0)
    safe = jnp.where(ok, extent, 1.0)
    ratio = safe / jnp.max(safe, axis=-1, keepdims=True)
    m = jnp.round(n_bits + jnp.log2(ratio))
    return jnp.where(ok, jnp.clip(m, 1, n_bits), 1).astype(jnp.int32)


def bit_mask(bits, max_bits: int = N_BITS):
    """(..., 3, max_bits) bool: True for the bits a coordinate uses (k < M_c)."""
    bits = jnp.asarray(bits)
    return jnp.arange(max_bits) < bits[..., None]


def _levels(bits, dtype):
    """2^M_c - 1 (..., 3): the largest code value of each axis."""
    bits = jnp.asarray(bits, jnp.int32)
    return jnp.exp2(bits.astype(dtype)) - 1


def _place_values(bits, max_bits: int, dtype):
    """2^(M_c - 1 - k) (..., 3, max_bits), 0 on the padding bits."""
    bits = jnp.asarray(bits, jnp.int32)
    shift = bits[..., None] - 1 - jnp.arange(max_bits)
    return jnp.where(shift >= 0, jnp.exp2(jnp.maximum(shift, 0).astype(dtype)), 0.0).astype(dtype)


def _check_bits_layout(bits, max_bits):
    if not isinstance(max_bits, (int, np.integer)) or not 1 <= max_bits <= 24:
        raise ValueError(f"max_bits must be an int in [1, 24] (float32 holds 24-bit integers), got {max_bits!r}")
    bits = jnp.asarray(bits)
    if bits.shape[-1:] != (3,):
        raise ValueError(f"bits must have shape (..., 3) (one count per axis), got {bits.shape}")
    if _is_concrete(bits):
        b = np.asarray(bits)
        if np.any(b < 1) or np.any(b > max_bits):
            raise ValueError(f"bits must lie in [1, max_bits={max_bits}], got {b.tolist()}")
    return bits


def encode_xyz(xyz, bits, *, extent=None, center=None, max_bits: int = N_BITS, gray: bool = True):
    """Codes (..., 3, max_bits) (0/1, dtype of xyz) of object coordinates (..., 3).

    ``xyz``: normalised coordinates (in [-0.5, 0.5] on the model), or millimetres when
    ``extent`` (and ``center``, default 0) of the model box are given. ``bits`` (3,): the bit
    counts M_c (:func:`bit_counts`), broadcast against the leading axes of xyz. Coordinates
    outside the box are clipped onto it. Per axis: c_n = round(u (2^M - 1)), u = xyz + 0.5 in
    [0, 1]; bit k (k < M, MSB first) of c_n -- of its reflected Gray code
    c_n XOR (c_n >> 1) with ``gray`` (the default, module docstring), else of c_n itself;
    padding bits are 0.
    """
    xyz = jnp.asarray(xyz)
    if xyz.shape[-1:] != (3,):
        raise ValueError(f"xyz must have shape (..., 3), got {xyz.shape}")
    bits = _check_bits_layout(bits, max_bits)
    dtype = xyz.dtype if jnp.issubdtype(xyz.dtype, jnp.floating) else jnp.float32
    xyz = xyz.astype(dtype)
    if extent is not None:
        if _is_concrete(extent):
            e = np.asarray(extent, np.float64)
            if not np.all(np.isfinite(e) & (e > 0)):
                raise ValueError(f"extent must be finite and positive on every axis, got {e.tolist()}")
        if center is not None:
            xyz = xyz - jnp.asarray(center, dtype)
        xyz = xyz / jnp.asarray(extent, dtype)
    elif center is not None:
        raise ValueError("center given without extent (center only applies to millimetres)")
    u = jnp.clip(xyz + 0.5, 0.0, 1.0)
    levels = _levels(bits, dtype)
    q = jnp.round(u * levels).astype(jnp.int32)                       # (..., 3)
    if gray:
        q = q ^ jnp.right_shift(q, 1)
    shift = jnp.asarray(bits, jnp.int32)[..., None] - 1 - jnp.arange(max_bits)
    code = jnp.right_shift(q[..., None], jnp.maximum(shift, 0)) & 1
    return jnp.where(shift >= 0, code, 0).astype(dtype)


def code_value_to_xyz(value, bits):
    """Normalised coordinates (..., 3) of code values sum_k b_k 2^(M-1-k) (..., 3): v / (2^M - 1) - 0.5."""
    value = jnp.asarray(value)
    return value / _levels(bits, value.dtype) - 0.5


def _check_logits(logits):
    logits = jnp.asarray(logits)
    if logits.ndim < 2 or logits.shape[-2] != 3:
        raise ValueError(f"logits must have shape (..., 3, max_bits), got {logits.shape}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"logits must be floating, got dtype {logits.dtype}")
    return logits


def decode_without_gt(logits, bits, *, gray: bool = True):
    """Test-time decoding: (..., 3) normalised coordinates from bit logits (..., 3, max_bits).

    Every bit rounded (logit > 0) except the least significant one (bit M_c - 1), which keeps
    its probability: sigmoid(logit) for a plain binary code; for a Gray code (``gray``, the
    default) the rounded Gray bits give the binary ones by prefix XOR and the binary LSB keeps
    sigmoid(+-logit), the sign flipped where the binary bit above it is 1.
    """
    logits = _check_logits(logits)
    max_bits = logits.shape[-1]
    bits = _check_bits_layout(bits, max_bits)
    return _decode(logits, None, bits, None, gray)[0]


def decode_with_gt(logits, gt_code, bits, has_gt=None, *, gray: bool = True):
    """Training decoding with ground truth: (xyz (..., 3), chosen (..., 3, max_bits) bool).

    logits (..., 3, max_bits); gt_code (..., 3, max_bits) 0/1 (:func:`encode_xyz`); bits (3,);
    has_gt (...,) bool/0-1 (None: everywhere): pixels without ground truth are decoded as in
    :func:`decode_without_gt`. Per coordinate the chosen bit is the most significant
    mispredicted one (rounded prediction != ground truth), else the LSB; it keeps its
    probability, all other bits take the ground truth. ``chosen`` marks it (one per coordinate).

    With ``gray`` (the default) logits and gt_code are Gray bits (:func:`encode_xyz`). Binary
    bit k is Gray bit k XOR binary bit k - 1, so with the ground truth's binary bits above it
    the logit of binary bit k is the Gray logit, negated where the ground truth's bit k - 1 is
    1; the rule above then runs on those binary logits. The first wrong binary bit is the first
    wrong Gray bit, and the gradient reaches that Gray bit's logit (with the sign of the flip).
    Pixels without ground truth flip by their own rounded prefix, as at test time.
    """
    logits = _check_logits(logits)
    max_bits = logits.shape[-1]
    bits = _check_bits_layout(bits, max_bits)
    gt_code = jnp.asarray(gt_code, logits.dtype)
    if gt_code.shape != logits.shape:
        raise ValueError(f"gt_code must have the shape of logits {logits.shape}, got {gt_code.shape}")
    if has_gt is None:
        has_gt = jnp.ones(logits.shape[:-2], bool)
    else:
        has_gt = jnp.asarray(has_gt)
        if has_gt.shape != logits.shape[:-2]:
            raise ValueError(f"has_gt must have shape {logits.shape[:-2]}, got {has_gt.shape}")
        has_gt = has_gt > 0 if has_gt.dtype != jnp.bool_ else has_gt
    return _decode(logits, gt_code, bits, has_gt, gray)


def gray_to_binary(code, bits):
    """Binary bits (..., 3, max_bits) of Gray codes (..., 3, max_bits) (0/1, MSB first): the
    prefix XOR b_k = g_0 ^ ... ^ g_k; padding bits stay 0."""
    code = jnp.asarray(code)
    if code.ndim < 2 or code.shape[-2] != 3:
        raise ValueError(f"code must have shape (..., 3, max_bits), got {code.shape}")
    bits = _check_bits_layout(bits, code.shape[-1])
    dtype = code.dtype if jnp.issubdtype(code.dtype, jnp.floating) else jnp.float32
    parity = jnp.cumsum(jnp.asarray(code > 0.5, jnp.int32), axis=-1) & 1
    return jnp.where(bit_mask(bits, code.shape[-1]), parity, 0).astype(dtype)


def _binary_logits(logits, prefix_bits):
    """Logits of binary bits from Gray-bit logits, given the binary bits (..., K) the flips
    follow (b_k = g_k XOR b_(k-1)): the Gray logit of bit k, negated where bit k - 1 is 1."""
    above = jnp.concatenate([jnp.zeros_like(prefix_bits[..., :1]), prefix_bits[..., :-1]], axis=-1)
    return logits * jax.lax.stop_gradient(1.0 - 2.0 * above)


def _decode(logits, gt_code, bits, has_gt, gray):
    dtype = logits.dtype
    max_bits = logits.shape[-1]
    used = bit_mask(bits, max_bits)                                   # (..., 3, K)
    if gray:
        # to binary logits: flip by the ground truth's binary prefix where there is one, else
        # by the rounded prediction's (the test-time decoding)
        prefix = gray_to_binary((logits > 0).astype(dtype), bits)
        if gt_code is not None:
            gt_code = gray_to_binary(gt_code, bits)
            prefix = jnp.where(has_gt[..., None, None], gt_code, prefix)
        logits = _binary_logits(logits, prefix)
    hard = (logits > 0).astype(dtype)
    lsb = jnp.arange(max_bits) == (jnp.asarray(bits, jnp.int32)[..., None] - 1)
    lsb = jnp.broadcast_to(lsb, logits.shape)
    if gt_code is None:
        chosen = lsb
        fixed = hard
    else:
        wrong = (hard != gt_code) & used
        any_wrong = jnp.any(wrong, axis=-1, keepdims=True)
        first = jnp.argmax(wrong, axis=-1)[..., None] == jnp.arange(max_bits)
        chosen_gt = jnp.where(any_wrong, first, lsb)
        g = has_gt[..., None, None]
        chosen = jnp.where(g, chosen_gt, lsb)
        fixed = jnp.where(g, gt_code, hard)
    prob = jax.nn.sigmoid(logits)
    # The unchosen bits are constants; the gradient reaches only the chosen bit's logit.
    b = jnp.where(chosen, prob, jax.lax.stop_gradient(fixed))
    value = jnp.sum(b * _place_values(bits, max_bits, dtype), axis=-1)
    return code_value_to_xyz(value, bits), chosen


def bit_error_histogram(logits, gt_code, bits, mask):
    """Per-bit error rate (3, max_bits): sum over mask pixels of |round(p) - g| / (sum mask + 1).

    logits, gt_code (H, W, 3, max_bits); mask (H, W) 0/1. Padding bits are 0. ZebraPose's
    Hamming "histogram" (its +1 keeps an empty mask finite). Not differentiated.
    """
    logits = jax.lax.stop_gradient(_check_logits(logits))
    dtype = logits.dtype
    m = jax.lax.stop_gradient(jnp.asarray(mask, dtype))
    err = jnp.abs((logits > 0).astype(dtype) - jnp.asarray(gt_code, dtype)) * m[..., None, None]
    lead = tuple(range(err.ndim - 2))
    hist = jnp.sum(err, axis=lead) / (jnp.sum(m) + 1.0)
    return jnp.where(bit_mask(bits, logits.shape[-1]), hist, 0.0)


def hierarchical_bit_weights(histogram):
    """ZebraPose's per-bit loss weights from the bit-error rates h: exp(3 min(h, 0.51 - h)).

    A bit that is learnt (h ~ 0) or still at chance (h ~ 0.5, the fine bits early in training)
    weighs ~1; the bits being learnt (h ~ 0.25) weigh up to e^0.75 ~ 2.1, so the training
    focuses on the level of the hierarchy where the errors now are. Not differentiated.
    """
    h = jax.lax.stop_gradient(jnp.asarray(histogram))
    return jnp.exp(3.0 * jnp.minimum(h, 0.51 - h))


def hierarchical_bit_loss(logits, gt_code, bits, mask, weights=None):
    """ZebraPose's hierarchical binary-code loss of ONE instance: (loss, metrics).

    logits, gt_code (H, W, 3, max_bits); bits (3,); mask (H, W) 0/1 where the code loss
    applies (detached). Per bit b: l_b = mean over all H W pixels of mask x BCE(logit, g)
    (ZebraPose multiplies the logits by its mask and averages BCE over all pixels: the same
    gradient); loss = sum_b w_b l_b / sum_b w_b over the used bits, with ``weights`` (3, max_bits)
    or, if None, :func:`hierarchical_bit_weights` of this instance's
    :func:`bit_error_histogram` (ZebraPose keeps an exponential moving average of the histogram
    over steps, 0.95 / 0.05; lcpose's loss functions carry no state between steps, so the
    weights come from the current instance -- see models/zebra.py).

    Metrics: ``code/bit_error`` (mean error rate over the used bits inside the mask).
    """
    logits = _check_logits(logits)
    if logits.ndim != 4:
        raise ValueError(f"logits must have shape (H, W, 3, max_bits) (one instance), got {logits.shape}")
    dtype = logits.dtype
    max_bits = logits.shape[-1]
    bits = _check_bits_layout(bits, max_bits)
    gt_code = jnp.asarray(gt_code, dtype)
    if gt_code.shape != logits.shape:
        raise ValueError(f"gt_code must have the shape of logits {logits.shape}, got {gt_code.shape}")
    mask = jax.lax.stop_gradient(jnp.asarray(mask, dtype))
    if mask.shape != logits.shape[:2]:
        raise ValueError(f"mask must have shape {logits.shape[:2]}, got {mask.shape}")
    used = bit_mask(bits, max_bits).astype(dtype)
    hist = bit_error_histogram(logits, gt_code, bits, mask)
    w = hierarchical_bit_weights(hist) if weights is None else jax.lax.stop_gradient(jnp.asarray(weights, dtype))
    # BCE with logits, stable: max(z, 0) - z g + log(1 + exp(-|z|))
    bce = jnp.maximum(logits, 0) - logits * gt_code + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    per_bit = jnp.mean(bce * mask[..., None, None], axis=(0, 1))          # (3, K)
    wu = w * used
    loss = jnp.sum(wu * per_bit) / jnp.sum(wu)
    bit_error = jnp.sum(hist * used) / jnp.sum(used)
    return loss, {"code/bit_error": bit_error}


def l1_mask_loss(mask_logits, mask):
    """ZebraPose's mask loss: mean over pixels of |sigmoid(mask_logits) - mask| (H, W)."""
    mask_logits = jnp.asarray(mask_logits)
    mask = jnp.asarray(mask, mask_logits.dtype)
    if mask_logits.shape != mask.shape:
        raise ValueError(f"mask_logits must have the shape of mask {mask.shape}, got {mask_logits.shape}")
    return jnp.mean(jnp.abs(jax.nn.sigmoid(mask_logits) - mask))
