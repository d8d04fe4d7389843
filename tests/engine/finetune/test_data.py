"""Fine-tuning data: padding, mixup / cutmix targets, RoBERTa's sentence-pair input, the image training
split's RandAugment and random erasing."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from d2v2.engine.data.augment import RandAugment
from d2v2.engine.finetune.config import resolve_finetune_config
from d2v2.engine.finetune.data import (
    FinetuneDataConfig,
    LabelledCollater,
    Mixing,
    Normalized,
    Subset,
    mix_batch,
    pad_batch,
    split_indices,
)
from d2v2.engine.finetune.labelled_text import TextExamples
from d2v2.engine.finetune.tasks import TaskContext, encode_examples, read_images


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


def _image_tree(root, splits=("train", "val")):
    rng = np.random.default_rng(0)
    for split in splits:
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")
    return root


@pytest.mark.parametrize("splits", [("train", "val"), ("train",)])
def test_image_training_split_takes_rand_augment_and_erasing_the_validation_split_does_not(tmp_path, splits):
    root = str(_image_tree(tmp_path, splits))
    ctx = TaskContext(model_cfg=SimpleNamespace(image_size=16))
    off = read_images(FinetuneDataConfig(path=root, valid_fraction=0.5), ctx)
    on = read_images(FinetuneDataConfig(path=root, valid_fraction=0.5, rand_augment="rand-m9-mstd0.5-inc1", random_erasing=1.0), ctx)
    train = on.train.dataset if isinstance(on.train, Subset) else on.train
    assert isinstance(train.transform.rand_augment, RandAugment) and train.transform.random_erasing.prob == 1.0
    assert train.transform.rand_augment.spec.increasing and train.transform.rand_augment.spec.magnitude_std == 0.5
    for seed in (3, 4):
        augmented, plain = on.train[(0, seed)]["source"], off.train[(0, seed)]["source"]
        assert augmented.shape == plain.shape == (3, 16, 16) and not torch.equal(augmented, plain)
        assert torch.equal(augmented, on.train[(0, seed)]["source"])  # a pure function of the sample's seed
    for index in range(len(on.valid)):
        assert torch.equal(on.valid[(index, 0)]["source"], off.valid[(index, 0)]["source"])


def test_digits_validation_stays_unaugmented():
    ctx = TaskContext(model_cfg=SimpleNamespace(image_size=16))
    on = read_images(FinetuneDataConfig(rand_augment="rand-m9-mstd0.5-inc1", random_erasing=1.0), ctx)
    assert isinstance(on.valid.dataset.transform, Normalized)
    assert isinstance(on.train.dataset.transform.rand_augment, RandAugment)


def test_image_recipes_carry_the_reference_augmentation():
    base = resolve_finetune_config("finetune-image-base", ["pretrained.checkpoint=/pretrained"]).data
    assert (base.rand_augment, base.random_erasing) == ("rand-m9-mstd0.5-inc1", 0.25)
    tiny = resolve_finetune_config("finetune-image-tiny", ["pretrained.checkpoint=/pretrained"]).data
    assert (tiny.rand_augment, tiny.random_erasing) == ("", 0.0)
    off = resolve_finetune_config("finetune-image-base", ["pretrained.checkpoint=/pretrained", "data.rand_augment=''"]).data
    assert off.rand_augment == ""


@pytest.mark.parametrize("fields,message", [
    ({"rand_augment": "rand-m9-x1"}, "data.rand_augment 'rand-m9-x1': 'x1' is not one of"),
    ({"rand_augment": "m9"}, "data.rand_augment 'm9': 'm9' must be 'rand'; e.g. rand-m9-mstd0.5-inc1"),
    ({"random_erasing": 1.5}, "data.random_erasing must lie in [0, 1], got 1.5"),
    ({"random_erasing": -0.1}, "data.random_erasing must lie in [0, 1]"),
])  # fmt: skip
def test_bad_augmentation_fields_are_one_line_errors(fields, message):
    with pytest.raises(ValueError) as info:
        FinetuneDataConfig(**fields)
    assert message in str(info.value) and "\n" not in str(info.value)
