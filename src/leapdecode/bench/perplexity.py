"""`leapdecode perplexity`: a model's perplexity over a long text, fed block by block through its KV cache.

The text (a file, or the built-in one) is tokenized and cut to `--max-tokens`; its tokens are fed in blocks of
`--chunk` (64) through a `CausalLM` whose cache is the one chosen (`--kv-cache none|quant|gear|hf-quanto`), and
the negative log-likelihood of every next token is summed. Fed this way every prediction reads the cache as
decoding would: on a compressed cache, the older tokens through their compressed blocks. The bytes the cache
holds at the end (its real tensors) are reported next to what a bfloat16 cache of the same context takes.

With `--agreement N`, each compressed cache also generates N tokens greedily (`ar`) after the text, and the
tokens are compared with those of the uncompressed cache (position by position, and the texts by ROUGE-L); with
`--agreement-prompts K`, after each of K consecutive slices of the text of `--max-tokens` tokens (the first is
the perplexity text); with `--agreement-task summarize`, each slice is a chat request to summarize it instead of
a text to continue (a long-prompt question). The bytes each cache holds after decoding are reported too (each
pass is committed, so the compressed cache holds its window exactly: 64 to 127 tokens).

The built-in text is Python's own documentation topics (`pydoc_data.topics`, the pages `help()` shows: the
language reference), its topics joined in sorted order: it ships with every Python, needs no download, and is
the same for one Python version.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field

import torch

from leapdecode.errors import InvalidSettingError
from leapdecode.kv_compress import KINDS, KVSettings, kv_bytes, make_cache_factory, options_of

BUILTIN = "python-docs"


def builtin_text() -> tuple[str, str]:
    """(description, text): Python's documentation topics, sorted by topic name."""
    import platform

    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return f"pydoc_data.topics (Python {platform.python_version()}, topics in sorted order)", text


@dataclass
class PerplexityResult:
    kv: str  # the cache's label
    tokens: int  # tokens fed
    nll: float  # mean negative log-likelihood (nats) over tokens[1:]
    kv_bytes: int  # bytes the cache held after the whole text
    bf16_bytes: int  # a bfloat16 cache of the same context
    decoded: list["Generated"] = field(default_factory=list)  # the --agreement runs, one per prompt

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def compared(self) -> list["Generated"]:
        return [g for g in self.decoded if g.agreement is not None]

    @property
    def agreement(self) -> float | None:
        """Mean over the prompts of the generated tokens equal to the uncompressed cache's, position by position."""
        return sum(g.agreement for g in self.compared) / len(self.compared) if self.compared else None

    @property
    def same_prefix(self) -> float | None:
        """Mean over the prompts of the tokens generated before the first difference."""
        return sum(g.same_prefix for g in self.compared) / len(self.compared) if self.compared else None

    @property
    def rouge_l(self) -> float | None:
        """Mean over the prompts of the generated text's ROUGE-L against the uncompressed cache's."""
        return sum(g.rouge_l for g in self.compared) / len(self.compared) if self.compared else None

    @property
    def gap(self) -> float | None:
        """Median over the prompts that differ of the uncompressed cache's logit gap between its two most likely
        tokens where the greedy paths part: small gaps mean the paths parted at near-ties."""
        gaps = sorted(g.gap for g in self.compared if g.gap is not None)
        return gaps[len(gaps) // 2] if gaps else None

    @property
    def identical(self) -> int:
        """Prompts whose generated tokens all equal the uncompressed cache's."""
        return sum(g.agreement == 1.0 for g in self.compared)

    @property
    def decoded_share(self) -> float | None:
        """Bytes held after generating (the first prompt), against a bfloat16 cache of that context."""
        return self.decoded[0].kv_bytes / self.decoded[0].bf16_bytes if self.decoded else None


def _bf16_bytes(model, tokens: int) -> int:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers * 2 * heads * head_dim * tokens * 2


def perplexity(target, ids: list[int], settings: KVSettings | None, chunk: int = 64) -> PerplexityResult:
    """Mean NLL of `ids[1:]` fed in blocks of `chunk` through a cache made from `settings` (None: plain)."""
    from leapdecode.lm import CausalLM

    if len(ids) < 2:
        raise InvalidSettingError("the text has fewer than 2 tokens")
    lm = CausalLM(target.model, cache_factory=make_cache_factory(settings, target.model))
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids), chunk):
            block = torch.tensor([ids[start:start + chunk]], dtype=torch.long)
            logits = lm.forward(block).float()[0]  # (T, V): row i predicts ids[start + i + 1]
            lm.crop(lm.length)  # commit the pass, as decoding does (a compressed cache settles to its window)
            nxt = torch.tensor(ids[start + 1:start + 1 + block.shape[1]], dtype=torch.long, device=logits.device)
            rows = logits[: nxt.shape[0]]
            total += torch.nn.functional.cross_entropy(rows, nxt, reduction="sum").item()
            count += nxt.shape[0]
    label = settings.label if settings is not None else "none"
    return PerplexityResult(label, len(ids), total / count, kv_bytes(lm.cache), _bf16_bytes(target.model, len(ids)))


