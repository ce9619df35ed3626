"""The pose losses by name, behind one signature: ``fn(inputs: PoseLossInputs, **kwargs)``.

    from lcpose.losses import PoseLossInputs, get_pose_loss
    loss = get_pose_loss("lc")
    value, metrics = loss.fn(PoseLossInputs(corr, K_out, R, t, bbox3d, key), use_prior=False)
    loss.uses_scale({"use_prior": False})     # False: drop the network's weight-scale branch

One instance per call (vmap a batch: every field of ``PoseLossInputs`` gets a leading axis).
The training objective (``lcpose.train.objective``), the analyses (``lcpose.analysis``) and the
loss benchmark (``bench.losses``) look losses up here, so a new loss is one new file with
``@register_pose_loss("name")`` plus one import line in ``lcpose/losses/__init__.py``.

The entries here wrap the loss functions of ``lc.py``, ``bpnp.py`` and ``epropnp.py`` without
changing them; ``"none"`` is the baseline (no pose loss: it returns 0 and the objective trains
the weights by the head's warm-up loss alone, see ``PoseLoss.active``).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, NamedTuple, Tuple, Union

import jax
import jax.numpy as jnp

from lcpose.correspondences import Correspondences

__all__ = ["PoseLossInputs", "PoseLoss", "POSE_LOSSES", "register_pose_loss", "get_pose_loss"]


class PoseLossInputs(NamedTuple):
    """What a pose loss sees of ONE instance."""

    corr: Correspondences   # the head's correspondences (x2d in output-grid pixels)
    K: jax.Array            # (3, 3) intrinsics matching corr.x2d (K_out)
    R: jax.Array            # (3, 3) ground-truth rotation
    t: jax.Array            # (3,) ground-truth translation, mm
    bbox3d: jax.Array       # (8, 3) model box corners, mm
    key: jax.Array          # PRNG key (always passed; deterministic losses ignore it)


PoseLossFn = Callable[..., Tuple[jax.Array, Dict[str, jax.Array]]]


class PoseLoss(NamedTuple):
    """A registered pose loss.

    name; fn(inputs, **kwargs) -> (loss scalar, metrics dict of scalars); scale: bool or
    callable(kwargs) -> bool, see ``uses_scale``; active: False only for "none" (the objective
    then skips decoding and keeps the blend at 0).
    """

    name: str
    fn: PoseLossFn
    scale: Union[bool, Callable[[Mapping[str, Any]], bool]] = True
    active: bool = True

    def uses_scale(self, kwargs: Mapping[str, Any] = ()) -> bool:
        """Whether the loss constrains the global scale of the weights for these kwargs (a
        network should then predict it: GDR-Net's scale branch)."""
        return bool(self.scale(dict(kwargs)) if callable(self.scale) else self.scale)


POSE_LOSSES: Dict[str, PoseLoss] = {}


def register_pose_loss(name: str, *, uses_scale: Union[bool, Callable[[dict], bool]] = True,
                       active: bool = True):
    """Decorator: register ``fn(inputs: PoseLossInputs, **kwargs) -> (loss, metrics)`` as ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")

    def deco(fn: PoseLossFn) -> PoseLossFn:
        if name in POSE_LOSSES and POSE_LOSSES[name].fn is not fn:
            raise ValueError(f"pose loss {name!r} is already registered ({POSE_LOSSES[name].fn!r})")
        POSE_LOSSES[name] = PoseLoss(name, fn, uses_scale, active)
        return fn

    return deco


def get_pose_loss(name: str) -> PoseLoss:
    """The registered pose loss ``name``; ValueError listing the registered names otherwise."""
    try:
        return POSE_LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown pose loss {name!r}; registered: {', '.join(sorted(POSE_LOSSES))}") from None


# ----------------------------------------------------------------------------------------------
# The library's losses (the functions themselves stay in lc.py / bpnp.py / epropnp.py)
# ----------------------------------------------------------------------------------------------


@register_pose_loss("lc", uses_scale=lambda kw: bool(kw.get("use_prior", True)))
def _lc(inputs: PoseLossInputs, **kwargs):
    """LC loss; without E_prior it cannot constrain the weight scale."""
    from lcpose.losses.lc import lc_loss

    c = inputs.corr
    terms = lc_loss(c.x2d, c.x3d, c.w2d, inputs.K, inputs.R, inputs.t, inputs.bbox3d, c.valid, **kwargs)
    return terms.loss, {"lc/e_cov": terms.e_cov, "lc/e_prior": terms.e_prior,
                        "lc/e_linear": terms.e_linear}


@register_pose_loss("bpnp", uses_scale=False)
def _bpnp(inputs: PoseLossInputs, **kwargs):
    """BPnP; the PnP solution does not change when all weights are scaled."""
    from lcpose.losses.bpnp import bpnp_loss

    c = inputs.corr
    return bpnp_loss(c.x2d, c.x3d, c.w2d, inputs.K, inputs.R, inputs.t, inputs.bbox3d, c.valid,
                     **kwargs).loss, {}


@register_pose_loss("epropnp", uses_scale=True)
def _epropnp(inputs: PoseLossInputs, **kwargs):
    """EPro-PnP's KL loss (Monte Carlo: uses the key)."""
    from lcpose.losses.epropnp import epropnp_loss

    c = inputs.corr
    return epropnp_loss(inputs.key, c.x2d, c.x3d, c.w2d, inputs.K, inputs.R, inputs.t, c.valid,
                        **kwargs).loss, {}


@register_pose_loss("none", uses_scale=False, active=False)
def _none(inputs: PoseLossInputs, **kwargs):
    """The baseline: no pose loss (0, and no gradient)."""
    if kwargs:
        raise ValueError(f"pose loss 'none' takes no kwargs, got {sorted(kwargs)}")
    return jnp.zeros((), inputs.corr.x3d.dtype), {}
