"""`hidden-transfer`: trained linear transfer layers turn an intermediate hidden state into pseudo hidden
states of the next positions, which the target's own upper layers finish (lossless through tree verification).

Parallel Decoding via Hidden Transfer (Wu et al. 2024, "Parallel Decoding via Hidden Transfer for Lossless
Large Language Model Acceleration"). The target has N decoder layers; `transfer_layer` L splits them into the
lower layers 0..L-1 and the upper layers L..N-1. Let h_p be the input of layer L at position p (the output of
the first L layers). Transfer layer j (j = 1..k, `num_heads`) is one linear map W_j: the pseudo hidden state of
the j-th position after the last cached one is

    z_j = W_j [h_{c-1}; e(x_c)]       (x_c: the root, the committed token not yet in the cache, at position c)

placed at position c + j - 1. The k pseudo states run through the target's upper layers, attending to the real
positions' keys and values at those layers and causally to each other, so they gather context the linear map
alone could not; the target's final norm and LM head turn z_j's output into a distribution over the token at
c + j. The top tokens of the k distributions (one per depth, as Medusa's heads give) form a tree by a Medusa
path list, and the target verifies the tree in its next pass: the output is exactly the target's (greedy:
identical tokens; sampling: children drawn without replacement, recursive rejection sampling). W_j starts as
[I, 0] (z_j = h_{c-1}) and is trained by `leapdecode train-drafter --kind hidden-transfer`; only the transfer
layers are trained, the target stays frozen.

Variant built here (the paper puts the pseudo positions into the verification pass itself). The pseudo
positions do not ride in the target's verification pass; they run in one cheap extra call per step:
- the verification pass hands the drafter h (the input of layer L) of its root and accepted nodes
  (`Drafter.target_hidden_layer = L`: the engine keeps that entry of the model's hidden states instead of the
  final ones), so the drafter never runs the lower layers on generated tokens;
- the drafter keeps its own KV cache of the target's upper layers (the lower layers hold placeholders, except
  for the prompt, which it feeds once through the whole model at its first draft); each step it feeds, in one
  call through the model's public inputs (`inputs_embeds`, `position_ids`, its own cache), the states h of the
  positions committed since the last step (catching its cache up) followed by the k pseudo states, with the
  lower layers skipped through `layer_skip.gated` (the project's module-swap seam, always restored), then crops
  the pseudo positions' entries from its cache;
- the resulting candidates are verified as a tree in the target's next pass.
So the pseudo positions never touch the target's cache or the real tokens' logits (they are never in the
target's pass), and the extra call costs the upper layers over (accepted + 1 + k) rows, not a full pass.
Training runs the same computation in one pass per answer: the real positions' h (from the frozen lower
layers) and every anchor's k pseudo rows go through the upper layers together, with a 4-D mask that lets a
pseudo row see the real positions before its root and its own earlier pseudo rows only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kv_cache
from ..layer_skip import SkipSet, StaticGate, gated, num_layers
from ..lm import CausalLM
from ..masks import attention_masks
from ..runtime.quantized import input_dtype, module_device
from ..sampling import SamplingParams
from ..tree import DraftTree
from .base import DraftContext, DraftFeedback, Drafter
from .draft_vocab import DraftVocab
from .medusa import DEFAULT_PATHS, grow_tree, parse_paths


class HiddenTransferNet(nn.Module):
    """k linear transfer layers: [h_{c-1}; e(x_c)] (P, 2H) -> pseudo hidden states (P, k, H) at layer L."""

    kind = "hidden-transfer"

    def __init__(self, hidden_size: int, num_heads: int = 3, transfer_layer: int = 1, num_layers: int = 2):
        super().__init__()
        if not 1 <= transfer_layer < num_layers:
            raise ValueError(f"transfer_layer must be in [1, {num_layers - 1}] for a {num_layers}-layer target, "
                             f"got {transfer_layer}")
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        self.num_heads, self.transfer_layer, self.num_layers = num_heads, transfer_layer, num_layers
        self.transfer = nn.ModuleList(nn.Linear(2 * hidden_size, hidden_size, bias=False) for _ in range(num_heads))
        with torch.no_grad():  # start as a copy of the last real state
            for lin in self.transfer:
                lin.weight.zero_()
                lin.weight[:, :hidden_size].copy_(torch.eye(hidden_size))

    @property
    def extra_signature(self) -> str:
        """What the parameter shapes do not show (a checkpoint resumes only the same split of the target)."""
        return f"transfer_layer={self.transfer_layer}/{self.num_layers}"

    def pseudo_states(self, state: torch.Tensor, root_embed: torch.Tensor) -> torch.Tensor:
        """state (P, H) = h_{c-1}, root_embed (P, H) = e(x_c) -> (P, k, H): z_1..z_k."""
        x = torch.cat([state, root_embed], dim=-1)
        return torch.stack([lin(x) for lin in self.transfer], dim=1)


def upper_layers(model: nn.Module, transfer_layer: int, states: torch.Tensor, positions: torch.Tensor,
                 attention_mask=None, cache=None) -> torch.Tensor:
    """Run decoder layers transfer_layer..N-1 (then the final norm) on `states` (B, T, H), the inputs of layer
    `transfer_layer`, at `positions` (B, T); the lower layers are skipped (their attention appends placeholder
    entries to `cache`, which no later query of those layers reads). Returns the final hidden states (B, T, H)."""
    total = num_layers(model)
    gate = StaticGate(total, SkipSet.of(layers=range(transfer_layer)))
    with gated(model, gate):
        out = model.get_decoder()(inputs_embeds=states, position_ids=positions, attention_mask=attention_mask,
                                  cache=cache, use_cache=cache is not None)
    return out.last_hidden_state


class HiddenTransferDrafter(Drafter):
    """Drafts from the pseudo positions of the last cached position (see the module docstring)."""

    needs_target_hidden = True

    def __init__(self, target, net: HiddenTransferNet, paths=DEFAULT_PATHS, max_nodes: int = 64,
                 vocab: torch.Tensor | None = None):
        if max_nodes < 1:
            raise ValueError(f"max_nodes must be >= 1, got {max_nodes}")
        model = target.model
        if num_layers(model) != net.num_layers:
            raise ValueError(f"the transfer layers were trained for a {net.num_layers}-layer target, this one has "
                             f"{num_layers(model)}")
        self.net, self.model, self.max_nodes = net, model, max_nodes
        self.target_hidden_layer = net.transfer_layer  # the engine hands us the inputs of this layer
        self.paths = [p for p in parse_paths(paths) if len(p) <= net.num_heads]
        if not self.paths:
            raise ValueError(f"no path of the path list is within the {net.num_heads} pseudo positions")
        self.lm_head, self.embed = model.get_output_embeddings(), model.get_input_embeddings()
        self.vocab = DraftVocab(self.lm_head, vocab) if vocab is not None else None  # see draft_vocab.py
        self.own = CausalLM(model)  # the drafter's cache: the prompt, then the upper layers of committed positions
        self.prompt: list[int] = []
        self.pending: list[torch.Tensor] = []  # (n, H) states h of committed positions not yet in own cache
        self.forward_passes = 0

    def begin(self, prompt: list[int], params: SamplingParams) -> None:
        self.own.reset()
        self.prompt = list(prompt)
        self.pending = []
        self.forward_passes = 0
        if self.vocab is not None:
            self.vocab.begin(prompt)

    def update(self, feedback: DraftFeedback) -> None:
        if feedback.target_hidden is None:  # no states this pass: nothing more to draft from in this request
            self.pending = []
            self.prompt = []
            return
        rows = [0] + [1 + n for n in feedback.accepted_nodes]  # the root and the accepted nodes, now committed
        self.pending.append(feedback.target_hidden[0, rows].detach().float())

    def _catch_up_prompt(self) -> None:
        """At the first draft: the prompt but its last token (whose state came with the first pass) goes
        through the whole model into the drafter's cache."""
        if self.own.length == 0 and len(self.prompt) > 1:
            self.own.forward(torch.tensor([self.prompt[:-1]], dtype=torch.long), logits_to_keep=1, prompt=True)
            self.forward_passes += 1

    def propose(self, ctx: DraftContext) -> DraftTree | None:
        if not self.pending or not self.prompt:
            return None
        paths = self.paths[: min(self.max_nodes, ctx.max_tokens)]
        if not paths:
            return None
        self._catch_up_prompt()
        pending = torch.cat(self.pending)  # (n, H)
        start = self.own.length
        if start + len(pending) != len(ctx.tokens) - 1:  # the cache must end just before the root
            self.pending, self.prompt = [], []
            return None
        device = module_device(self.embed)
        root = self.embed(torch.tensor([ctx.tokens[-1]], device=device)).float()  # (1, H)
        with torch.no_grad():
            pseudo = self.net.pseudo_states(pending[-1:].to(root.device), root)[0]  # (k, H)
        k = pseudo.shape[0]
        states = torch.cat([pending.to(pseudo.device), pseudo])[None]  # (1, n + k, H)
        positions = torch.arange(start, start + states.shape[1])[None].to(self.own.device)
        hidden = upper_layers(self.model, self.net.transfer_layer, states.to(self.own.device), positions,
                              cache=self.own.cache)
        kv_cache.crop(self.own.cache, start + len(pending))  # keep the committed positions, drop the pseudo ones
        self.pending = []
        self.forward_passes += 1
        out = hidden[0, -k:]  # (k, H): z_j's final state predicts the token at c + j
        logits = self.vocab.logits(out) if self.vocab is not None else self.lm_head(out.to(input_dtype(self.lm_head)))
        logits = logits.float()
        return grow_tree(paths, lambda depth, prefixes: logits[depth - 1].expand(len(prefixes), -1), ctx.params,
                         ctx.generator)