@dataclass
class Generated:
    """Tokens generated greedily after the text, compared with the uncompressed cache's (None for that one)."""

    tokens: list[int]
    agreement: float | None  # equal tokens, position by position
    same_prefix: int | None  # tokens before the first difference
    rouge_l: float | None  # ROUGE-L of the decoded text against the uncompressed cache's
    gap: float | None  # at the first difference: the uncompressed cache's top-1 minus top-2 logit (None: no difference)
    kv_bytes: int  # bytes the cache held after generating
    bf16_bytes: int  # a bfloat16 cache of that context (text + generated tokens)


def top_two_gaps(target, ids: list[int], tokens: list[int]) -> list[float]:
    """At each of `tokens` (generated after `ids`), the uncompressed cache's top-1 minus top-2 logit, from one pass."""
    from leapdecode.lm import CausalLM

    lm = CausalLM(target.model)
    with torch.inference_mode():
        logits = lm.forward(torch.tensor([list(ids) + list(tokens)]), logits_to_keep=len(tokens) + 1, prompt=True)
    top = logits[0, :len(tokens)].float().topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).tolist()


def agreement(target, ids: list[int], settings: KVSettings | None, reference: list[int] | None,
              new_tokens: int, gaps: list[float] | None = None) -> Generated:
    """Generate `new_tokens` greedily (ar) after `ids` on the cache of `settings`; compare with `reference` (whose
    top-two logit gaps, `top_two_gaps`, give the gap where the two parted)."""
    from leapdecode import Decoder
    from leapdecode.bench.quality import rouge_l

    decoder = Decoder(target, "ar", **options_of(settings))
    out = decoder.generate(list(ids), max_new_tokens=new_tokens).token_ids
    held, bf16 = kv_bytes(decoder.lm.cache), _bf16_bytes(target.model, decoder.lm.length)
    if reference is None:
        return Generated(out, None, None, None, None, held, bf16)
    n = min(len(out), len(reference))
    same = sum(a == b for a, b in zip(out, reference)) / max(1, n)
    prefix = next((i for i, (a, b) in enumerate(zip(out, reference)) if a != b), n)
    text = target.tokenizer.decode(out, skip_special_tokens=True)
    gap = gaps[prefix] if gaps is not None and prefix < n else None
    return Generated(out, same, prefix, rouge_l(text, target.tokenizer.decode(reference, skip_special_tokens=True)),
                     gap, held, bf16)


TASKS = ("continue", "summarize")
SUMMARIZE = "Summarize the following text in a few sentences.\n\n"


def agreement_prompt(target, ids: list[int], task: str) -> list[int]:
    """The prompt generated after: the slice itself (`continue`), or a user turn in the model's chat template
    asking for a summary of the slice's text (`summarize`, a long-prompt question)."""
    from leapdecode import Decoder

    if task == "continue":
        return list(ids)
    if not target.has_chat_template:
        raise InvalidSettingError(f"--agreement-task summarize needs a chat model; {target.name} has no chat template")
    messages = [{"role": "user", "content": SUMMARIZE + target.tokenizer.decode(ids)}]
    return Decoder(target, "ar").encode_prompt(messages)


