"""numba kernels for the sparse dose-influence products of the optimiser.

Both products read one compact CSR copy of the (row-subset) Dij: float32 (or float64 for
gradient checks) values and **uint16 column indices** when there are fewer than 65,536
beamlets (uint32 otherwise). The products are memory-bandwidth bound, so 6 instead of 8
bytes per non-zero — and no second, transposed copy — is what makes them fast:

* ``D · w``  → :func:`_csr_matvec`, row-parallel (each row written by one thread);
* ``Dᵀ · g`` → :func:`_csr_rmatvec`, the same CSR scattered into a fixed number of
  private beamlet-length accumulators (one per row chunk), summed in chunk order. The
  chunking does not depend on the thread count, so results are deterministic.

Sums are accumulated in float64.
"""

from __future__ import annotations

import os

# GNU OpenMP worker threads spin after each parallel region by default; on a shared 2-core
# machine they then steal the CPU from the serial work between products (L-BFGS-B, numpy):
# measured here 7.6 s -> 2.0 s for a segment-weight optimisation. Must be set before
# libgomp is loaded (first numba parallel call in the process) to take effect.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import scipy.sparse as sp
from numba import njit, prange

_N_CHUNKS = 16  # row chunks of the scatter product (fixed: results independent of threads)


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def _csr_matvec(indptr, indices, data, x, out):
    """out = CSR(indptr, indices, data) @ x; rows in contiguous chunks per thread."""
    n = indptr.size - 1
    nchunk = min(n, 256)
    for c in prange(nchunk):
        lo = c * n // nchunk
        hi = (c + 1) * n // nchunk
        for i in range(lo, hi):
            acc = 0.0
            for p in range(indptr[i], indptr[i + 1]):
                acc += data[p] * x[indices[p]]
            out[i] = acc


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def _csr_rmatvec(indptr, indices, data, g, n_cols, nchunk, out):
    """out = CSR(indptr, indices, data)ᵀ @ g via ``nchunk`` private accumulators."""
    n = indptr.size - 1
    acc = np.zeros((nchunk, n_cols))
    for c in prange(nchunk):
        lo = c * n // nchunk
        hi = (c + 1) * n // nchunk
        a = acc[c]
        for i in range(lo, hi):
            gi = g[i]
            if gi != 0.0:
                for p in range(indptr[i], indptr[i + 1]):
                    a[indices[p]] += data[p] * gi
    for j in range(n_cols):
        s = 0.0
        for c in range(nchunk):
            s += acc[c, j]
        out[j] = s


@njit(parallel=True, cache=True, fastmath=True, nogil=True)
def _csr_spmm(indptr, indices, data, a_indptr, a_indices, a_data, out):
    """out (rows × k, zeroed) = CSR(indptr, indices, data) @ A, A a CSR (n_cols × k) given by
    (a_indptr, a_indices, a_data): work ∝ Σ_nnz (non-zeros of A's row), row-parallel."""
    n = indptr.size - 1
    nchunk = min(n, 256)
    for c in prange(nchunk):
        lo = c * n // nchunk
        hi = (c + 1) * n // nchunk
        for i in range(lo, hi):
            for p in range(indptr[i], indptr[i + 1]):
                b = indices[p]
                v = data[p]
                for q in range(a_indptr[b], a_indptr[b + 1]):
                    out[i, a_indices[q]] += v * a_data[q]


def _compact(m: sp.csr_matrix, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx_t = np.uint16 if m.shape[1] < 2**16 else np.uint32
    return (m.indptr.astype(np.int64), m.indices.astype(idx_t),
            np.ascontiguousarray(m.data, dtype=dtype))


def csr_matvec(m: sp.csr_matrix, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``m @ x`` for a CSR matrix with the parallel numba kernel (dtype of ``m.data``)."""
    if out is None:
        out = np.empty(m.shape[0], dtype=m.data.dtype)
    x = np.ascontiguousarray(x, dtype=m.data.dtype)
    _csr_matvec(*_compact(m, m.data.dtype), x, out)
    return out


class SparseOperator:
    """A Dij row subset (one compact CSR) for ``D·w`` and ``Dᵀ·g``."""

    def __init__(self, matrix: sp.spmatrix, dtype=np.float32):
        m = matrix if isinstance(matrix, sp.csr_matrix) else sp.csr_matrix(matrix)
        if not m.has_sorted_indices:
            m = m.sorted_indices()
        self.dtype = np.dtype(dtype)
        self.shape = m.shape
        self.nnz = m.nnz
        self._m = _compact(m, self.dtype)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self._m))

    def dot(self, w: np.ndarray) -> np.ndarray:
        """D · w (rows = voxels)."""
        out = np.empty(self.shape[0], dtype=self.dtype)
        _csr_matvec(*self._m, np.ascontiguousarray(w, dtype=self.dtype), out)
        return out

    def matmat_sparse(self, a: sp.spmatrix) -> np.ndarray:
        """D · A (dense rows × k, float64) for a sparse A (n_cols × k)."""
        a = sp.csr_matrix(a)
        if a.shape[0] != self.shape[1]:
            raise ValueError(f"A has {a.shape[0]} rows, operator has {self.shape[1]} columns")
        out = np.zeros((self.shape[0], a.shape[1]), dtype=np.float64)
        _csr_spmm(*self._m, a.indptr.astype(np.int64), a.indices.astype(np.int64),
                  a.data.astype(np.float64), out)
        return out

    def tdot(self, g: np.ndarray) -> np.ndarray:
        """Dᵀ · g (one value per beamlet)."""
        out = np.empty(self.shape[1], dtype=self.dtype)
        _csr_rmatvec(*self._m, np.ascontiguousarray(g, dtype=self.dtype), self.shape[1],
                     _N_CHUNKS, out)
        return out
