"""Symmetry-aware ground truth on and off, on the symmetric objects of the synthetic set.

    python -m experiments.symmetry_compare                 # objects 2 (4-fold) and 3 (continuous)
    python -m experiments.symmetry_compare --steps 2400 --variants baseline,lc

Runs ``experiments.lmo_gdr`` (CPU config unless ``--config``) twice, with ``--sym_aware`` and
``--no-sym_aware``, into ``<workdir>/sym_on`` and ``<workdir>/sym_off``, and prints per object
and variant: ADD-S 0.1d, AUC of ADD-S to 10 cm (continuous and 11-point), the mean xyz error on
the visible pixels against the annotation and in the symmetric frame (mm). Every other flag
goes to lmo_gdr. Writes ``<workdir>/comparison.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

ROWS = (("add_s_0.1d", "ADD-S 0.1d [%]"), ("auc_add_s", "AUC ADD-S [%]"),
        ("auc_add_s_p11", "AUC ADD-S p11 [%]"), ("xyz_err_mm", "xyz err [mm]"),
        ("xyz_err_sym_mm", "xyz err sym [mm]"))


def run(argv: Optional[Sequence[str]] = None) -> dict:
    from experiments import lmo_gdr

    p = argparse.ArgumentParser(prog="python -m experiments.symmetry_compare",
                                description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/symmetry_compare")
    p.add_argument("--obj", default="2,3")
    p.add_argument("--variants", default="baseline")
    args, rest = p.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    results = {}
    for name, flag in (("sym_off", "--no-sym_aware"), ("sym_on", "--sym_aware")):
        results[name] = lmo_gdr.run(["--obj", args.obj, "--variants", args.variants, flag,
                                     "--workdir", os.path.join(args.workdir, name), *rest])
    table = comparison_table(results)
    print(table)
    with open(os.path.join(args.workdir, "comparison.json"), "w") as f:
        json.dump({k: {"variants": r["variants"], "train": r["train"]} for k, r in results.items()}, f, indent=1)
    return results


def comparison_table(results: dict) -> str:
    """Plain-text table: one row per (metric, object), one column per (variant, on/off)."""
    cols = [(v, s) for v in results["sym_off"]["variants"] for s in ("sym_off", "sym_on")]
    objs = [str(o) for o in results["sym_off"]["objects"]]
    header = ["metric", "obj"] + [f"{v} {s}" for v, s in cols]
    rows = []
    for key, label in ROWS:
        for o in objs + ["mean"]:
            vals = [results[s]["variants"][v].get(key, {}).get(o) for v, s in cols]
            rows.append([label, o] + ["-" if x is None else f"{x:.2f}" for x in vals])
    steps = results["sym_off"]["train"]["total_steps"]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines = [f"symmetry-aware ground truth off/on ({steps} steps per object and variant)", fmt(header),
             "-" * (sum(widths) + 2 * len(widths))] + [fmt(r) for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None):
    from experiments import lmo_gdr

    lmo_gdr.main(argv, entry=run)


if __name__ == "__main__":
    main()
