"""transformers' own `generate()` as a peer: plain greedy, prompt lookup and assisted generation.

Used by `leapdecode generate --compare --with-hf` and `leapdecode bench` (methods hf-ar, hf-pld,
hf-assisted) so that our numbers sit next to the library users already have, in the same process.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import kv_cache
from .errors import InvalidSettingError
from .runtime.attention import PROMPT_PASS

PEER_METHODS = ("hf-ar", "hf-pld", "hf-assisted")


@dataclass
class PeerResult:
    method: str
    token_ids: list[int]  # new tokens only
    wall_time: float


def hf_generate(method: str, target, prompt_ids: list[int], max_new_tokens: int, draft=None,
                prompt_lookup_num_tokens: int = 10) -> PeerResult:
    """Greedy `model.generate()` with the same stop tokens as our engine."""
    if method not in PEER_METHODS:
        raise InvalidSettingError(f"unknown peer {method!r}; peers: {', '.join(PEER_METHODS)}")
    kwargs: dict = {}
    if method == "hf-pld":
        kwargs["prompt_lookup_num_tokens"] = prompt_lookup_num_tokens
    elif method == "hf-assisted":
        if draft is None:
            raise InvalidSettingError("hf-assisted needs a draft model (--draft-model)")
        kwargs["assistant_model"] = draft.model
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=target.model.device)
    stop = sorted(target.stop_token_ids) or None
    pad = target.tokenizer.pad_token_id
    if pad is None:
        pad = stop[0] if stop else 0
    started = time.perf_counter()
    with torch.inference_mode():
        if target.runtime.exact and method == "hf-ar":  # the prompt goes in as our engine feeds it (alone,
            # into an empty cache). Not for hf-pld and hf-assisted: transformers' assisted decoding feeds the whole
            # prompt again in its first verification pass whatever the cache holds (the prompt would be cached
            # twice), so those two keep transformers' own prompt handling: on the exact runtime their prompt's
            # keys and values are then computed row by row instead of by the fused prompt kernel, and may differ
            # from ours in the last bits.
            cache = kv_cache.new_cache()
            target.model(input_ids=ids[:, :-1], cache=cache, use_cache=True, logits_to_keep=1, **{PROMPT_PASS: True})
            kwargs["cache"] = cache
        out = target.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            temperature=None, top_p=None, top_k=None, eos_token_id=stop, pad_token_id=pad, **kwargs,
        )
    new = out[0, len(prompt_ids):].tolist()  # inside the timed span: on a GPU this waits for the work
    wall = time.perf_counter() - started
    if stop:  # drop padding after an early stop, keep the stop token like our engine does
        for i, t in enumerate(new):
            if t in target.stop_token_ids:
                new = new[: i + 1]
                break
    return PeerResult(method=method, token_ids=new, wall_time=wall)
