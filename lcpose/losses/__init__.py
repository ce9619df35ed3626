"""Pose losses: the LC loss and the peers it is measured against (BPnP, EPro-PnP)."""
from lcpose.losses.lc import REPRESENTATIONS, LCTerms, lc_loss, robust_weights

__all__ = ["LCTerms", "REPRESENTATIONS", "lc_loss", "robust_weights"]
