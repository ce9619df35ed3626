"""ProgressLogger: history, metrics.jsonl (also across a resume), PNG curves."""
import json

import numpy as np
import pytest

from lcpose.train import ProgressLogger, plot_curves, read_metrics


def test_logger_writes_history_jsonl_and_png(tmp_path):
    with ProgressLogger(6, tmp_path, disable=True) as log:
        for s in range(1, 7):
            rec = log.log(s, {"loss": np.float32(1.0 / s), "lr": 1e-3, "vec": np.ones(3)},
                          extra_metric=2 * s)
        assert rec == {"step": 6, "loss": pytest.approx(1 / 6), "lr": 1e-3, "extra_metric": 12.0}
        steps, vals = log.series("loss")
        np.testing.assert_array_equal(steps, np.arange(1, 7))
        png = log.plot(smooth=2)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert "vec" not in records[0]                    # non-scalars are not logged
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # resume from a checkpoint at step 4: records 5, 6 (and a torn last line) are dropped
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    with ProgressLogger(6, tmp_path, initial_step=4, disable=True) as log:
        assert [r["step"] for r in log.history] == [1, 2, 3, 4]
        log.log(5, {"loss": 0.5})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]

    out = plot_curves(records, tmp_path / "sub" / "lr.png", keys=["lr"], title="lr")
    assert out.endswith("lr.png")
    with pytest.raises(ValueError, match="no metrics"):
        plot_curves([{"step": 1}], tmp_path / "x.png")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_metrics(bad)
    json.dumps(records)
