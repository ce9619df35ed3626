"""BOP data for lcpose: reading, rendering, the synthetic BOP set, TFDS conversion, grain input.

Sub-modules (imported on demand, so that worker processes stay light and free of JAX):

* `lcpose.data.bop`: read BOP datasets (models, splits, scenes, detection files).
* `lcpose.data.render`: NumPy z-buffer rasteriser (depth, xyz, masks, shading).
* `lcpose.data.synthetic`: the synthetic BOP set (`ensure_synthetic_bop`, `ensure_synthetic_tfds`).
* `lcpose.data.tfds_builder`: BOP -> TFDS (array_record) conversion, one example per instance.
* `lcpose.data.pipeline`: grain loaders (`make_loader`) with dynamic zoom-in and augmentation.
* `lcpose.data.augment`: colour augmentation and backgrounds.
"""
