"""ZebraPose with coordinate-wise binary codes, with and without the LC loss (the paper's Table 7).

    python -m experiments.lmo_zebra                     # CPU default: synthetic set, zebra_base + zebra_lc
    python -m experiments.lmo_zebra --config paper --bop_root /data/bop/lmo \\
        --detections /data/dets/lmo_test_bboxes.json    # the official setting (GPUs)

The network is lcpose.models.zebra (mask + Gray-coded coordinate-wise bit logits + weights; maps
at 1/2 of the crop in the paper config, 1/4 in the CPU one), the variants ``zebra_base`` (L1
mask + 3 L_hier) and ``zebra_lc`` (+ 0.03 LC); the configurations are ``zebra_cpu`` /
``zebra_paper`` of experiments.config (``--config cpu`` / ``paper``). Everything else -- flags,
training, evaluation, the files in ``--workdir`` (default ``runs/lmo_zebra``) -- is
experiments.lmo_gdr's.
"""
from __future__ import annotations

from typing import Optional, Sequence


_RUN = dict(config_prefix="zebra_", method="zebrapose", prog="python -m experiments.lmo_zebra",
            description=__doc__.split("\n")[0], workdir="runs/lmo_zebra")


def run(argv: Optional[Sequence[str]] = None) -> dict:
    from experiments import lmo_gdr

    return lmo_gdr.run(argv, **_RUN)


def main(argv: Optional[Sequence[str]] = None):
    from experiments import lmo_gdr

    lmo_gdr.main(argv, **_RUN)


if __name__ == "__main__":
    main()
