"""The C++ row-invariant attention kernel (runtime/kernels/row_attention.cpp, built by runtime/native.py): each
query row's output is bitwise the same alone or with any other rows, whichever of the kernel's routines computed
it (few queries: keys one at a time; many: keys transposed; a shared cache prefix walked once), over key ranges
or gathered columns, and close to a float64 reference. The model-level property tests (test_invariance.py,
test_compiled.py) run through the same kernel."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from leapdecode.runtime import attention, native

KERNELS = native.kernels()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="no C++ compiler here: the Python routine serves")
NONE = torch.empty(0, dtype=torch.long)


def _ranges(stops: list[int], starts: list[int] | None = None):
    stop = torch.tensor(stops, dtype=torch.long)
    start = torch.tensor(starts, dtype=torch.long) if starts else torch.zeros_like(stop)
    return start, stop, NONE, NONE


def _gathered(lists: list[list[int]]):
    counts = torch.tensor([len(c) for c in lists], dtype=torch.long)
    col_ptr = torch.zeros(len(lists) + 1, dtype=torch.long)
    col_ptr[1:] = counts.cumsum(0)
    columns = torch.tensor([c for cols in lists for c in cols], dtype=torch.long)
    return torch.zeros_like(counts), counts, col_ptr, columns


def _reference(q, k, v, keys: list[int], scale):
    """float64 attention of q (H, D) over the listed keys of k, v (Hkv, N, D)."""
    group = q.shape[0] // k.shape[0]
    kk = k[:, keys].double().repeat_interleave(group, 0)
    vv = v[:, keys].double().repeat_interleave(group, 0)
    w = torch.softmax((q.double()[:, None] @ kk.transpose(1, 2))[:, 0] * scale, -1)
    return (w[:, None] @ vv)[:, 0]


def _tensors(heads, kv_heads, dim, rows, keys, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, rows, dim, generator=g)
    # the cache as the runtime holds it: a view of a longer buffer
    k = torch.randn(1, kv_heads, keys + 7, dim, generator=g)[:, :, :keys]
    v = torch.randn(1, kv_heads, keys + 7, dim, generator=g)[:, :, :keys]
    return q, k, v


@settings(max_examples=25, deadline=None)
@given(shape=st.sampled_from([(9, 3, 64), (12, 2, 128), (4, 4, 16), (6, 2, 24), (2, 1, 40)]),
       past=st.integers(0, 90), rows=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_chain_rows_equal_rows_alone(shape, past, rows, seed):
    heads, kv_heads, dim = shape
    q, k, v = _tensors(heads, kv_heads, dim, rows, past + rows, seed)
    stops = [past + i + 1 for i in range(rows)]
    together = KERNELS.row_attention(q, k, v, *_ranges(stops), 0.1)
    for i, stop in enumerate(stops):
        alone = KERNELS.row_attention(q[:, :, i:i + 1].contiguous(), k, v, *_ranges([stop]), 0.1)
        assert torch.equal(alone[0, 0], together[0, i])
        ref = _reference(q[0, :, i], k[0], v[0], list(range(stop)), 0.1)
        torch.testing.assert_close(together[0, i].double(), ref, atol=2e-5, rtol=2e-5)


@settings(max_examples=25, deadline=None)
@given(past=st.integers(1, 70), data=st.data())
def test_tree_rows_equal_rows_alone(past, data):
    rows = data.draw(st.integers(2, 14))
    parents = [-1] + [data.draw(st.integers(-1, i - 1)) for i in range(1, rows)]
    lists = []
    for node in range(rows):  # the cache, then the node's ancestors and itself, in cache order
        path, n = [], node
        while n >= 0:
            path.append(past + n)
            n = parents[n]
        lists.append(list(range(past)) + sorted(path))
    q, k, v = _tensors(9, 3, 64, rows, past + rows, data.draw(st.integers(0, 2**16)))
    together = KERNELS.row_attention(q, k, v, *_gathered(lists), 0.125)
    for i, cols in enumerate(lists):
        alone = KERNELS.row_attention(q[:, :, i:i + 1].contiguous(), k, v, *_gathered([cols]), 0.125)
        assert torch.equal(alone[0, 0], together[0, i])
        if cols == list(range(len(cols))):  # a chain node: the same as the plain range
            as_range = KERNELS.row_attention(q[:, :, i:i + 1].contiguous(), k, v, *_ranges([len(cols)]), 0.125)
            assert torch.equal(as_range[0, 0], together[0, i])


def test_ragged_batch_and_windows():
    """Rows of different sequences (batch), key ranges that do not start at 0 (sliding windows), a row with no
    key (zeros), and two threads or one: every row as computed alone."""
    q, k, v = _tensors(6, 2, 32, 5, 40, 1)
    q2, k2, v2 = (torch.cat([t, t.flip(2)]) for t in (q, k, v))
    starts, stops = [0, 3, 10, 0, 5, 0, 2, 0, 0, 30], [40, 40, 20, 0, 36, 33, 34, 35, 36, 37]
    together = KERNELS.row_attention(q2, k2, v2, *_ranges(stops, starts), 0.2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = KERNELS.row_attention(q2, k2, v2, *_ranges(stops, starts), 0.2)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, together)
    for r, (start, stop) in enumerate(zip(starts, stops)):
        b, i = divmod(r, 5)
        alone = KERNELS.row_attention(q2[b:b + 1, :, i:i + 1].contiguous(), k2[b:b + 1], v2[b:b + 1],
                                      *_ranges([stop], [start]), 0.2)
        assert torch.equal(alone[0, 0], together[b, i])
        if stop == start:
            assert not together[b, i].any()


def test_bad_input_is_refused_in_one_line():
    q, k, v = _tensors(4, 2, 16, 1, 8, 0)
    with pytest.raises(RuntimeError, match="float32"):
        KERNELS.row_attention(q.double(), k.double(), v.double(), *_ranges([8]), 0.1)
    with pytest.raises(RuntimeError, match="one key range per row"):
        KERNELS.row_attention(q, k, v, *_ranges([8, 8]), 0.1)


def test_exact_attention_uses_the_kernel_and_matches_the_python_routine_closely():
    q, k, v = _tensors(9, 3, 64, 4, 50, 3)
    out, _ = attention.exact_attention(None, q, k, v, None, scaling=0.125)
    native_row = KERNELS.row_attention(q, k, v, *_ranges([47, 48, 49, 50]), 0.125)
    assert torch.equal(out, native_row)
    python_row = attention._one_row(q[0, :, 3].reshape(3, 3, 64), k[0], v[0], 0.125).reshape(9, 64)
    torch.testing.assert_close(out[0, 3], python_row, atol=1e-5, rtol=1e-5)
