"""Self-distillation data: the batch engine's answers are greedy decoding's, the features are the final hidden
states before each answer token, and the answer model is loaded only when a shard is missing."""
from __future__ import annotations

import torch

from leapdecode import Decoder
from leapdecode.drafters.checkpoint import target_fingerprint
from leapdecode.training.data import build_data, encode_row
from conftest import tiny_loaded


def rows(n: int):
    return [{"messages": [{"role": "user", "content": " ".join(f"w{(i * 5 + j) % 64}" for j in range(3 + i % 4))}],
             "response": None} for i in range(n)]


def test_batched_answers_are_greedy_decoding_and_features_match(arch, tmp_path):
    target = tiny_loaded(arch, scale=3.0, stop_token_ids=(7,))
    asked = []

    def answer_model():
        asked.append(1)
        return target

    prompts = rows(6)
    data = build_data(target, prompts, tmp_path, target_fingerprint(target.model), max_new_tokens=12, batch_size=4,
                      progress=False, answer_model=answer_model)
    assert data.samples == 6 and asked == [1]  # loaded once, at the first missing shard
    ar = Decoder(target, "ar")
    head = target.model.get_output_embeddings()
    for s, row in enumerate(prompts):
        answer = data.tokens[data.starts[s]: data.starts[s + 1]]
        assert answer.tolist() == ar.generate(encode_row(target, row), max_new_tokens=12).token_ids
        with torch.no_grad():  # lm_head(f_i) predicts r_i: its argmax is the answer token
            logits = head(data.features[data.starts[s]: data.starts[s + 1]].float())
        assert logits.argmax(-1).tolist() == answer.tolist()
    again = build_data(target, prompts, tmp_path, target_fingerprint(target.model), max_new_tokens=12,
                       batch_size=4, progress=False, answer_model=answer_model)
    assert asked == [1] and torch.equal(again.tokens, data.tokens)  # cached: no answer model needed
