"""Convert torchvision ImageNet ResNet-18/34 weights (.pth) into the Flax encoder of lcpose.

    python -m data_prep.convert_resnet --pth resnet34-b627a593.pth --out weights/resnet34 [--depth 34]

The .pth file is read without torch: both torch serialisation formats are parsed here
(the zip format of torch >= 1.6, `archive/data.pkl` + `archive/data/<key>` raw storages, and
the older "legacy" stream of pickles followed by the raw storages). Only tensors are rebuilt;
nothing else in the pickle is trusted: unknown globals raise an error instead of being imported.

Conversion: conv weights OIHW -> HWIO; BatchNorm weight/bias -> params scale/bias,
running_mean/running_var -> batch_stats mean/var; `fc.*` and `num_batches_tracked` are dropped.
Output: DIR/encoder.msgpack + DIR/meta.json, read by `lcpose.models.load_encoder_weights`.
Note: torch keeps the unbiased running variance, Flax's BatchNorm the biased one; converted
statistics are used as they are (the difference is n/(n-1) for the batch that updates them).
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import io
import os
import pickle
import re
import sys
import zipfile
from typing import Dict

import numpy as np

from lcpose.models.pretrained import save_encoder_weights
from lcpose.models.resnet import STAGE_BLOCKS

# torch storage class name -> numpy dtype
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "BFloat16Storage": "bfloat16",
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
    def __init__(self, name):
        if name not in _STORAGE_DTYPES:
            raise ValueError(f"unsupported torch storage type {name}")
        self.name = name
        dt = _STORAGE_DTYPES[name]
        if dt == "bfloat16":
            import ml_dtypes  # shipped with jax

            dt = ml_dtypes.bfloat16
        self.dtype = np.dtype(dt)


class _Storage:
    """A flat numpy buffer standing in for a torch storage."""

    def __init__(self, array: np.ndarray):
        self.array = array


class _TensorRef:
    """A tensor view of a storage, materialised once all storages are read (the legacy format
    stores the raw data after the pickle that references it)."""

    def __init__(self, storage, storage_offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, int(storage_offset), tuple(size), tuple(stride)

    def materialize(self) -> np.ndarray:
        arr = self.storage.array
        if not self.size:
            return np.array(arr[self.offset])
        needed = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1
        if min(self.size) > 0 and needed > arr.size:
            raise ValueError("tensor view exceeds its storage (corrupt file)")
        view = np.lib.stride_tricks.as_strided(
            arr[self.offset:], shape=self.size, strides=tuple(s * arr.itemsize for s in self.stride), writeable=False
        )
        return np.array(view)  # owns its memory, C-contiguous


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor without a storage")
    return _TensorRef(storage, storage_offset, size, stride)


def _materialize(obj):
    if isinstance(obj, _TensorRef):
        return obj.materialize()
    if isinstance(obj, dict):
        return {k: _materialize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v) for v in obj)
    return obj


def _rebuild_parameter(data, *_):
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, load_storage):
        super().__init__(file)
        self._load_storage = load_storage

    def find_class(self, module, name):
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in ("device", "Size"):
            return {"device": str, "Size": tuple}[name]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only tensors are read)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return self._load_storage(pid[1:])


def _check_storage_type(storage_type):
    if not isinstance(storage_type, _StorageType):
        raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
    return storage_type


def _read_zip(path: str):
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise ValueError(f"{path}: expected one */data.pkl in the zip archive, found {len(pkl)}")
        root = pkl[0][: -len("data.pkl")]
        order = "little"
        if root + "byteorder" in names:
            order = zf.read(root + "byteorder").decode().strip()
        cache: Dict[str, _Storage] = {}

        def load_storage(info):
            storage_type, key, _location, numel = info[:4]
            storage_type = _check_storage_type(storage_type)
            if key not in cache:
                raw = zf.read(f"{root}data/{key}")
                dt = storage_type.dtype.newbyteorder("<" if order == "little" else ">")
                arr = np.frombuffer(raw, dtype=dt)
                if arr.size < numel:
                    raise ValueError(f"{path}: storage {key} holds {arr.size} values, expected {numel}")
                cache[key] = _Storage(arr.astype(storage_type.dtype, copy=False))
            return cache[key]

        return _Unpickler(io.BytesIO(zf.read(pkl[0])), load_storage).load()


def _read_legacy(path: str):
    """torch < 1.6 format: magic, protocol, sys_info, the object, storage keys, raw storages."""
    with open(path, "rb") as f:
        try:
            magic = pickle.load(f)
        except Exception as e:
            raise ValueError(f"{path} is neither a torch zip archive nor a legacy torch file ({e})") from None
        if magic != _LEGACY_MAGIC:
            raise ValueError(f"{path} is not a torch file (bad magic number)")
        pickle.load(f)  # protocol version
        sys_info = pickle.load(f)
        little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
        storages: Dict[str, tuple] = {}

        def load_storage(info):
            storage_type, key, _location, numel, view = info[:5]
            storage_type = _check_storage_type(storage_type)
            if view is not None:  # torch.save of a state_dict never writes storage views
                raise ValueError(f"{path}: legacy storage views are not supported")
            if key not in storages:
                storages[key] = (storage_type, _Storage(np.empty(0, storage_type.dtype)))
            return storages[key][1]

        obj = _Unpickler(f, load_storage).load()
        keys = pickle.load(f)
        for key in keys:
            storage_type, storage = storages[key]
            (n,) = np.frombuffer(f.read(8), dtype="<i8" if little else ">i8")
            dt = storage_type.dtype.newbyteorder("<" if little else ">")
            raw = f.read(int(n) * dt.itemsize)
            if len(raw) != int(n) * dt.itemsize:
                raise ValueError(f"{path}: truncated storage {key}")
            storage.array = np.frombuffer(raw, dtype=dt).astype(storage_type.dtype)
    return obj


def read_torch_state_dict(path: str) -> Dict[str, np.ndarray]:
    """Tensors of a torch-saved state dict as numpy arrays, keyed by name (no torch needed).

    Accepts a bare state_dict or a checkpoint dict holding one under 'state_dict' or 'model';
    a 'module.' prefix (DataParallel) is removed.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"torch weights file not found: {path}")
    try:
        obj = _materialize(_read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path))
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"cannot read torch weights from {path}: {e}") from e
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not contain a state dict (got {type(obj).__name__})")
    out = {}
    for k, v in obj.items():
        if isinstance(v, np.ndarray):
            out[k[len("module."):] if k.startswith("module.") else k] = v
    if not out:
        raise ValueError(f"{path} contains no tensors")
    return out


