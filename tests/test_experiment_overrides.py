"""`--set path=value` reaches any configuration field; objects have one home."""
import json

import pytest

from experiments.config import CONFIGS
from experiments.lmo_gdr import UsageError, _config, parse_args
from experiments.overrides import apply_overrides, config_to_json, parse_value


def test_overrides_reach_nested_fields_with_typed_values():
    cfg = apply_overrides(CONFIGS["cpu"], [
        "train.total_steps=100", "train.learning_rate=3e-4", "pnp.threshold_px=1.0",
        "pnp.use_mask=False", "pnp.solver=ransac", "variants=baseline,lc_c4", "objects=1,5",
        "epochs=None", "train.model_overrides=(('head_channels', 16),)"])
    assert cfg.train.total_steps == 100 and cfg.train.learning_rate == 3e-4
    assert cfg.pnp.threshold_px == 1.0 and cfg.pnp.use_mask is False and cfg.pnp.solver == "ransac"
    assert cfg.variants == ("baseline", "lc_c4") and cfg.objects == (1, 5) and cfg.epochs is None
    assert cfg.train.model_overrides == (("head_channels", 16),)
    assert CONFIGS["cpu"].train.total_steps == 3600                    # frozen: a new config
    assert parse_value("5", is_tuple=True) == (5,) and parse_value("a,b", is_tuple=True) == ("a", "b")
    assert parse_value("gt") == "gt" and parse_value("(1, [2, 3])") == (1, (2, 3))
    # JSON round trip of the printed configuration
    d = json.loads(json.dumps(config_to_json(cfg)))
    assert d["train"]["total_steps"] == 100 and d["pnp"]["solver"] == "ransac" and d["objects"] == [1, 5]


def test_override_errors_name_the_field():
    with pytest.raises(ValueError, match="TrainConfig has no field 'steps'.*total_steps"):
        apply_overrides(CONFIGS["cpu"], ["train.steps=5"])
    with pytest.raises(ValueError, match="threshold_px"):
        apply_overrides(CONFIGS["cpu"], ["pnp.threshold_px=-1"])      # the dataclass's own check
    with pytest.raises(ValueError, match="path=value"):
        apply_overrides(CONFIGS["cpu"], ["train.total_steps"])
    with pytest.raises(ValueError, match="solver"):
        apply_overrides(CONFIGS["cpu"], ["pnp.solver=magic"])
    with pytest.raises(ValueError, match="loss_weights: unknown weight 'pose_weight'.*mask_weight"):
        apply_overrides(CONFIGS["cpu"], ["loss_weights=(('pose_weight', 1.0),)"])
    with pytest.raises(ValueError, match="loss_weights: entries are \\(name, weight\\) pairs"):
        apply_overrides(CONFIGS["cpu"], ["loss_weights=(('mask_weight', 'heavy'),)"])


def test_loss_weights_replace_the_variants_weights():
    from experiments.config import objective_for

    cfg = apply_overrides(CONFIGS["cpu"], ["loss_weights=(('mask_weight', 0.5),)"])
    base, lc = (objective_for(cfg, v, 100) for v in ("baseline", "lc"))
    assert base.mask_weight == lc.mask_weight == 0.5
    assert base.xyz_weight == objective_for(CONFIGS["cpu"], "baseline", 100).xyz_weight


def test_flags_then_set_and_objects_in_one_place():
    cfg = _config(parse_args(["--obj", "1,5", "--steps", "30", "--set", "train.total_steps=40",
                              "--set", "boxes=gt"]))
    assert cfg.objects == (1, 5) and cfg.train.obj_ids is None           # --obj sets objects only
    assert cfg.train.total_steps == 40 and cfg.boxes == "gt"              # --set comes last
    with pytest.raises(UsageError, match="--variants: unknown"):
        _config(parse_args(["--set", "variants=lc,nope"]))
    # a train.obj_ids given alone moves to objects; two different lists are refused
    moved = CONFIGS["paper"].with_train(obj_ids=(8,))
    assert moved.objects == (8,)
    with pytest.raises(ValueError, match="set objects only"):
        CONFIGS["cpu"].with_train(obj_ids=(1,))
