"""lcpose: end-to-end 6D object pose learning with differentiable PnP and the LC loss."""
__version__ = "0.1.0"
