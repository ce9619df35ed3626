"""GDR-Net with and without the LC loss on YCB-V: the paper's Table 2 recipe.

    python -m experiments.ycbv_gdr --bop_root /data/bop/ycbv \
        --detections /data/dets/ycbv_fcos_keyframe_bop.json --test_list /data/ycbv/keyframe.txt \
        --obj 13                                   # one network per object, as the reference

The same entry point as :mod:`experiments.lmo_gdr` with ``--config ycbv`` (experiments/config.py:
20 epochs on train_pbr + train_real, symmetry-aware ground truth for the PoseCNN symmetric
objects, keyframe test images, detections) and ``--workdir runs/ycbv_gdr``; every flag of
lmo_gdr applies (``--config cpu`` on the synthetic set is a CPU smoke run). Besides the
ADD(-S) table it prints the YCB-V table -- per object ADD(-S), AUC of ADD-S and of ADD(-S) up to
10 cm, continuous and 11-point -- which results.json holds too (``auc_add_s``,
``auc_add_or_add_s``, ``auc_add_s_p11``, ``auc_add_or_add_s_p11``). BUILD.md, "YCB-V", gives
the data set-up.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def run(argv: Optional[Sequence[str]] = None) -> dict:
    from experiments import lmo_gdr

    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = []
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        defaults += ["--config", "ycbv"]
    # prog names the experiment in experiment.json (a YCB-V workdir is not an lmo_gdr one)
    return lmo_gdr.run(defaults + argv, prog="python -m experiments.ycbv_gdr",
                       description=__doc__.split("\n")[0], workdir="runs/ycbv_gdr")


def main(argv: Optional[Sequence[str]] = None):
    from experiments import lmo_gdr

    lmo_gdr.main(argv, entry=run)


if __name__ == "__main__":
    main()
