"""Metric functions against tables computed by hand (every expected number below is worked out in a comment)."""

from types import SimpleNamespace

import pytest
import torch

from sparsevl.classify.train import retrieval_metrics
from sparsevl.eval.metrics import binary_metrics, exact_match_by_type, normalize_answer, pope_metrics, yes_or_no
from sparsevl.eval.run import format_metrics


def test_normalize_answer_strips_case_space_and_final_periods():
    assert normalize_answer("  Red. ") == "red"
    assert normalize_answer("Circle . ") == "circle"
    assert normalize_answer("top left..") == "top left"
    assert normalize_answer("3.5") == "3.5"  # an inner period stays


@pytest.mark.parametrize("text, reading", [
    ("yes", "yes"), ("Yes.", "yes"), ("Yes, there is a cat.", "yes"), ("No", "no"), ("no.", "no"),
    ("No, there is not.", "no"), ("There is no cat", "no"), ("I do not see one", "no"),
    ("There is a dog. No cat.", "yes"),  # only the first sentence counts
    ("not,", "no"),  # commas are removed before splitting
    ("not\tsure", "yes"), ("There is\nno cat", "yes"),  # words are split at spaces only, as POPE does
    ("nothing", "yes"), ("Nope", "yes"), ("maybe", "yes"), ("", "yes"),  # POPE reads anything else as yes
])
def test_yes_or_no_is_popes_reading(text, reading):
    assert yes_or_no(text) == reading


def test_exact_match_by_type_hand_table():
    rows = [
        {"question_type": "colour", "prediction": "Red.", "answer": "red"},  # hit
        {"question_type": "colour", "prediction": "blue", "answer": "red"},  # miss
        {"question_type": "shape", "prediction": " Circle ", "answer": "circle"},  # hit
        {"question_type": "count", "prediction": "3", "answer": "3"},  # hit
        {"question_type": "count", "prediction": "three", "answer": "3"},  # miss
        {"question_type": "count", "prediction": "4.", "answer": "4"},  # hit
        {"prediction": "x", "answer": "X"},  # hit, no type
    ]
    assert exact_match_by_type(rows) == {
        "colour": {"accuracy": 0.5, "count": 2}, "shape": {"accuracy": 1.0, "count": 1},
        "count": {"accuracy": pytest.approx(2 / 3), "count": 3}, "unknown": {"accuracy": 1.0, "count": 1},
        "overall": {"accuracy": pytest.approx(5 / 7), "count": 7}}


# prediction, gold -> outcome (positive = yes)
POPE_TABLE = [("Yes.", "yes"),  # TP
              ("Yes, there is.", "no"),  # FP
              ("No, there is not.", "yes"),  # FN
              ("no", "no"),  # TN
              ("There is a dog. No cat.", "Yes"),  # TP (first sentence only)
              ("not really", "no"),  # TN
              ("yes", "No")]  # FP
# TP 2, FP 2, FN 1, TN 2: precision 2/4, recall 2/3, F1 2PR/(P+R) = 4/7, accuracy 4/7, yes-ratio 4/7


def test_binary_metrics_hand_table():
    predictions, answers = zip(*POPE_TABLE)
    got = binary_metrics(list(predictions), list(answers))
    assert got == {"accuracy": pytest.approx(4 / 7), "precision": pytest.approx(0.5), "recall": pytest.approx(2 / 3),
                   "f1": pytest.approx(4 / 7), "yes_ratio": pytest.approx(4 / 7), "count": 7}


def test_binary_metrics_edge_cases():
    # no yes predicted: precision and F1 are 0 by convention (not a division by zero); recall 0 of 1
    assert binary_metrics(["no", "no"], ["yes", "no"]) == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0,
                                                           "f1": 0.0, "yes_ratio": 0.0, "count": 2}
    # no gold positive: recall 0 by convention; one FP
    assert binary_metrics(["yes", "no"], ["no", "no"]) == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0,
                                                           "f1": 0.0, "yes_ratio": 0.5, "count": 2}
    assert binary_metrics([], []) == {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                                      "yes_ratio": 0.0, "count": 0}
    assert binary_metrics(["yes"], ["yes"])["yes_ratio"] == 1.0
    # all right: P = R = F1 = 1
    assert binary_metrics(["yes", "no", "yes"], ["yes", "no", "yes"])["f1"] == 1.0


