"""KV-cache operations on their own (kv_cache.py: crop, keep; batching/ragged_cache.py: rows of different
lengths, commit, crop of unused columns, compaction, rows leaving) and the one mask builder (masks.py)."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from leapdecode import DraftTree, kv_cache
from leapdecode.batching.ragged_cache import RaggedCache
from leapdecode.masks import attention_masks

LAYERS = 2


def _cache(values: list[list[float]], empty: DynamicCache | None = None) -> DynamicCache:
    """A cache of B rows whose entry at column c holds `values[b][c]` (keys) and its negative (values), in every
    layer (heads 1, head_dim 1), written through the cache's own `update` (as a model pass does)."""
    cache = DynamicCache() if empty is None else empty
    keys = torch.tensor(values, dtype=torch.float32)[:, None, :, None]  # (B, 1, C, 1)
    for layer in range(LAYERS):
        cache.update(keys + layer, -(keys + layer), layer)
    return cache


KINDS = {"dynamic": DynamicCache, "engine": kv_cache.new_cache}  # transformers' cache, and the one the engine uses


def _contents(cache: DynamicCache, row: int = 0) -> list[float]:
    return cache.layers[0].keys[row, 0, :, 0].tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_crop_keeps_the_first_positions_of_every_layer(kind):
    cache = _cache([[1, 2, 3, 4, 5]], KINDS[kind]())
    kv_cache.crop(cache, 3)
    assert _contents(cache) == [1, 2, 3] and kv_cache.cache_length(cache) == 3
    assert cache.layers[1].keys[0, 0, :, 0].tolist() == [2, 3, 4]
    assert cache.layers[1].values[0, 0, :, 0].tolist() == [-2, -3, -4]
    kv_cache.crop(cache, 10)  # longer than the cache: nothing changes
    assert _contents(cache) == [1, 2, 3]
    _cache([[9]], cache)  # the next pass appends after the cropped end
    assert _contents(cache) == [1, 2, 3, 9] and kv_cache.cache_length(cache) == 4


@pytest.mark.parametrize("kind", KINDS)
def test_keep_compacts_a_tree_path(kind):
    """Positions [0, start) stay; of the later ones only the kept (accepted path) ones, in order."""
    cache = _cache([[1, 2, 3, 10, 11, 12, 13]], KINDS[kind]())
    kv_cache.keep(cache, 3, [4, 6])
    assert _contents(cache) == [1, 2, 3, 11, 13]
    assert cache.layers[1].values[0, 0, :, 0].tolist() == [-2, -3, -4, -12, -14]
    kv_cache.keep(cache, 5, [])
    assert _contents(cache) == [1, 2, 3, 11, 13]
    _cache([[9]], cache)
    assert _contents(cache) == [1, 2, 3, 11, 13, 9]


def _append(cache: RaggedCache, columns: list[list[float]]) -> None:
    """What the model does during a pass: append each row's new entries at the same columns."""
    new = torch.tensor(columns, dtype=torch.float32)[:, None, :, None]
    for layer in range(LAYERS):
        cache.cache.update(new + layer, -(new + layer), layer)


def _row_values(cache: RaggedCache, row: int) -> list[float]:
    keys = cache.layers[0][0]
    return keys[row, 0, cache.valid[row], 0].tolist()


def _ragged() -> RaggedCache:
    cache = RaggedCache(compact_slack=16)
    cache.add_row(_cache([[1, 2, 3]]), 3)
    cache.add_row(_cache([[11]]), 1)
    return cache


def test_rows_join_right_aligned():
    cache = _ragged()
    assert cache.rows == 2 and cache.width == 3
    assert cache.valid.tolist() == [[True, True, True], [False, False, True]]
    assert cache.lengths().tolist() == [3, 1]
    assert _row_values(cache, 0) == [1, 2, 3] and _row_values(cache, 1) == [11]
    cache.add_row(DynamicCache(), 0)  # a one-token prompt: nothing cached yet
    assert cache.lengths().tolist() == [3, 1, 0]


