"""The judge rule (Judge Decoding, Bachmann et al. 2025), lossy: a linear head on the target's final
(post-norm) hidden state at a drafted token's own position, which the verification pass already computes,
scores whether that token is acceptable even though it is not the target's own choice; the token is kept
when sigmoid(w . h + b) > threshold. Threshold 1 never admits (exact verification).

A judge is trained by `leapdecode train-judge` (`training/judge.py`) and saved as a folder with
`judge.safetensors` (weight (1, H), bias (1,)) and `judge.json` (the target's fingerprint, hidden size, how
the labels were made); `load_judge` refuses a judge trained for another model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import InvalidSettingError
from .relaxed import AcceptanceRule

WEIGHTS = "judge.safetensors"
CONFIG = "judge.json"


class JudgeRule(AcceptanceRule):
    name = "judge"
    needs_hidden = True

    def __init__(self, head: torch.nn.Linear, threshold: float = 0.5):
        if not 0.0 <= float(threshold) <= 1.0:
            raise ValueError(f"judge: threshold must be in [0, 1], got {threshold}")
        self.head, self.threshold = head, float(threshold)
        self.exact = self.threshold >= 1.0
        self._hidden: torch.Tensor | None = None
        self._scores: dict[int, float] = {}

    def bind(self, hidden: torch.Tensor | None) -> None:
        """This pass's final hidden states (N+1, H): row i+1 at node i's own position."""
        self._hidden, self._scores = hidden, {}

    def score(self, node: int) -> float:
        """The judge's probability that node `node`'s token is acceptable (0 without hidden states)."""
        if self._hidden is None or not 0 <= node < self._hidden.shape[0] - 1:
            return 0.0
        if node not in self._scores:
            h = self._hidden[node + 1].float()
            self._scores[node] = float(torch.sigmoid(self.head(h.to(self.head.weight.device))))
        return self._scores[node]

    def admits_greedy(self, p, token, node=-1) -> bool:
        return self.score(node) > self.threshold

    def admits_sampled(self, p, q, token, u, gamma=1.0, node=-1) -> bool:
        return self.score(node) > self.threshold

    def describe(self) -> str:
        return f"judge(threshold={self.threshold:g})"


def save_judge(folder: str | Path, head: torch.nn.Linear, config: dict) -> Path:
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"weight": head.weight.detach().float().cpu().contiguous(),
               "bias": head.bias.detach().float().cpu().contiguous()}, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_judge(folder: str | Path, fingerprint: str, hidden_size: int) -> tuple[torch.nn.Linear, dict]:
    """The judge head in `folder`; refused when it was trained for another model (fingerprint, hidden size)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise InvalidSettingError(f"{folder} holds no judge ({CONFIG} and {WEIGHTS}); train one with "
                                  "`leapdecode train-judge`")
    config = json.loads((folder / CONFIG).read_text())
    if config.get("target_fingerprint") != fingerprint or config.get("hidden_size") != hidden_size:
        raise InvalidSettingError(f"the judge in {folder} was trained for {config.get('model', 'another model')} "
                                  f"(fingerprint {config.get('target_fingerprint')}), not for this model "
                                  f"(fingerprint {fingerprint}); train one with `leapdecode train-judge`")
    state = load_file(str(folder / WEIGHTS))
    head = torch.nn.Linear(hidden_size, 1)
    head.load_state_dict(state)
    return head.eval().requires_grad_(False), config


def _pointer(fingerprint: str) -> Path:
    from ..loading import cache_root

    return cache_root() / "judges" / f"{fingerprint}.json"


def remember_default(fingerprint: str, folder: str | Path) -> Path:
    path = _pointer(fingerprint)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"path": str(Path(folder).resolve())}) + "\n")
    return path


def default_judge(fingerprint: str, model_name: str | None = None) -> Path:
    """The judge last trained for this model; without one, an error naming the command to run."""
    path = _pointer(fingerprint)
    if path.is_file():
        folder = Path(json.loads(path.read_text())["path"])
        if (folder / CONFIG).is_file():
            return folder
    raise InvalidSettingError(f"judge needs a judge head trained for this model and none is found: train one with "
                              f"`leapdecode train-judge --model {model_name or 'MODEL'} --out runs/judge` (then it "
                              "is this model's default), or pass judge=DIR")
