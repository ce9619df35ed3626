"""Training infrastructure: optimiser and schedule, train state, (p)mapped steps, Orbax, progress.

Model-agnostic; the networks (``lcpose.models``), the losses (``lcpose.losses``) and the input
pipeline (``lcpose.data``) plug in through ``model_apply``, ``loss_fn`` and the batch dict.
"""
from lcpose.train.optim import (
    LookaheadSlowState,
    RunningNormClipState,
    adaptive_grad_clip,
    centralize_gradients,
    clip_by_running_norm,
    flat_cosine_schedule,
    init_running_norm_clip,
    lookahead,
    lookahead_slow_params,
    ranger,
    scale_by_ranger_radam,
)
from lcpose.train.state import TrainState, create_train_state, eval_params
from lcpose.train.step import (
    AXIS_NAME,
    flax_model_apply,
    make_eval_step,
    make_train_step,
    replicate,
    shard_batch,
    step_rng,
    unreplicate,
)
from lcpose.train.checkpoint import Checkpointer, Restored
from lcpose.train.progress import ProgressLogger, plot_curves, read_metrics

__all__ = [
    "AXIS_NAME", "Checkpointer", "LookaheadSlowState", "ProgressLogger", "Restored",
    "RunningNormClipState", "TrainState", "adaptive_grad_clip", "centralize_gradients",
    "clip_by_running_norm", "create_train_state", "eval_params", "flat_cosine_schedule",
    "flax_model_apply", "init_running_norm_clip", "lookahead", "lookahead_slow_params",
    "make_eval_step", "make_train_step", "plot_curves", "ranger", "read_metrics", "replicate",
    "scale_by_ranger_radam", "shard_batch", "step_rng", "unreplicate",
]
