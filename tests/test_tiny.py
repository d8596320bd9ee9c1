"""``tiny.supervised_step``: the loss it reports and trains is next-token cross-entropy on the
answer and ``<eos>`` tokens only (all tokens with ``prompt_loss=True``), with padding left out.

The reference below scores each row alone, unpadded, with ``log_softmax`` and a Python loop over
the trained positions; it shares nothing with the batched, padded code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from gspo_components.testing.tiny import build_char_tokenizer, build_tiny_qwen3, supervised_step

EXAMPLES = [("12+3=", "15"), ("7+8=", "15"), ("100+1=", "101"), ("9+=", "")]


def reference_loss(model: torch.nn.Module, tok, examples, prompt_loss: bool) -> float:
    terms = []
    with torch.no_grad():
        for prompt, answer in examples:
            ids = [*tok.encode(prompt + answer), tok.eos_token_id]
            log_p = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            first = 1 if prompt_loss else len(prompt)  # the first trained target position
            terms += [-float(log_p[t - 1, ids[t]]) for t in range(max(first, 1), len(ids))]
    return math.fsum(terms) / len(terms)


@pytest.mark.parametrize("prompt_loss", [False, True])
def test_supervised_step_loss_and_update(prompt_loss: bool) -> None:
    tok = build_char_tokenizer("0123456789+=")
    model = build_tiny_qwen3(len(tok), hidden_size=64, num_hidden_layers=1, intermediate_size=128, seed=0)
    expected = reference_loss(model.eval(), tok, EXAMPLES, prompt_loss)
    other = reference_loss(model, tok, EXAMPLES, not prompt_loss)
    assert abs(expected - other) > 1e-3  # the two label masks are told apart
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = supervised_step(model, tok, optimizer, EXAMPLES, prompt_loss=prompt_loss)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training
