"""lcpose: end-to-end 6D object pose learning with differentiable PnP and the LC loss."""

__version__ = "0.1.0"

# Importing lcpose changes no process-wide state. (It used to enlarge XLA's CPU thread pool via
# PJRT_NPROC: jaxlib's batched LAPACK kernels wait on that pool, and concurrent ones deadlocked
# RANSAC's evaluation on 2 cores. The solvers and losses now use unrolled small-matrix algebra,
# lcpose.smallmat / lcpose.pnp.cost, and call no LAPACK; tests/test_smallmat.py runs the batched
# evaluation path on a 2-thread pool under a timeout.)
