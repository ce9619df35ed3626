"""experiments.lmo_gdr: the cpu-long config's mean and spread over seeds, and the learning-curve steps."""
import os

import numpy as np
import pytest

from experiments import lmo_gdr
from experiments.config import CONFIGS


def _result(add_b, add_l, mspd_b, mspd_l):
    def variant(add, mspd, gc=None):
        return {"add_s_0.1d": {"5": add, "mean": add}, "auc_add_or_add_s": {"5": 50.0, "mean": 50.0},
                "ar_mspd": mspd, "converged": 100.0, "grad_correct": gc, "weight_n_eff": 20.0}
    return {"variants": {"baseline": variant(add_b, mspd_b), "lc": variant(add_l, mspd_l, 99.9)}}


def test_seed_summary_mean_spread_and_gain():
    per_seed = {0: _result(30.0, 36.0, 50.0, 52.0), 1: _result(20.0, 30.0, 40.0, 41.0), 2: _result(25.0, 27.0, 45.0, 45.0)}
    s = lmo_gdr._seed_summary(per_seed)
    assert s["baseline"]["add_s_0.1d"]["mean"] == pytest.approx(25.0)
    assert s["baseline"]["add_s_0.1d"]["std"] == pytest.approx(np.std([30, 20, 25]), abs=0.01)
    assert s["lc"]["gain_add_s_0.1d"]["values"] == [6.0, 10.0, 2.0]
    assert s["lc"]["gain_add_s_0.1d"]["mean"] == pytest.approx(6.0)
    assert s["lc"]["gain_ar_mspd"]["mean"] == pytest.approx(1.0)
    assert s["lc"]["grad_correct"]["mean"] == pytest.approx(99.9)
    assert "grad_correct" not in s["baseline"]          # no PnP loss, no gradient correctness
    assert "3 seeds" in lmo_gdr._format_seed_summary(s, 3)


def test_cpu_long_config_and_curve_steps(tmp_path):
    long, cpu = CONFIGS["cpu-long"], CONFIGS["cpu"]
    assert long.seeds == (0, 1, 2) and long.train.total_steps > cpu.train.total_steps
    assert cpu.curve_points > 0 and CONFIGS["cpu-pretrained"].train.pretrained == "efficientnet_lite0"
    for step in (100, 300, 200):
        os.makedirs(tmp_path / "ckpt" / str(step))
    os.makedirs(tmp_path / "ckpt" / "tmp_save")
    assert lmo_gdr._curve_steps(str(tmp_path), 300) == [100, 200, 300]
    assert lmo_gdr._curve_steps(str(tmp_path / "none"), 40) == [40]
