"""Bad input to the Scorer and ``response_log_probs`` (issue 13): each is a ``ValueError`` that
names the key or argument, the required layout or range, and what came.

Before these checks a left-padded prompt and a response mask with a hole gave wrong log-probs
without a word (−2.7081 and −2.6385 against the true −2.8380 in the issue's run), an
out-of-vocabulary id gave ``IndexError: index out of range in self`` and meta tensors gave
``NotImplementedError: aten::_unique2``. The reference for the accepted layout is the model's own
forward over each row's unpadded ``prompt ++ response``, with ``log_softmax`` written here.
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from gspo_components.rollout.scoring import Scorer, response_log_probs
from gspo_components.testing.tiny import build_tiny_qwen3

VOCAB = 16


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_tiny_qwen3(
        VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, intermediate_size=64, max_position_embeddings=32, seed=0,
    ).eval()  # fmt: skip


def batch(
    prompt: list[list[int]], pmask: list[list[int]], response: list[list[int]], rmask: list[list[int]]
) -> dict[str, torch.Tensor]:
    return {
        "prompt_ids": torch.tensor(prompt),
        "prompt_mask": torch.tensor(pmask, dtype=torch.bool),
        "response_ids": torch.tensor(response),
        "response_mask": torch.tensor(rmask, dtype=torch.bool),
    }


def reference(model: torch.nn.Module, prompt: list[int], response: list[int]) -> list[float]:
    """log p(response_t | prompt, response_<t) from one unpadded forward."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    lsm = torch.log_softmax(logits, -1)
    return [float(lsm[len(prompt) - 1 + t, y]) for t, y in enumerate(response)]


GOOD = batch([[9, 10, 0, 0]], [[1, 1, 0, 0]], [[4, 5, 6, 0]], [[1, 1, 1, 0]])


def test_right_padded_rows_score_as_unpadded(model: torch.nn.Module) -> None:
    lp = response_log_probs(model, **GOOD).detach()
    expected = reference(model, [9, 10], [4, 5, 6])
    assert lp[0, :3].tolist() == pytest.approx(expected, abs=1e-5)
    assert float(lp[0, 3]) == 0.0


@pytest.mark.parametrize("fused", [True, False])
def test_left_padded_prompt_is_refused(model: torch.nn.Module, fused: bool) -> None:
    bad = batch([[0, 0, 9, 10]], [[0, 0, 1, 1]], [[4, 5, 6, 0]], [[1, 1, 1, 0]])
    with pytest.raises(
        ValueError,
        match=r"response_log_probs: 'prompt_mask' must be right-padded \(each row's valid tokens "
        r"first, then padding; no left padding and no holes\), got row 0 = \[0, 0, 1, 1\]",
    ):
        response_log_probs(model, **bad, fused=fused)


def test_response_mask_with_a_hole_is_refused(model: torch.nn.Module) -> None:
    bad = batch([[9, 10, 0, 0], [9, 11, 12, 0]], [[1, 1, 0, 0], [1, 1, 1, 0]],
                [[4, 5, 6, 0], [4, 5, 6, 7]], [[1, 1, 1, 0], [1, 0, 1, 1]])  # fmt: skip
    with pytest.raises(
        ValueError, match=r"'response_mask' must be right-padded .* got row 1 = \[1, 0, 1, 1\]"
    ):
        response_log_probs(model, **bad)


def test_scorer_names_its_keys(model: torch.nn.Module) -> None:
    """The Scorer's message names the TensorDict key it read, renamed or not."""
    bad = batch([[0, 0, 9, 10]], [[0, 0, 1, 1]], [[4, 5, 6, 0]], [[1, 1, 1, 0]])
    td = TensorDict({"pmask": bad.pop("prompt_mask"), **bad}, batch_size=[1])
    scorer = Scorer(model, in_keys={"prompt_mask": "pmask"})
    with pytest.raises(
        ValueError, match=r"Scorer: 'pmask' must be right-padded .* got row 0 = \[0, 0, 1, 1\]"
    ):
        scorer(td)


@pytest.mark.parametrize(
    ("key", "value"), [("response_ids", VOCAB), ("response_ids", 99), ("prompt_ids", -1)]
)
def test_out_of_vocabulary_ids_are_refused(model: torch.nn.Module, key: str, value: int) -> None:
    td = TensorDict({k: v.clone() for k, v in GOOD.items()}, batch_size=[1])
    td[key][0, 1] = value
    with pytest.raises(
        ValueError,
        match=rf"Scorer: '{key}' must hold token ids in \[0, {VOCAB}\) \(the model's vocabulary\) at "
        rf"valid positions, got {value} at row 0, column 1",
    ):
        Scorer(model)(td)


def test_out_of_vocabulary_ids_at_padding_are_inert(model: torch.nn.Module) -> None:
    """Padding may hold anything (engines pad with arbitrary ids): same log-probs."""
    odd = {k: v.clone() for k, v in GOOD.items()}
    odd["response_ids"][0, 3] = 10_000
    odd["prompt_ids"][0, 2:] = -7
    assert torch.equal(response_log_probs(model, **odd), response_log_probs(model, **GOOD))


def test_meta_tensors_are_refused(model: torch.nn.Module) -> None:
    meta = {k: v.to("meta") for k, v in GOOD.items()}
    with pytest.raises(ValueError, match=r"response_log_probs: 'prompt_ids' is on the meta device"):
        response_log_probs(model, **meta)
    with torch.device("meta"):
        empty = build_tiny_qwen3(VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=32, intermediate_size=64)  # fmt: skip
    assert next(empty.parameters()).device.type == "meta"
    with pytest.raises(
        ValueError, match=r"response_log_probs: the model's parameters are on the meta device"
    ):
        response_log_probs(empty, **GOOD)


def test_float_ids_are_refused(model: torch.nn.Module) -> None:
    bad = dict(GOOD, response_ids=GOOD["response_ids"].float())
    with pytest.raises(ValueError, match=r"'response_ids' must hold integer token ids, got torch.float32"):
        response_log_probs(model, **bad)
