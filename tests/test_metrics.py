import math

import numpy as np
import pytest
import torch

from notice.files.tables import RESULT_COLUMNS
from notice.method.metrics import normalised_effect, ratio_of_means
from notice.patching.scores import ROW_COLUMNS, Scores, answer_prob, logit_diff, result_row, scores


def test_logit_diff_by_hand():
    logits = torch.tensor([1.0, 3.0, 0.5])
    assert float(logit_diff(logits, 0, 1)) == -2.0
    assert float(logit_diff(logits, 1, 2)) == 2.5


def test_logit_diff_batched_and_float32():
    logits = torch.tensor([[1.0, 3.0], [4.0, 0.0]], dtype=torch.float16)
    out = logit_diff(logits, 0, 1)
    assert out.dtype == torch.float32
    assert out.tolist() == [-2.0, 4.0]


def test_answer_prob_is_full_vocab_softmax():
    logits = torch.tensor([0.0, math.log(3.0)])
    assert float(answer_prob(logits, 1)) == pytest.approx(0.75)
    # Mass on other tokens counts: P(τ) is not a two-way softmax.
    assert float(answer_prob(torch.tensor([0.0, 0.0, 0.0, 0.0]), 0)) == pytest.approx(0.25)


def test_normalised_effect_by_hand():
    assert normalised_effect(3.0, 1.0, 5.0) == pytest.approx(0.5)
    assert normalised_effect(1.0, 1.0, 5.0) == 0.0
    assert math.isnan(normalised_effect(2.0, 1.0, 1.0))
    out = normalised_effect(np.array([3.0, 2.0]), np.array([1.0, 1.0]), np.array([5.0, 1.0]))
    assert out[0] == pytest.approx(0.5) and math.isnan(out[1])


def test_ratio_of_means_by_hand():
    # effects 2 and 0, gaps 4 and 0: mean effect 1 / mean gap 2.
    assert ratio_of_means([3.0, 1.0], [1.0, 1.0], [5.0, 1.0]) == pytest.approx(0.5)
    assert math.isnan(ratio_of_means([1.0], [1.0], [1.0]))


def test_scores_and_result_row():
    clean = scores(torch.tensor([2.0, 0.0]), 0, 1)
    assert clean.ld == 2.0 and clean.p == pytest.approx(1 / (1 + math.exp(-2)))
    row = result_row("mlp", 3, -1, 4, "red", Scores(2.0, 0.9), Scores(-1.0, 0.2), Scores(0.5, 0.6))
    assert tuple(row) == ROW_COLUMNS
    assert row["logit_diff"] == 1.5
    assert row["prob_restoration"] == pytest.approx(0.4)
    assert (row["site"], row["layer"], row["head"], row["position"], row["token"]) == ("mlp", 3, -1, 4, "red")


def test_row_columns_complete_the_result_table():
    assert RESULT_COLUMNS[-len(ROW_COLUMNS) :] == ROW_COLUMNS
    assert ROW_COLUMNS[0] == "site"
