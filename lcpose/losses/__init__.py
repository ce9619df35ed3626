"""Pose losses: the LC loss and the peers it is measured against (BPnP, EPro-PnP)."""
from lcpose.losses.bpnp import BPnPTerms, bpnp_loss
from lcpose.losses.epropnp import EProPnPTerms, epropnp_loss
from lcpose.losses.lc import REPRESENTATIONS, LCTerms, lc_loss, robust_weights

__all__ = [
    "BPnPTerms",
    "EProPnPTerms",
    "LCTerms",
    "REPRESENTATIONS",
    "bpnp_loss",
    "epropnp_loss",
    "lc_loss",
    "robust_weights",
]