def test_step_inputs_position_each_row_after_its_own_tokens():
    cache = _ragged()
    chain = DraftTree.chain(torch.tensor([7, 8]))
    tree = DraftTree(tokens=torch.tensor([[5]]), parents=(-1,))
    inputs = cache.step_inputs([4, 12], [chain, tree])
    assert inputs.ids.tolist() == [[4, 7, 8], [12, 5, 0]]
    assert inputs.positions.tolist() == [[3, 4, 5], [1, 2, 1]]  # padding sits at the row's next position
    full = inputs.masks["full_attention"]
    assert full.shape == (2, 1, 3, 6)
    assert full[1, 0, :, :3].tolist() == [[False, False, True]] * 3  # the holes are never seen
    assert full[1, 0, 2, 3:].tolist() == [False, False, True]  # padding attends to itself only
    assert full[0, 0, :, 3:].tolist() == [[True, False, False], [True, True, False], [True, True, True]]


def test_commit_keeps_accepted_columns_crops_unused_ones_and_compacts():
    cache = _ragged()
    chain = DraftTree.chain(torch.tensor([7, 8]))
    cache.step_inputs([4, 12], [chain, DraftTree.chain(torch.zeros(1, 0, dtype=torch.long))])
    _append(cache, [[4, 7, 8], [12, 0, 0]])
    cache.commit([[0], []], 3)  # row 0 keeps its root and node 0 (7); row 1 only its root
    assert cache.width == 5  # nobody kept the last column: cropped
    assert _row_values(cache, 0) == [1, 2, 3, 4, 7] and _row_values(cache, 1) == [11, 12]
    assert cache.lengths().tolist() == [5, 2]
    assert cache.valid[1].tolist() == [False, False, True, True, False]  # a hole where the padding was
    cache.compact()
    assert cache.valid[1].tolist() == [False, False, False, True, True]  # right-aligned again
    assert _row_values(cache, 0) == [1, 2, 3, 4, 7] and _row_values(cache, 1) == [11, 12]
    assert cache.layers[1][1][1, 0, cache.valid[1], 0].tolist() == [-12, -13]  # every layer, keys and values


def test_commit_compacts_when_the_holes_pile_up():
    cache = _ragged()
    cache.compact_slack = 1
    chain = DraftTree.chain(torch.tensor([7, 8, 9]))
    cache.step_inputs([4, 12], [chain, chain])
    _append(cache, [[4, 7, 8, 9], [12, 17, 18, 19]])
    cache.commit([[], [0, 1, 2]], 4)  # row 0 rejects its draft: three holes before row 1's last column
    assert cache.compactions == 1  # 7 columns for at most 5 tokens: over the slack of one, re-packed
    assert cache.width == 5 and cache.valid.all(1).tolist() == [False, True]
    assert _row_values(cache, 0) == [1, 2, 3, 4] and _row_values(cache, 1) == [11, 12, 17, 18, 19]


def test_keep_rows_drops_rows_and_repacks():
    cache = _ragged()
    cache.keep_rows([1])
    assert cache.rows == 1 and cache.width == 1 and _row_values(cache, 0) == [11]
    assert cache.emptied().rows == 0


def test_sliding_window_counts_positions_over_valid_columns():
    """A key's position is the number of valid columns before it: holes never shift the window."""
    past = torch.tensor([[True, False, True, True]])  # positions 0, -, 1, 2
    block = torch.ones(1, 1, 1, dtype=torch.bool)
    masks = attention_masks(past, block, torch.tensor([[3]]), sliding_window=2)
    assert masks["full_attention"][0, 0, 0].tolist() == [True, False, True, True, True]
    assert masks["sliding_attention"][0, 0, 0].tolist() == [False, False, False, True, True]
    assert set(attention_masks(past, block, torch.tensor([[3]]))) == {"full_attention"}