def infer_depth(state_dict: Dict[str, np.ndarray]) -> int:
    """18 or 34 from the number of blocks per stage of a BasicBlock ResNet state dict."""
    if any(re.match(r"layer\d+\.\d+\.conv3\.weight", k) for k in state_dict):
        raise ValueError("Bottleneck ResNets (50/101/152) are not supported: the encoder is ResNet-18/34")
    blocks = []
    for i in range(1, 5):
        ids = {int(m.group(1)) for k in state_dict if (m := re.match(rf"layer{i}\.(\d+)\.", k))}
        blocks.append(len(ids))
    for depth, spec in STAGE_BLOCKS.items():
        if tuple(blocks) == spec:
            return depth
    raise ValueError(f"state dict has {blocks} blocks per stage; not ResNet-18 {STAGE_BLOCKS[18]} or 34 {STAGE_BLOCKS[34]}")


def _conv(w: np.ndarray, name: str) -> np.ndarray:
    if w.ndim != 4:
        raise ValueError(f"{name}: expected a 4-D conv weight (O, I, kh, kw), got shape {w.shape}")
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))  # OIHW -> HWIO


def torchvision_to_flax(state_dict: Dict[str, np.ndarray], depth: int | None = None) -> dict:
    """{'params', 'batch_stats'} of `lcpose.models.ResNet` from a torchvision ResNet state dict."""
    found = infer_depth(state_dict)
    if depth is not None and depth != found:
        raise ValueError(f"--depth {depth} given, but the weights are a ResNet-{found}")
    params: dict = {}
    stats: dict = {}
    used = set()

    def take(key):
        if key not in state_dict:
            raise ValueError(f"state dict lacks {key!r}")
        used.add(key)
        return np.asarray(state_dict[key], dtype=np.float32)

    def conv(tkey, node):
        node["kernel"] = _conv(take(tkey + ".weight"), tkey)

    def bn(tkey, pnode, snode):
        pnode["scale"] = take(tkey + ".weight")
        pnode["bias"] = take(tkey + ".bias")
        snode["mean"] = take(tkey + ".running_mean")
        snode["var"] = take(tkey + ".running_var")

    def sub(tree, name):
        return tree.setdefault(name, {})

    conv("conv1", sub(params, "conv1"))
    bn("bn1", sub(params, "bn1"), sub(stats, "bn1"))
    for i, blocks in enumerate(STAGE_BLOCKS[found], start=1):
        for j in range(blocks):
            t, f = f"layer{i}.{j}", f"layer{i}_{j}"
            p, s = sub(params, f), sub(stats, f)
            for c in ("1", "2"):
                conv(f"{t}.conv{c}", sub(p, f"conv{c}"))
                bn(f"{t}.bn{c}", sub(p, f"bn{c}"), sub(s, f"bn{c}"))
            if f"{t}.downsample.0.weight" in state_dict:
                conv(f"{t}.downsample.0", sub(p, "downsample_conv"))
                bn(f"{t}.downsample.1", sub(p, "downsample_bn"), sub(s, "downsample_bn"))
    ignored = {k for k in state_dict if k.startswith("fc.") or k.endswith("num_batches_tracked")}
    unknown = sorted(set(state_dict) - used - ignored)
    if unknown:
        raise ValueError(f"state dict has tensors the encoder does not use: {unknown[:8]}")
    return {"params": params, "batch_stats": stats}


