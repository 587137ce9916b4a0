"""Self-distillation data: the target answers prompts greedily; we keep its tokens and final hidden states.

For each response r_0..r_{L-1} we store the features f_0..f_{L-1}, where f_i is the target's final (post-norm)
hidden state at the position just before r_i (f_0 = the last prompt token), so lm_head(f_i) predicts r_i.
A draft head k is then trained to predict r_{i+k} from f_i (and, for Hydra, the embeddings of r_i..r_{i+k-1}).

Data is generated in batches (left padding, `model.generate`) and cached as safetensors shards under
`<out>/data-<key>/`, keyed by the target's fingerprint, the prompts and the generation length, so an interrupted
run resumes and a second run reuses it.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# ----- prompts ------------------------------------------------------------------------------------------

_TOPICS = ["photosynthesis", "the water cycle", "compound interest", "black holes", "the French Revolution",
           "machine learning", "plate tectonics", "vaccines", "the stock market", "climate change", "volcanoes",
           "the immune system", "renewable energy", "the internet", "supply and demand", "gravity", "DNA",
           "the Roman Empire", "inflation", "electric cars", "honey bees", "coral reefs", "sleep", "memory",
           "the moon landing", "recycling", "coffee", "chess", "jazz music", "rainbows", "earthquakes",
           "the printing press", "antibiotics", "solar panels", "bread baking", "marathon training",
           "password security", "cloud computing", "the human heart", "tides", "glaciers", "time zones"]
_CHAT = ["Explain {t} in simple terms.", "Give me three interesting facts about {t}.",
         "Write a short paragraph about {t} for a ten-year-old.", "What are the main advantages and "
         "disadvantages of {t}?", "Summarize what {t} is in two sentences.", "Why is {t} important?",
         "Write a friendly email inviting a colleague to a talk about {t}.", "What are common misconceptions "
         "about {t}?", "Describe {t} as if you were a tour guide.", "List five questions a student might "
         "ask about {t}, and answer the first one."]
_ITEMS = ["apples", "pencils", "books", "marbles", "cookies", "stickers", "tickets", "bottles", "shirts"]
_NAMES = ["Ava", "Ben", "Chloe", "Diego", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jonas", "Kira", "Leo"]


def _math(rng: random.Random) -> str:
    a, b, c = rng.randint(3, 60), rng.randint(2, 25), rng.randint(2, 9)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    forms = [
        f"{name} has {a} {item}. She buys {b} more and then gives away {c}. How many {item} does she have now? "
        "Explain step by step.",
        f"A box holds {c} {item}. How many {item} are in {b} boxes? Show your reasoning.",
        f"What is {a} times {b}, plus {c}? Work it out step by step.",
        f"{name} reads {b} pages a day. How many days does it take to read a book of {a * b} pages?",
        f"Solve for x: {c}x + {b} = {c * a + b}. Show each step.",
        f"A train travels {a * 10} km in {c} hours. What is its average speed? Explain.",
        f"{name} saves {b} dollars each week. After {c} weeks, how much has {name} saved, and how much is "
        f"left after spending {b + c} dollars?",
        f"What is {c * 10} percent of {a * 5}? Show the calculation.",
    ]
    return rng.choice(forms)


def builtin_prompts(n: int, seed: int = 0) -> list[str]:
    """n varied prompts (chat-style explanations and math word problems), deterministic for a seed.
    Written for training; none of them is a question of benchmarks/suite.jsonl (checked in the tests)."""
    rng = random.Random(seed)
    prompts, seen = [], set()
    while len(prompts) < n:
        text = _math(rng) if rng.random() < 0.45 else rng.choice(_CHAT).format(t=rng.choice(_TOPICS))
        if text not in seen or len(seen) > 5000:
            seen.add(text)
            prompts.append(text)
    return prompts


def read_prompts(path: str | Path) -> list[dict]:
    """Prompts from JSONL: each line has "prompt" (string), "turns" (first turn used) or "messages" (chat list);
    an optional "response" string is used as the answer instead of generating one."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        if "messages" in item:
            rows.append({"messages": item["messages"], "response": item.get("response")})
        elif "prompt" in item or "turns" in item:
            text = item.get("prompt") or item["turns"][0]
            rows.append({"messages": [{"role": "user", "content": text}], "response": item.get("response")})
        else:
            raise ValueError(f"{path}:{n}: expected a 'prompt', 'turns' or 'messages' field")
    return rows


# ----- generation ---------------------------------------------------------------------------------------