# ----- training -------------------------------------------------------------------------------------------

def hidden_transfer_loss_fn(net: HiddenTransferNet, target, data, prompts: list[list[int]], objective: str = "ce",
                            decay: float = 0.8, samples_per_step: int = 2, anchors: int = 24):
    """A loss for `trainer.train`: each step takes the answers of the first `samples_per_step` positions of the
    batch, about `anchors` root positions in each, and trains z_1..z_k of every root to predict the next k
    tokens (`objective` "ce": the target's tokens; "distill": its distribution at those positions), head j's
    loss weighted by decay**(j-1). `prompts[s]` are the prompt ids of answer s of `data` (same order)."""
    model = target.model
    lm_head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    device = next(model.parameters()).device
    layer, k = net.transfer_layer, net.num_heads
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    types = getattr(cfg, "layer_types", None) or []
    window = getattr(cfg, "sliding_window", None) if "sliding_attention" in types else None
    lower: dict[int, torch.Tensor] = {}  # answer -> states h (T, H) of prompt + answer (the frozen lower layers)
    if len(prompts) < data.samples:
        raise ValueError(f"{data.samples} answers but {len(prompts)} prompts")

    def states_of(s: int, ids: torch.Tensor) -> torch.Tensor:
        if s not in lower:
            with torch.no_grad():
                out = model.get_decoder()(input_ids=ids[None].to(device), output_hidden_states=True)
            lower[s] = out.hidden_states[layer][0].detach().half().cpu()
        return lower[s]

    def one(s: int, offset: int):
        a, b = int(data.starts[s]), int(data.starts[s + 1])
        answer = data.tokens[a:b]
        prompt = torch.tensor(prompts[s], dtype=torch.long)
        P, ids = len(prompt), torch.cat([prompt, answer])
        T = len(ids)
        if b - a < 2:
            return None
        h = states_of(s, ids).float()  # (T, H)
        stride = max(1, -(-(b - a - 1) // anchors))
        roots = torch.arange(offset % stride, b - a - 1, stride) + P  # root positions c (answer tokens)
        A = len(roots)
        z = net.pseudo_states(h[roots - 1].to(device), embed(ids[roots].to(device)).float())  # (A, k, H)
        q = T + A * k
        block = torch.zeros(q, q, dtype=torch.bool)
        block[:T, :T] = torch.ones(T, T, dtype=torch.bool).tril()
        pos = torch.cat([torch.arange(T), (roots[:, None] + torch.arange(k)[None]).flatten()])
        for i, c in enumerate(roots.tolist()):
            rows = slice(T + i * k, T + (i + 1) * k)
            block[rows, :c] = True  # the real positions before the root
            block[rows, rows] = torch.ones(k, k, dtype=torch.bool).tril()
        masks = attention_masks(torch.ones(1, 0, dtype=torch.bool), block[None], pos[None], window)
        masks = {name: m.to(device) for name, m in masks.items()}
        states = torch.cat([h.to(device), z.reshape(A * k, -1)])[None]
        out = upper_layers(model, layer, states, pos[None].to(device),
                           attention_mask=masks if window is not None else masks["full_attention"])
        out = out[0, T:].reshape(A, k, -1)
        labels_at = roots[:, None] + 1 + torch.arange(k)[None]  # (A, k) positions of the tokens z_j predicts
        valid = labels_at < T
        losses, accs = [], []
        for j in range(k):
            ok = valid[:, j]
            if not bool(ok.any()):
                losses.append(None), accs.append(float("nan"))
                continue
            logits = lm_head(out[ok.to(device), j].to(input_dtype(lm_head))).float()
            labels = ids[labels_at[ok, j]].to(device)
            if objective == "distill":  # f for answer token i is data.features[a + i]
                with torch.no_grad():
                    f = data.features[a + labels_at[ok, j] - P].to(device)
                    teacher = lm_head(f.to(input_dtype(lm_head))).float().softmax(-1)
                loss = F.kl_div(logits.log_softmax(-1), teacher, reduction="batchmean")
            else:
                loss = F.cross_entropy(logits, labels)
            losses.append(loss)
            accs.append(float((logits.argmax(-1) == labels).float().mean()))
        return losses, accs

    def loss_fn(idx: torch.Tensor):
        sample_of = torch.searchsorted(data.starts, idx, right=True) - 1
        chosen: list[int] = []
        for s in sample_of.tolist():
            if s not in chosen:
                chosen.append(s)
            if len(chosen) == samples_per_step:
                break
        total, weight, acc_rows = 0.0, 0.0, []
        for s in chosen:
            got = one(s, int(idx[0]))
            if got is None:
                continue
            losses, accs = got
            acc_rows.append(accs)
            for j, loss in enumerate(losses):
                if loss is not None:
                    total = total + decay ** j * loss
                    weight += decay ** j
        if not weight:  # answers too short to teach anything: a zero loss that still has a graph
            return sum(p.sum() for p in net.parameters()) * 0.0, [float("nan")] * k
        accs = [sum(r[j] for r in acc_rows if r[j] == r[j]) / max(1, sum(r[j] == r[j] for r in acc_rows))
                for j in range(k)]
        return total / weight, accs

    return loss_fn
