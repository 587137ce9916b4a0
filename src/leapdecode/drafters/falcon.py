"""`falcon`: a small semi-autoregressive feature drafter (lossless through tree verification).

Falcon (Gao et al. 2024, "Falcon: Faster and Parallel Inference of Large Language Models through Enhanced
Semi-Autoregressive Drafting and Custom-Designed Decoding Tree"), with EAGLE's feature extrapolation (Li et al.
2024) as the per-position input. The drafter reads pairs (f_j, e(x_{j+1})): the target's final hidden state at
position j and the embedding of the token that followed. A causal transformer layer over the last `window` pairs
outputs a pseudo-feature o for the next position (lm_head(o) predicts the next token); then a glance head,
conditioned on o and the embedding of the token just chosen, emits the following token in the same drafter
step, so one step yields a block of two coupled tokens (Falcon's semi-autoregressive block, where the second
token glances at the first). For deeper nodes the pseudo-features of the drafted path are appended as pairs.

The tree is grown by confidence: at each depth the most probable nodes (by the drafter's cumulative
probability, known before their children are drawn) are expanded, the best one with `top_k` children, the next
with one fewer, within `max_nodes`. Every drawn child stays in the tree, so under sampling the children of a
node are exactly draws without replacement from the drafter's distribution, and recursive rejection sampling
over the tree keeps the target's distribution; greedy output equals the target's greedy output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..sampling import SamplingParams, probs_from_logits
from ..runtime.quantized import module_device
from ..tree import DraftTree
from ..verifiers.tree_sampling import without_replacement
from .base import DraftContext, DraftFeedback, Drafter
from .draft_vocab import DraftVocab
from ..sampling import gumbel_top_k
from .medusa import ResBlock


class _RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class _Layer(nn.Module):
    """Pre-norm causal self-attention + SiLU MLP (no positional encoding: the causal mask orders the pairs)."""

    def __init__(self, hidden: int, head_dim: int = 64):
        super().__init__()
        self.heads = max(1, hidden // head_dim)
        self.norm1, self.norm2 = _RMSNorm(hidden), _RMSNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.proj = nn.Linear(hidden, hidden, bias=False)
        self.up = nn.Linear(hidden, 2 * hidden, bias=False)
        self.down = nn.Linear(2 * hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, H)
        b, t, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, h)
        x = x + self.proj(att)
        return x + self.down(F.silu(self.up(self.norm2(x))))


def eagle_layer_config(hidden_size: int, attention_heads: int | None = None, kv_heads: int | None = None,
                       intermediate_size: int | None = None, rope_theta: float = 10000.0,
                       rms_norm_eps: float = 1e-6, max_positions: int = 4096):
    """The Llama config of EAGLE's decoder layer for a drafter of width `hidden_size` (heads of 64 by default)."""
    from transformers import LlamaConfig

    heads = attention_heads or max(1, hidden_size // 64)
    if hidden_size % heads:
        raise ValueError(f"hidden size {hidden_size} is not a multiple of {heads} attention heads")
    config = LlamaConfig(hidden_size=hidden_size, intermediate_size=intermediate_size or 2 * hidden_size,
                         num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                         head_dim=hidden_size // heads, rms_norm_eps=rms_norm_eps, num_hidden_layers=1,
                         rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
                         max_position_embeddings=max_positions, vocab_size=1, hidden_act="silu",
                         attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    config._attn_implementation = "sdpa"
    return config


class FalconDrafterNet(nn.Module):
    """`layer="falcon"`: `_Layer` (pre-norm, no positions, window of pairs); `layer="eagle"`: EAGLE's layer, a
    Llama decoder layer (transformers' own) with rotary positions over the window and no input norm on the
    first layer, the shape vLLM and SGLang load as an EAGLE drafter (`leapdecode export`). Rotary positions
    are relative, so a window that starts anywhere in the text gives the same outputs."""

    kind = "falcon"

    def __init__(self, hidden_size: int, layers: int = 1, window: int = 16, num_heads: int = 2,
                 layer: str = "falcon", attention_heads: int | None = None, kv_heads: int | None = None,
                 intermediate_size: int | None = None, rope_theta: float = 10000.0, rms_norm_eps: float = 1e-6):
        super().__init__()
        if layer not in ("falcon", "eagle"):
            raise ValueError(f"falcon layer must be 'falcon' or 'eagle', got {layer!r}")
        self.window = window
        self.block = 2  # tokens per drafter step (the layer's token + the glance head's token)
        self.layer_style = layer
        self.fuse = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        if layer == "eagle":
            from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

            self.layer_config = eagle_layer_config(hidden_size, attention_heads, kv_heads, intermediate_size,
                                                   rope_theta, rms_norm_eps)
            self.layers = nn.ModuleList(LlamaDecoderLayer(self.layer_config, i) for i in range(layers))
            self.layers[0].input_layernorm = nn.Identity()  # EAGLE: the fused input goes in unnormalized
            self.rotary = LlamaRotaryEmbedding(self.layer_config)  # buffers only, not saved
        else:
            self.layers = nn.ModuleList(_Layer(hidden_size) for _ in range(layers))
        self.glance_in = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        with torch.no_grad():
            self.glance_in.weight.zero_()
            self.glance_in.weight[:, :hidden_size].copy_(torch.eye(hidden_size))
        self.glance = ResBlock(hidden_size)

    def step(self, features: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """Pairs (B, T, H) + (B, T, H) -> pseudo-features for the next position of each pair (B, T, H)."""
        x = self.fuse(torch.cat([features, embeds], dim=-1))
        if self.layer_style == "eagle":
            b, t, _ = x.shape
            positions = torch.arange(t, device=x.device)[None].expand(b, t)
            rope = self.rotary(x, positions)
            mask = torch.full((t, t), float("-inf"), device=x.device, dtype=x.dtype).triu(1)[None, None]
            for layer in self.layers:
                x = layer(x, attention_mask=mask.expand(b, 1, t, t), position_ids=positions,
                          position_embeddings=rope)
            return x
        for layer in self.layers:
            x = layer(x)
        return x

    def glance_state(self, pseudo: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        """The block's second token: from the pseudo-feature and the embedding of the token chosen after it."""
        return self.glance(self.glance_in(torch.cat([pseudo, embed], dim=-1)))


def falcon_loss_fn(net: FalconDrafterNet, target, data, objective: str = "ce", length: int = 24):
    """A loss over windows of `length` pairs around the sampled positions (teacher forcing with the target's
    features): the layer's output predicts r_{i+1} (CE or distillation) and regresses f_{i+1} (EAGLE's feature
    loss); the glance head predicts r_{i+2} from it and e(r_{i+1})."""
    model = target.model
    lm_head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    device = next(model.parameters()).device
    starts = torch.repeat_interleave(data.starts[:-1], data.starts[1:] - data.starts[:-1])
    ends = data.ends()

    def loss_fn(idx: torch.Tensor):
        idx = idx[: max(1, len(idx) // 8)]  # a window per chosen position: about batch_size pairs in all
        first = torch.maximum(starts[idx], idx - length + 1)
        steps = torch.arange(length)
        pos = (first[:, None] + steps[None]).clamp(max=len(data.tokens) - 1)  # (B, T)
        inside = pos < ends[idx][:, None]
        feats = data.features[pos].to(device).float()
        toks = data.tokens[pos].to(device)
        out = net.step(feats, embed(toks).float())  # out[:, j] ~ f at pos+1
        nxt1, nxt2 = pos + 1, pos + 2
        ok1 = inside & (nxt1 < ends[idx][:, None])
        ok2 = inside & (nxt2 < ends[idx][:, None])
        logits1 = lm_head(out[ok1.to(device)]).float()
        labels1 = data.tokens[nxt1[ok1]].to(device)
        teacher_f = data.features[nxt1[ok1]].to(device).float()
        if objective == "distill":
            with torch.no_grad():
                teacher = lm_head(teacher_f).float().softmax(-1)
            loss1 = F.kl_div(logits1.log_softmax(-1), teacher, reduction="batchmean")
        else:
            loss1 = F.cross_entropy(logits1, labels1)
        reg = F.smooth_l1_loss(out[ok1.to(device)], teacher_f)
        g_in = out[ok2.to(device)]
        g_tok = data.tokens[nxt1[ok2]].to(device)
        logits2 = lm_head(net.glance_state(g_in, embed(g_tok).float())).float()
        labels2 = data.tokens[nxt2[ok2]].to(device)
        loss2 = F.cross_entropy(logits2, labels2) if len(labels2) else logits1.sum() * 0
        accs = [float((logits1.argmax(-1) == labels1).float().mean()),
                float((logits2.argmax(-1) == labels2).float().mean()) if len(labels2) else float("nan")]
        return loss1 + 0.8 * loss2 + reg, accs

    return loss_fn


class FalconDrafter(Drafter):
    needs_target_hidden = True

    def __init__(self, target, net: FalconDrafterNet, max_nodes: int = 16, max_depth: int = 6, top_k: int = 3,
                 vocab: torch.Tensor | None = None):
        if max_nodes < 1 or max_depth < 1 or top_k < 1:
            raise ValueError("max_nodes, max_depth and top_k must be >= 1")
        self.net, self.max_nodes, self.max_depth, self.top_k = net, max_nodes, max_depth, top_k
        model = target.model
        self.lm_head, self.embed = model.get_output_embeddings(), model.get_input_embeddings()
        self.vocab = DraftVocab(self.lm_head, vocab) if vocab is not None else None  # see draft_vocab.py
        self.features: list[torch.Tensor] = []  # f_j for the last `window` committed positions
        self.next_tokens: list[int] = []  # x_{j+1}, the token committed after each f_j
        self.forward_passes = 0

    def begin(self, prompt: list[int], params: SamplingParams) -> None:
        self.features, self.next_tokens, self.forward_passes = [], [], 0
        if self.vocab is not None:
            self.vocab.begin(prompt)

    def update(self, feedback: DraftFeedback) -> None:
        if feedback.target_hidden is None:
            return
        rows = [0] + [1 + n for n in feedback.accepted_nodes]
        hidden = feedback.target_hidden[0].detach().float()
        for row, token in zip(rows, feedback.committed):
            self.features.append(hidden[row])
            self.next_tokens.append(int(token))
        keep = self.net.window
        self.features, self.next_tokens = self.features[-keep:], self.next_tokens[-keep:]

    def propose(self, ctx: DraftContext) -> DraftTree | None:
        if not self.features:
            return None
        budget = min(self.max_nodes, ctx.max_tokens)
        hist_f = torch.stack(self.features)  # (W, H)
        hist_e = self.embed(torch.tensor(self.next_tokens, device=module_device(self.embed))).float()
        parents: list[int] = []
        tokens: list[int] = []
        probs: list[torch.Tensor] = []
        # frontier entries: (node index or -1, log prob, pseudo-features of the path's pairs (d, H), the path's
        # tokens (d,), the state that predicted the node (the glance head's input))
        frontier = [(-1, 0.0, hist_f.new_zeros(0, hist_f.shape[1]), [], None)]
        depth = 0
        while frontier and depth < self.max_depth and len(tokens) < budget:
            depth += 1
            frontier.sort(key=lambda n: -n[1])
            expand = frontier[: self.top_k]
            if depth % 2 == 1:  # the layer's token: run the layer over history + the path's pseudo pairs
                feats = torch.stack([torch.cat([hist_f, n[2]]) for n in expand])
                embs = torch.stack([torch.cat([hist_e, self.embed(torch.tensor(n[3], dtype=torch.long,
                                    device=hist_e.device)).float().reshape(-1, hist_e.shape[1])]) for n in expand])
                states = self.net.step(feats, embs)[:, -1]  # (P, H)
            else:  # the glance head's token, in the same drafter step
                last = torch.tensor([n[3][-1] for n in expand], device=hist_e.device)
                states = self.net.glance_state(torch.stack([n[4] for n in expand]), self.embed(last).float())
            self.forward_passes += 1
            logits = (self.vocab.logits(states) if self.vocab is not None else self.lm_head(states)).float()
            new_frontier = []
            for rank, node in enumerate(expand):
                m = min(self.top_k - rank, budget - len(tokens))
                if m <= 0:
                    break
                if ctx.params.greedy:
                    q = logits[rank].softmax(-1)
                    cand = [int(t) for t in torch.topk(logits[rank], m).indices.tolist()]
                    cond = None
                else:
                    q = probs_from_logits(logits[rank], ctx.params)
                    cand = gumbel_top_k(q, m, ctx.generator)
                    cond = without_replacement(q, cand)
                for j, tok in enumerate(cand):
                    parents.append(node[0])
                    tokens.append(tok)
                    if cond is not None:
                        probs.append(cond[j])
                    logp = node[1] + float(torch.log(q[tok].clamp_min(1e-12)))
                    # the child's pair: (pseudo-feature that predicted it, its embedding); a glance token's
                    # pseudo-feature is the glance state
                    pair_f = torch.cat([node[2], states[rank][None]])
                    new_frontier.append((len(tokens) - 1, logp, pair_f, node[3] + [tok], states[rank]))
            frontier = new_frontier
        if not tokens:
            return None
        tree = DraftTree(tokens=torch.tensor([tokens], dtype=torch.long), parents=tuple(parents))
        if not ctx.params.greedy:
            tree.draft_probs = torch.stack(probs).unsqueeze(0)
        return tree
