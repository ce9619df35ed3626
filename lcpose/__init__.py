"""lcpose: end-to-end 6D object pose learning with differentiable PnP and the LC loss."""
import os as _os

__version__ = "0.1.0"

# jaxlib's CPU LAPACK kernels (svd, eigh, cholesky, triangular solves, ...) split a batch over
# XLA's intra-op thread pool and block until their parts are done. When more of them run at
# once than the pool has threads (XLA runs independent ops concurrently; the pool has one
# thread per core), every pool thread waits and the program hangs: with 2 cores, the three
# batched 3x3 SVDs of EPnP's beta cases inside RANSAC were enough. A pool of at least 8
# threads leaves room for the concurrent calls. XLA reads PJRT_NPROC when JAX creates its CPU
# client, so this only takes effect when lcpose is imported before the first computation; a
# value the user set is kept.
if "PJRT_NPROC" not in _os.environ and "NPROC" not in _os.environ:
    _os.environ["PJRT_NPROC"] = str(max(8, _os.cpu_count() or 1))