@dataclass
class FeatureData:
    """Responses concatenated: features (M, H) float16, tokens (M,) int64, sample start offsets (S+1,)."""

    features: torch.Tensor
    tokens: torch.Tensor
    starts: torch.Tensor

    @property
    def samples(self) -> int:
        return len(self.starts) - 1

    def ends(self) -> torch.Tensor:
        """(M,) the end offset of each row's sample."""
        lengths = self.starts[1:] - self.starts[:-1]
        return torch.repeat_interleave(self.starts[1:], lengths)

    def windows(self, idx: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The features of the `width` positions ending at each row of `idx` (B,), within its sample:
        (B, width, H), oldest first, and a (B, width) mask of the positions that exist."""
        lengths = self.starts[1:] - self.starts[:-1]
        first = torch.repeat_interleave(self.starts[:-1], lengths)[idx]  # (B,) sample start of each row
        rows = idx[:, None] - (width - 1) + torch.arange(width)[None]
        valid = rows >= first[:, None]
        return self.features[rows.clamp(min=0)], valid


def prompt_rows(data: str | Path | None, count: int | None, seed: int = 0) -> list[dict]:
    """The prompts to answer (`read_prompts` rows): the first `count` of the file `data` ('suite': the
    benchmark suite) or, without a file, `count` (default 400) built-in prompts drawn with `seed`."""
    if data:
        path = Path(__file__).resolve().parents[3] / "benchmarks" / "suite.jsonl" if data == "suite" else data
        rows = read_prompts(path)
        return rows[:count] if count else rows
    return [{"messages": [{"role": "user", "content": text}], "response": None}
            for text in builtin_prompts(count or 400, seed=seed)]


def encode_row(target, row: dict) -> list[int]:
    tok = target.tokenizer
    if target.has_chat_template:
        ids = tok.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    text = "\n".join(m["content"] for m in row["messages"])
    return [int(i) for i in tok(text)["input_ids"]]


def data_key(fingerprint: str, rows: list[dict], max_new_tokens: int) -> str:
    blob = json.dumps([fingerprint, max_new_tokens, rows], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@torch.no_grad()
def _generate_batch(target, prompts: list[list[int]], max_new_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Greedy answers of a batch; per prompt (features (L, H) float16, tokens (L,))."""
    model = target.model
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    pad = 0
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    stops = sorted(target.stop_token_ids)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                         do_sample=False, output_hidden_states=True, return_dict_in_generate=True,
                         pad_token_id=stops[0] if stops else pad, eos_token_id=stops or None,
                         temperature=None, top_p=None, top_k=None)
    new = out.sequences[:, width:].cpu()
    steps = out.hidden_states
    hidden = torch.cat([steps[0][-1][:, -1:]] + [s[-1] for s in steps[1:]], dim=1).cpu()  # (B, T, H)
    results = []
    for i in range(len(prompts)):
        row = new[i].tolist()
        length = len(row)
        for j, t in enumerate(row):
            if t in target.stop_token_ids:
                length = j + 1
                break
        length = min(length, hidden.shape[1])
        results.append((hidden[i, :length].half(), new[i, :length].clone()))
    return results


@torch.no_grad()
def _teacher_forced(target, prompt: list[int], response: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    model = target.model
    device = next(model.parameters()).device
    ids = torch.tensor([prompt + response], dtype=torch.long, device=device)
    out = model(input_ids=ids, output_hidden_states=True)
    hidden = out.hidden_states[-1][0, len(prompt) - 1: len(prompt) - 1 + len(response)].cpu()
    return hidden.half(), torch.tensor(response, dtype=torch.long)


def build_data(target, rows: list[dict], folder: str | Path, fingerprint: str, max_new_tokens: int = 160,
               batch_size: int = 8, deadline: float | None = None, progress: bool = True) -> FeatureData:
    """Generate (or reuse cached) features for `rows`; stops early at `deadline` (time.time()), keeping what
    was generated. Shards are written as they finish, so an interrupted run resumes."""
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    key = data_key(fingerprint, rows, max_new_tokens)
    folder = Path(folder) / f"data-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    batches = [rows[i: i + batch_size] for i in range(0, len(rows), batch_size)]
    bar = tqdm(total=len(rows), desc="self-distill data", unit="prompt", disable=not progress)
    for b, batch in enumerate(batches):
        shard = folder / f"shard-{b:05d}.safetensors"
        if shard.is_file():
            bar.update(len(batch))
            continue
        if deadline is not None and time.time() > deadline:
            bar.write(f"data: time budget reached after {b} of {len(batches)} batches; training on what exists")
            break
        to_generate = [r for r in batch if not r.get("response")]
        generated = iter(_generate_batch(target, [encode_row(target, r) for r in to_generate], max_new_tokens)
                         if to_generate else [])
        feats, toks, lens = [], [], []
        for r in batch:
            if r.get("response"):
                resp = [int(i) for i in target.tokenizer(r["response"], add_special_tokens=False)["input_ids"]]
                f, t = _teacher_forced(target, encode_row(target, r), resp)
            else:
                f, t = next(generated)
            feats.append(f), toks.append(t), lens.append(len(t))
        save_file({"features": torch.cat(feats), "tokens": torch.cat(toks),
                   "lengths": torch.tensor(lens, dtype=torch.long)}, str(shard))
        bar.update(len(batch))
    bar.close()
    feats, toks, lens = [], [], []
    for shard in sorted(folder.glob("shard-*.safetensors")):
        part = load_file(str(shard))
        feats.append(part["features"]), toks.append(part["tokens"]), lens.append(part["lengths"])
    if not feats:
        raise RuntimeError("no training data was generated (time budget too small?)")
    lengths = torch.cat(lens)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return FeatureData(features=torch.cat(feats), tokens=torch.cat(toks), starts=starts)
