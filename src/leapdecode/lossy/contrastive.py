"""`contrastive`: contrastive search, the reference baseline for momentum decoding (lossy, deterministic).

Su et al. 2022, "A Contrastive Framework for Neural Text Generation". With V(k) the target's top-k tokens,

    x_t = argmax_{v in V(k)}  (1 - alpha) * p(v | x_<t)  -  alpha * max_{j < t} cos(h_v, h_{x_j})

where h_v is the final hidden state of x_<t + v and h_{x_j} those of the earlier tokens (prompt included).
transformers 5.x moved its implementation to a hub repository that needs `trust_remote_code`, so it is
implemented here. One target pass per token: the pass feeds the last chosen token (the root) and the k
candidates for the next one as siblings of a depth-1 tree, which gives the candidates' hidden states and,
for the one chosen, the next distribution; only the root is kept in the cache. With `alpha=0` it is greedy.
"""
from __future__ import annotations

import time

import torch

from ..errors import InvalidSettingError
from ..stats import GenerationResult, GenerationStats
from ..text_stream import TextAssembler
from ..tree import DraftTree

DEFAULTS = {"alpha": 0.6, "top_k": 4}


def options(opts: dict) -> dict:
    out = {**DEFAULTS, **opts}
    if isinstance(out["alpha"], bool) or not isinstance(out["alpha"], (int, float)) or not 0 <= out["alpha"] <= 1:
        raise InvalidSettingError(f"contrastive alpha must be in [0, 1], got {out['alpha']!r}")
    if isinstance(out["top_k"], bool) or not isinstance(out["top_k"], int) or out["top_k"] < 1:
        raise InvalidSettingError(f"contrastive top_k must be an integer >= 1, got {out['top_k']!r}")
    return out


def choose(probs: torch.Tensor, candidates: torch.Tensor, hidden: torch.Tensor, context: torch.Tensor,
           alpha: float) -> int:
    """The index into `candidates` (k,) of the contrastive choice: `probs` (V,) the model's distribution,
    `hidden` (k, H) the candidates' hidden states, `context` (T, H) the earlier tokens'."""
    h = torch.nn.functional.normalize(hidden.float(), dim=-1)
    c = torch.nn.functional.normalize(context.float(), dim=-1)
    degeneration = (h @ c.T).max(dim=-1).values  # (k,)
    scores = (1 - alpha) * probs[candidates].float() - alpha * degeneration
    return int(torch.argmax(scores))


def contrastive_generate(lm, prompt_ids: list[int], *, tokenizer, max_new_tokens: int, context_length: int,
                         stop_ids=(), stop: tuple[str, ...] = (), alpha: float = 0.6, top_k: int = 4,
                         method: str = "contrastive") -> GenerationResult:
    """Contrastive search with `lm` (a `CausalLM`, empty cache)."""
    started = time.perf_counter()
    stop_ids = frozenset(stop_ids)
    limit = min(max_new_tokens, context_length - len(prompt_ids))
    lm.keep_hidden = True
    try:
        contexts = []
        if len(prompt_ids) > 1:
            lm.forward(torch.tensor([prompt_ids[:-1]], dtype=torch.long))
            contexts.append(lm.last_hidden[0])
        root = prompt_ids[-1]
        start = lm.length
        logits = lm.score_tree(torch.tensor([[root]]), DraftTree.chain(torch.zeros(1, 0, dtype=torch.long)))
        contexts.append(lm.last_hidden[0, :1])
        lm.crop(start)  # the root is fed again with the first candidates (the invariant of the loop)
        prefill_time = time.perf_counter() - started
        probs = torch.softmax(logits[0, 0].float(), dim=-1)
        text = TextAssembler(tokenizer, stop)
        ids: list[int] = []
        passes, reason = 0, ""
        while True:
            k = min(top_k, probs.shape[-1])
            candidates = torch.topk(probs, k).indices.cpu()
            chosen, out = 0, None
            if alpha > 0 or len(ids) + 1 < limit:  # greedy's last token needs no look-ahead
                tree = DraftTree(tokens=candidates.unsqueeze(0), parents=(-1,) * k)
                start = lm.length
                out = lm.score_tree(torch.tensor([[root]]), tree)  # (1, k+1, V)
                passes += 1
                hidden = lm.last_hidden[0]  # (k+1, H): the root, then the candidates
                if passes > 1:  # the first root's hidden state is in `contexts` already
                    contexts.append(hidden[:1])
                lm.keep_path(start, [])  # keep the root only; the chosen token is the next root
                chosen = choose(probs, candidates.to(hidden.device), hidden[1:], torch.cat(contexts), alpha)
            token = int(candidates[chosen])
            ids.append(token)
            taken = text.push([token])
            if text.stopped:
                ids = ids[: len(ids) - 1 + taken]
                reason = "stop_string"
            elif token in stop_ids:
                reason = "eos"
            elif len(ids) >= limit:
                reason = "max_new_tokens" if limit == max_new_tokens else "context"
            if reason:
                break
            probs = torch.softmax(out[0, chosen + 1].float(), dim=-1)
            root = token
    finally:
        lm.keep_hidden = False
    stats = GenerationStats(method=method, prompt_tokens=len(prompt_ids), new_tokens=len(ids),
                            target_forward_passes=passes, accept_lengths=[1] * passes, prefill_time=prefill_time,
                            wall_time=time.perf_counter() - started, stop_reason=reason)
    return GenerationResult(text=text.text, token_ids=ids, prompt_ids=list(prompt_ids), stats=stats)