def convert(pth: str, out_dir: str, depth: int | None = None) -> dict:
    """Read `pth`, convert, write out_dir/encoder.msgpack + meta.json; returns the meta data."""
    sd = read_torch_state_dict(pth)
    tree = torchvision_to_flax(sd, depth)
    with open(pth, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    n = sum(int(np.prod(a.shape)) for a in _leaves(tree["params"]))
    meta = {
        "depth": infer_depth(sd),
        "widths": [int(tree["params"][f"layer{i}_0"]["conv1"]["kernel"].shape[-1]) for i in range(1, 5)],
        "source": os.path.basename(pth),
        "source_sha256": sha,
        "num_params": n,
        "num_tensors_converted": sum(1 for _ in _leaves(tree)),
        "format": "flax.serialization msgpack of {'params', 'batch_stats'} of lcpose.models.ResNet",
    }
    save_encoder_weights(tree, out_dir, meta)
    return meta


def _leaves(tree):
    for v in tree.values():
        if isinstance(v, dict):
            yield from _leaves(v)
        else:
            yield v


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m data_prep.convert_resnet", description=__doc__.split("\n")[0])
    ap.add_argument("--pth", required=True, help="torchvision ResNet-18/34 state dict (.pth)")
    ap.add_argument("--out", required=True, help="output directory (encoder.msgpack, meta.json)")
    ap.add_argument("--depth", type=int, choices=sorted(STAGE_BLOCKS), default=None,
                    help="expected depth (checked against the file; default: inferred)")
    args = ap.parse_args(argv)
    try:
        meta = convert(args.pth, args.out, args.depth)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"converted ResNet-{meta['depth']} ({meta['num_params']:,} params, {meta['num_tensors_converted']} tensors) "
        f"from {args.pth} -> {os.path.join(args.out, 'encoder.msgpack')}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
