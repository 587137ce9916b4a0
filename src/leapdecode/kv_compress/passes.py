"""Split a forward pass where a compressed cache's view changes, so each query sees the view of its position.

A compressed cache shows a query at position p the old tokens through compressed blocks up to C(p) and the
rest exactly (cache.py); C changes at positions window + k * block. One model call gives all its queries one
view, so a call whose queries cross such a position is cut there into several calls: the first is a plain
update, the later ones are marked as continuing it (`continue_at`), which compresses the block that the new
view needs while keeping its exact copy for a rollback. Plain one-token decoding never crosses, so
speculative decoding on a compressed cache gives the tokens plain decoding on that cache gives.

A draft tree is cut by node depth: nodes whose position lies in one view go in one call, seeing the earlier
calls' nodes through the ancestor mask; afterwards the cache is put back in node order (a permutation inside
the exact window).
"""
from __future__ import annotations

import torch

from .cache import KVRollbackError


def _segments(start: int, end: int, cuts: list[int]) -> list[tuple[int, int]]:
    bounds = [start, *cuts, end]
    return list(zip(bounds, bounds[1:]))


def forward(lm, ids: torch.Tensor, logits_to_keep: int = 0, hidden_only: int = 0) -> torch.Tensor | None:
    """`CausalLM.forward` (or, with `hidden_only` = keep, `forward_hidden`) cut at the cache's view changes;
    None when the call crosses none (the caller runs it as one call)."""
    cache = lm.cache
    start, n = lm.length, ids.shape[1]
    cuts = cache.view_changes(start, start + n)
    if not cuts:
        return None
    need = hidden_only or (n if logits_to_keep == 0 else min(logits_to_keep, n))
    logits, hidden = [], []
    ids = ids.to(lm.device)
    try:
        for j, (a, e) in enumerate(_segments(start, start + n, cuts)):
            cache.continue_at(a if j else None)
            rows = max(0, (e - start) - max(a - start, n - need))  # this call's rows among the last `need`
            part = ids[:, a - start:e - start]
            if hidden_only:
                out = lm.model.get_decoder()(input_ids=part, cache=cache, use_cache=True)
                if rows:
                    hidden.append(out.last_hidden_state[:, -rows:])
                continue
            out = lm.model(input_ids=part, cache=cache, use_cache=True, logits_to_keep=rows or 1,
                           **lm._hidden_kwargs())
            if rows:
                logits.append(out.logits[:, -rows:])
                if lm.keep_hidden:
                    hidden.append(out.hidden_states[lm.hidden_layer][:, -rows:])
    finally:
        cache.continue_at(None)
    lm.forward_passes += 1
    if hidden_only:
        return torch.cat(hidden, dim=1)
    lm.last_hidden = torch.cat(hidden, dim=1) if lm.keep_hidden else None
    return torch.cat(logits, dim=1)


def score_tree(lm, ids: torch.Tensor, ancestors: torch.Tensor, depths: torch.Tensor, past: int,
               rows: int) -> torch.Tensor | None:
    """`CausalLM.score_tree`'s masked call, cut by position at the cache's view changes. `ids` (B, q) are the
    lead tokens, the root and the nodes; `ancestors` (q, q) and `depths` (q,) their mask and depths from
    `past`; the logits of the last `rows` inputs are returned (B, rows, V). None when nothing is cut."""
    cache = lm.cache
    positions = past + depths
    q = ids.shape[1]
    cuts = cache.view_changes(past, int(positions.max()) + 1)
    if not cuts:
        return None
    committed = past + q - rows + 1  # the lead and the root are committed: storage up to there may compress
    segment = torch.bucketize(positions, torch.tensor(cuts), right=True)
    ids = ids.to(lm.device)
    fed: list[torch.Tensor] = []
    got_logits: list[torch.Tensor] = []
    got_hidden: list[torch.Tensor] = []
    got_index: list[torch.Tensor] = []
    try:
        for j in range(len(cuts) + 1):
            query = (segment == j).nonzero().flatten()
            if not query.numel():
                continue
            if fed:
                if cache.view_length(cuts[j - 1]) > committed:
                    raise KVRollbackError(
                        f"compressed KV cache: a draft {int(depths.max()) - (q - rows)} tokens deep does not fit "
                        f"the exact window of {cache.window} tokens; raise kv_window")
                cache.continue_at(cuts[j - 1])
            before = torch.cat(fed) if fed else torch.zeros(0, dtype=torch.long)
            mask = torch.cat([torch.ones(query.numel(), past, dtype=torch.bool), ancestors[query][:, before],
                              ancestors[query][:, query]], dim=1)
            masks = {"full_attention": mask}
            if lm.sliding_window is not None:
                key_pos = torch.cat([torch.arange(past), positions[before], positions[query]])
                masks["sliding_attention"] = mask & (key_pos.unsqueeze(0) > positions[query].unsqueeze(1)
                                                     - lm.sliding_window)
            batch = ids.shape[0]
            expanded = {k: m.to(lm.device)[None, None].expand(batch, 1, -1, -1) for k, m in masks.items()}
            wanted = int((query >= q - rows).sum())  # rows kept: a suffix of `query` (inputs in order)
            out = lm.model(
                input_ids=ids[:, query],
                position_ids=positions[query].unsqueeze(0).expand(batch, -1).to(lm.device),
                attention_mask=expanded if lm.sliding_window is not None else expanded["full_attention"],
                cache=cache, use_cache=True, logits_to_keep=wanted or 1, **lm._hidden_kwargs(),
            )
            if wanted:
                got_logits.append(out.logits[:, -wanted:])
                got_index.append(query[-wanted:])
                if lm.keep_hidden:
                    got_hidden.append(out.hidden_states[lm.hidden_layer][:, -wanted:])
            fed.append(query)
    finally:
        cache.continue_at(None)
    order = torch.cat(fed)
    if not torch.equal(order, torch.arange(q)):  # put the cache back in input order
        slot = torch.empty(q, dtype=torch.long)
        slot[order] = torch.arange(q)
        cache.keep(past, (past + slot).tolist())
    index = torch.cat(got_index) - (q - rows)
    place = torch.empty(rows, dtype=torch.long)
    place[index] = torch.arange(rows)
    lm.forward_passes += 1
    if lm.keep_hidden:
        lm.last_hidden = torch.cat(got_hidden, dim=1)[:, place.to(lm.device)]
    else:
        lm.last_hidden = None
    return torch.cat(got_logits, dim=1)[:, place.to(lm.device)]