def settings_list(kinds: str, bits: str, base: KVSettings) -> list[KVSettings | None]:
    """--kv-cache none,quant,gear x --kv-bits 4,2 -> the settings to run (none once, first)."""
    names = [k.strip() for k in kinds.split(",") if k.strip()]
    unknown = [k for k in names if k not in KINDS]
    if unknown or not names:
        raise InvalidSettingError(f"--kv-cache takes a comma-separated list of {', '.join(KINDS)}")
    try:
        widths = [int(b) for b in bits.split(",") if b.strip()]
    except ValueError:
        raise InvalidSettingError(f"--kv-bits takes a comma-separated list of 2, 4, 8, got {bits!r}") from None
    out: list[KVSettings | None] = [None] if "none" in names else []
    for b in widths:
        for k in names:
            if k != "none":
                out.append(base.with_kind(k, b))
    return out


def add_parser(subparsers) -> argparse.ArgumentParser:
    from leapdecode.arguments import add_model_arguments

    p = subparsers.add_parser(
        "perplexity",
        help="perplexity of a model over a long text, through a (compressed) KV cache",
        description="Feed a text block by block through the model's KV cache and report perplexity and the "
        "bytes the cache holds. Compressed caches (quant, gear, hf-quanto) are lossy.",
    )
    add_model_arguments(p)
    p.add_argument("--text", default=BUILTIN, metavar="FILE",
                   help=f"a UTF-8 text file, or {BUILTIN!r} (Python's documentation topics, shipped with Python; "
                   "the default)")
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens of the text to use (default 2048)")
    p.add_argument("--chunk", type=int, default=64, help="tokens fed per model call (default 64)")
    p.add_argument("--kv-cache", default="none,quant,gear",
                   help=f"comma-separated caches to compare: {', '.join(KINDS)} (default none,quant,gear; "
                   "hf-quanto is transformers' QuantizedCache, needs optimum-quanto)")
    p.add_argument("--kv-bits", default="4", help="comma-separated bit widths, e.g. 4,2 (default 4)")
    d = KVSettings()
    p.add_argument("--kv-rank", type=int, default=None, help="gear: rank per head and block (default by bits: 2 "
                   "at 2 bits, else 0)")
    p.add_argument("--kv-outliers", type=float, default=None,
                   help="gear: fraction of entries kept apart in float16 (default by bits: 0.03 at 2, 0.005 at 4)")
    p.add_argument("--kv-window", type=int, default=d.window, help=f"tokens always exact (default {d.window})")
    p.add_argument("--kv-block", type=int, default=d.block, help=f"tokens compressed together (default {d.block})")
    p.add_argument("--kv-group", type=int, default=None, help="entries per quantization group: a key channel's "
                   "consecutive tokens, a value token's channels (default 16 at 2 bits, else 64)")
    p.add_argument("--kv-sink", type=int, default=d.sink, help=f"first tokens kept exact, the attention sink "
                   f"(default {d.sink})")
    p.add_argument("--kv-scale-bits", type=int, default=d.scale_bits, choices=(8, 16),
                   help=f"scale and zero point per group: 8 (a byte each, double quantization) or 16 (float16) "
                   f"(default {d.scale_bits})")
    p.add_argument("--agreement", type=int, default=0, metavar="N",
                   help="also generate N tokens greedily after the text and compare them with the uncompressed "
                   "cache's (default 0: no)")
    p.add_argument("--agreement-prompts", type=int, default=1, metavar="K",
                   help="with --agreement: generate after each of K consecutive slices of the text of --max-tokens "
                   "tokens (default 1: the perplexity text)")
    p.add_argument("--agreement-task", choices=TASKS, default="continue",
                   help="with --agreement: continue each slice as it is (default), or answer a chat request to "
                   "summarize it (a long-prompt question, in the model's chat template)")
    p.set_defaults(func=cmd_perplexity)
    return p


def _read_text(spec: str) -> tuple[str, str]:
    if spec == BUILTIN:
        return builtin_text()
    from pathlib import Path

    path = Path(spec).expanduser()
    if not path.is_file():
        raise InvalidSettingError(f"--text {spec}: no such file")
    return str(path), path.read_text(encoding="utf-8")


