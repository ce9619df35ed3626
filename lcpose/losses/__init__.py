"""Pose losses: the LC loss and the peers it is measured against (BPnP, EPro-PnP).

`lcpose.losses.registry` holds them by name behind one signature (`get_pose_loss`). A new loss:
one file with `@register_pose_loss("name")` and one import line below.
"""
from lcpose.losses.bpnp import BPnPTerms, bpnp_loss
from lcpose.losses.epropnp import EProPnPTerms, epropnp_loss
from lcpose.losses.lc import REPRESENTATIONS, LCTerms, lc_loss, robust_weights
from lcpose.losses.registry import POSE_LOSSES, PoseLoss, PoseLossInputs, get_pose_loss, register_pose_loss

__all__ = [
    "BPnPTerms",
    "EProPnPTerms",
    "LCTerms",
    "POSE_LOSSES",
    "PoseLoss",
    "PoseLossInputs",
    "REPRESENTATIONS",
    "bpnp_loss",
    "epropnp_loss",
    "get_pose_loss",
    "lc_loss",
    "register_pose_loss",
    "robust_weights",
]