def test_pope_metrics_groups_by_kind_and_overall():
    rows = [{"pope_kind": "random", "prediction": "yes", "answer": "yes"},  # TP
            {"pope_kind": "random", "prediction": "yes", "answer": "no"},  # FP
            {"pope_kind": "adversarial", "prediction": "no", "answer": "no"},  # TN
            {"prediction": "no", "answer": "yes"}]  # FN, no kind
    got = pope_metrics(rows)
    assert set(got) == {"random", "adversarial", "unknown", "overall"}
    assert got["random"] == {"accuracy": 0.5, "precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3),
                             "yes_ratio": 1.0, "count": 2}
    assert got["adversarial"]["accuracy"] == 1.0 and got["adversarial"]["yes_ratio"] == 0.0
    # overall TP 1, FP 1, TN 1, FN 1: everything 0.5
    assert got["overall"] == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5,
                              "count": 4}


def test_format_metrics_prints_each_row():
    metrics = {"qa": {"overall": {"accuracy": 5 / 7, "count": 7}},
               "pope": {"random": {"accuracy": 0.5, "precision": 0.25, "recall": 1.0, "f1": 0.4, "yes_ratio": 0.75,
                                   "count": 4}}}
    assert format_metrics(metrics).splitlines() == [
        "QA  overall      accuracy 0.714  (n=7)",
        "POPE random      acc 0.500  P 0.250  R 1.000  F1 0.400  yes 0.750  (n=4)"]


class TableModel:
    """Embeddings that make image i x caption j similarity equal SIMS[i][j] (images one-hot, captions = columns)."""

    def __init__(self, sims: torch.Tensor):
        self.sims = sims
        self.config = SimpleNamespace(max_text_len=4)

    def encode_images(self, images):
        return torch.eye(self.sims.shape[0])[images[:, 0, 0, 0].long()], None

    def encode_texts(self, input_ids, attention_mask):
        return self.sims.T[input_ids[:, 0]], None


def caption_ids(texts, **_):
    ids = torch.tensor([[int(text)] for text in texts])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_recall_at_k_hand_table():
    # 12 images, 13 captions: image 0 owns captions 0 and 12, image i (1..11) owns caption i.
    # Image i's own caption sits at rank RANK[i] of its row (1 = most similar); for image 0, caption 12 at rank 7.
    ranks = [3, 1, 1, 2, 5, 6, 10, 11, 1, 12, 4, 13]
    num_images, num_captions = 12, 13
    sims = torch.zeros(num_images, num_captions)
    for i, rank in enumerate(ranks):
        order = [j for j in range(num_captions) if j not in (i, 12)]  # the others, most similar first
        order.insert(rank - 1, i)
        if i == 0:
            order.insert(6, 12)  # image 0's second caption at rank 7
        elif i != 12:
            order.append(12)
        for position, caption in enumerate(order):
            sims[i, caption] = 100.0 - position + 0.001 * i  # + 0.001 i: no ties within a column
    images = torch.arange(num_images).float()[:, None, None, None].expand(-1, 3, 2, 2)
    split = SimpleNamespace(images=images, captions=[["0", "12"]] + [[str(i)] for i in range(1, 12)])
    got = retrieval_metrics(TableModel(sims), split, caption_ids, batch_size=5)
    # i2t: image hit at k if its best own caption has rank <= k. Best ranks: 3, 1, 1, 2, 5, 6, 10, 11, 1, 12, 4, 13
    assert got["i2t_recall@1"] == pytest.approx(3 / 12)  # images 1, 2, 8
    assert got["i2t_recall@5"] == pytest.approx(7 / 12)  # + 0, 3, 4, 10
    assert got["i2t_recall@10"] == pytest.approx(9 / 12)  # + 5, 6
    # t2i: rank of caption j's image within column j, by the obvious loop
    owner = [0] + list(range(1, 12)) + [0]
    t2i_rank = [int((sims[:, j] > sims[owner[j], j]).sum()) + 1 for j in range(num_captions)]
    for k in (1, 5, 10):
        assert got[f"t2i_recall@{k}"] == pytest.approx(sum(r <= k for r in t2i_rank) / num_captions)
    assert got["t2i_recall@1"] < got["t2i_recall@10"]  # the table separates the cut-offs