def format_table(results: list[PerplexityResult]) -> str:
    base = next((r for r in results if r.kv == "none"), None)
    header = ["kv cache", "perplexity", "vs none", "KV bytes", "vs bf16", "agreement", "same prefix", "ROUGE-L",
              "identical", "gap at 1st diff", "vs bf16 after"]
    lines = [header]
    for r in results:
        lines.append([
            r.kv, f"{r.perplexity:.3f}",
            f"{100 * (r.perplexity / base.perplexity - 1):+.2f}%" if base is not None else "-",
            f"{r.kv_bytes / 2**20:.2f} MiB", f"{100 * r.kv_bytes / r.bf16_bytes:.1f}%",
            "-" if r.agreement is None else f"{r.agreement:.3f}",
            "-" if r.same_prefix is None else f"{r.same_prefix:.1f}",
            "-" if r.rouge_l is None else f"{r.rouge_l:.3f}",
            "-" if r.agreement is None else f"{r.identical}/{len(r.compared)}",
            "-" if r.gap is None else f"{r.gap:.3f}",
            "-" if r.decoded_share is None else f"{100 * r.decoded_share:.1f}%",
        ])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = []
    for n, row in enumerate(lines):
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def cmd_perplexity(args: argparse.Namespace) -> int:
    from leapdecode import load
    from leapdecode.loading import resolve_device

    base = KVSettings(rank=args.kv_rank, outliers=args.kv_outliers, window=args.kv_window, block=args.kv_block,
                      group=args.kv_group, scale_bits=args.kv_scale_bits, sink=args.kv_sink)
    runs = settings_list(args.kv_cache, args.kv_bits, base)
    if args.max_tokens < 2 or args.chunk < 1:
        raise InvalidSettingError("--max-tokens must be at least 2 and --chunk at least 1")
    if args.agreement < 0 or args.agreement_prompts < 1:
        raise InvalidSettingError("--agreement must be at least 0 and --agreement-prompts at least 1")
    source, text = _read_text(args.text)
    load_kwargs = {"device": resolve_device(args.device), "weights": args.weights}
    target = load(args.model, **load_kwargs)
    every = target.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = every[: args.max_tokens]
    prompts = [every[i * len(ids):(i + 1) * len(ids)] for i in range(args.agreement_prompts)] if args.agreement else []
    if prompts and len(prompts[-1]) < len(ids):
        raise InvalidSettingError(f"the text holds {len(every)} tokens: fewer than {args.agreement_prompts} prompts "
                                  f"of {len(ids)}")
    prompts = [agreement_prompt(target, p, args.agreement_task) for p in prompts]
    print(f"perplexity of {target.name} over {len(ids)} tokens of {source}, fed {args.chunk} at a time",
          file=sys.stderr)
    results, references, gaps = [], [None] * len(prompts), [None] * len(prompts)
    for settings in runs:
        result = perplexity(target, ids, settings, args.chunk)
        if settings is None or settings.kind != "hf-quanto":  # (decoding needs rollback, QuantizedCache lacks it)
            for n, prompt in enumerate(prompts):
                result.decoded.append(agreement(target, prompt, settings, references[n], args.agreement, gaps[n]))
                if settings is None:
                    references[n] = result.decoded[-1].tokens
                    gaps[n] = top_two_gaps(target, prompt, references[n])
        results.append(result)
        extra = ""
        if result.agreement is not None:
            extra = (f", agreement {result.agreement:.3f} (same prefix {result.same_prefix:.1f}, ROUGE-L "
                     f"{result.rouge_l:.3f}, identical {result.identical}/{len(result.compared)}, logit gaps where "
                     f"they part {[None if g.gap is None else round(g.gap, 3) for g in result.compared]})")
        if result.decoded:
            extra += f", {100 * result.decoded_share:.1f}% of bf16 after {args.agreement} generated tokens"
        print(f"  {result.kv}: perplexity {result.perplexity:.3f}, KV bytes {result.kv_bytes} "
              f"({100 * result.kv_bytes / result.bf16_bytes:.1f}% of bf16){extra}", file=sys.stderr)
    runtime = getattr(target, "runtime", None)
    weights = f" ({runtime.describe()})" if hasattr(runtime, "describe") else ""
    print(f"model {target.name}{weights}, {len(ids)} tokens of {source}, fed {args.chunk} at a time")
    print(format_table(results))
    return 0
