"""Fine-tuning batches: padding, mixup / cutmix targets, RoBERTa's sentence-pair input."""

from __future__ import annotations

import numpy as np
import torch

from d2v2.engine.finetune.data import LabelledCollater, Mixing, mix_batch, pad_batch, split_indices
from d2v2.engine.finetune.labelled_text import TextExamples
from d2v2.engine.finetune.tasks import encode_examples


def test_pad_batch_marks_the_padding():
    source, padding = pad_batch([torch.ones(3), torch.ones(5)], 0.0)
    assert source.tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert padding.tolist() == [[False] * 3 + [True] * 2, [False] * 5]
    assert pad_batch([torch.ones(4), torch.ones(4)], 0.0)[1] is None  # nothing to mask


def test_mixup_and_cutmix_targets_are_distributions_matching_the_mix():
    images = torch.stack([torch.full((3, 8, 8), float(i)) for i in range(4)])
    labels = torch.tensor([0, 1, 2, 3])
    for cutmix in (0.0, 1.0):
        mixing = Mixing(mixup=0.0 if cutmix else 0.8, cutmix=cutmix, prob=1.0, switch_prob=0.5, smoothing=0.1, num_classes=4)
        mixed, target = mix_batch(images, labels, mixing, np.random.default_rng(3))
        torch.testing.assert_close(target.sum(-1), torch.ones(4))
        # sample 0 is mixed with sample 3 (the batch reversed): its pixel mean tells lam, so does its target
        lam = 1 - mixed[0].mean().item() / 3.0
        off = 0.1 / 4
        assert abs(target[0, 0].item() - (lam * (0.9 + off) + (1 - lam) * off)) < 1e-5
    same = mix_batch(images, labels, mixing, np.random.default_rng(3))
    torch.testing.assert_close(same[0], mix_batch(images, labels, mixing, np.random.default_rng(3))[0])  # seeded


def test_collater_gives_labels_or_targets():
    items = [{"source": torch.zeros(3, 4, 4), "label": i, "epoch": 0, "batch": 5} for i in range(2)]
    plain = LabelledCollater(0)(items)
    assert plain["label"].tolist() == [0, 1] and plain["source"].shape == (2, 3, 4, 4) and plain["batch"] == 5
    mixed = LabelledCollater(0, mixing=Mixing(0.8, 0.0, 1.0, 0.5, 0.0, 2))(items)
    assert "label" not in mixed and mixed["target"].shape == (2, 2)
    regression = LabelledCollater(0, pad_value=1)([{"source": torch.tensor([0, 5, 2]), "label": 0.5}])
    assert regression["label"].dtype == torch.float32


def test_split_indices_hold_out_a_fixed_fraction():
    train, valid = split_indices(100, 0.2, seed=0)
    assert len(valid) == 20 and not set(train) & set(valid) and len(train) + len(valid) == 100
    assert np.array_equal(valid, split_indices(100, 0.2, seed=0)[1])


class _Tokenizer:
    """Whitespace tokens as ids, with RoBERTa's special tokens."""

    class _Encoding:
        def __init__(self, ids):
            self.ids = ids

    def token_to_id(self, token):
        return {"<s>": 0, "<pad>": 1, "</s>": 2}.get(token)

    def encode_batch(self, texts, add_special_tokens=False):
        return [self._Encoding([10 + len(w) for w in t.split()]) for t in texts]


def test_sentence_pairs_as_roberta_reads_them_cut_to_fit():
    examples = TextExamples(["a bb", "a " * 20], ["ccc", "d"], [0, 1], ["0", "1"])
    first, long = encode_examples(examples, _Tokenizer(), max_tokens=10)
    assert first == [0, 11, 12, 2, 2, 13, 2]  # <s> a </s></s> b </s>
    assert len(long) == 10 and long[:1] == [0] and long[-3:] == [2, 11, 2]  # the longer text was cut
