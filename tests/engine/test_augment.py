"""RandAugment and random erasing of the reference's ImageNet fine-tuning (engine/data/augment.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from d2v2.engine.data import augment, images


def photo(height: int = 24, width: int = 20) -> torch.Tensor:
    """A colourful, noisy image in [0.2, 0.8]: every op at magnitude 9 has something to change."""
    across = torch.linspace(0.2, 0.8, width).expand(height, width)
    down = torch.linspace(0.2, 0.8, height)[:, None].expand(height, width)
    noise = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0))
    return (0.7 * torch.stack([across, down, 1 - across]) + 0.3 * noise).clamp(0.2, 0.8)


def test_spec_defaults_and_each_key():
    assert augment.parse_rand_augment("rand-m9") == augment.RandAugmentSpec(9, 2, 0.0, False, 0.5)
    assert augment.parse_rand_augment("rand-m9-mstd0.5-inc1") == augment.RandAugmentSpec(9, 2, 0.5, True, 0.5)
    assert augment.parse_rand_augment("rand-n3-m7-inc0-p0.8-mstd1") == augment.RandAugmentSpec(7, 3, 1.0, False, 0.8)
    assert augment.RandAugment("rand-m9-inc1").ops == augment.INCREASING
    assert augment.RandAugment("rand-m9-inc0").ops == augment.STANDARD == augment.RandAugment("rand-m9").ops
    assert len(augment.INCREASING) == len(augment.STANDARD) == 15 and set(augment.INCREASING) | set(augment.STANDARD) == set(augment.OPS)


@pytest.mark.parametrize("spec,part", [
    ("rand-m11", "'m11' must lie in 0..10"), ("auto-m9", "'auto' must be 'rand'"), ("", "'' must be 'rand'"),
    ("rand-m9-w0", "'w0' is not one of"), ("rand-m9-mstd", "'mstd' is not one of"), ("rand-n2", "gives no magnitude"),
    ("rand-m9.5", "'m9.5' needs an integer"), ("rand-m9-inc2", "'inc2' must be 0 or 1"), ("rand-m9-p1.5", "'p1.5' must lie in [0, 1]"),
    ("rand-m9-n0", "'n0' must be >= 1"),
])  # fmt: skip
def test_bad_specs_are_one_line_errors_naming_the_part(spec, part):
    with pytest.raises(ValueError) as info:
        augment.parse_rand_augment(spec, "data.rand_augment")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"data.rand_augment {spec!r}: ") and part in message
    assert "e.g. rand-m9-mstd0.5-inc1" in message


def test_rand_augment_is_a_pure_function_of_the_generator():
    img, transform = photo(), augment.RandAugment("rand-m9-mstd0.5-inc1")
    outs = [transform(img, torch.Generator().manual_seed(seed)) for seed in (1, 1, 2, 3, 4)]
    assert torch.equal(outs[0], outs[1])
    assert not any(torch.equal(outs[0], other) for other in outs[2:])
    for out in outs:
        assert out.shape == img.shape and out.dtype == torch.float32 and 0 <= out.min() <= out.max() <= 1
        assert torch.equal(out, out.mul(255).round().div(255))  # 8-bit levels, as timm's PIL ops leave them


def test_rand_augment_at_probability_zero_only_quantises():
    img = photo()
    out = augment.RandAugment("rand-m9-p0")(img, torch.Generator().manual_seed(0))
    assert torch.equal(out, img.mul(255).round().div(255))


@pytest.mark.parametrize("name", sorted(augment.OPS))
def test_each_op_keeps_the_image_and_changes_it_at_magnitude_9(name):
    pil = augment.to_pil(photo())
    base = np.asarray(pil)
    for negate in (False, True):
        out = augment.apply_op(pil, name, 9, negate, fill=(124, 116, 104))
        assert out.mode == "RGB" and out.size == pil.size
        # inc0's Solarize at 9 has threshold 230, above every pixel of the photo: nothing to invert
        if name != "Solarize":
            assert (np.asarray(out) != base).mean() > 0.3, (name, negate)
    assert augment.from_pil(pil).shape == (3, 24, 20)


@pytest.mark.parametrize("name", ["Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "SolarizeAdd",
                                  "SolarizeIncreasing", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                                  "SharpnessIncreasing"])  # fmt: skip
def test_magnitude_zero_is_the_identity_for_the_ops_that_scale_from_it(name):
    pil = augment.to_pil(photo())
    for negate in (False, True):
        assert np.array_equal(np.asarray(augment.apply_op(pil, name, 0, negate)), np.asarray(pil)), (name, negate)


def test_op_values_follow_the_magnitude():
    white = augment.to_pil(torch.ones(3, 8, 8))
    gray = augment.to_pil(torch.full((3, 8, 8), 100 / 255))
    value = lambda img: np.asarray(img)[4, 4, 0].item()  # noqa: E731
    assert value(augment.apply_op(white, "SolarizeIncreasing", 9)) == 0  # threshold 256 - 230: inverted
    assert value(augment.apply_op(gray, "SolarizeAdd", 10)) == 210  # + 110 below 128
    assert value(augment.apply_op(gray, "PosterizeIncreasing", 10)) == 0  # 4 - 4 bits kept
    assert value(augment.apply_op(gray, "PosterizeIncreasing", 5)) == 64  # 2 bits: 100 & 0b11000000
    assert value(augment.apply_op(gray, "BrightnessIncreasing", 10)) == 190  # 100 x (1 + 0.9)
    assert value(augment.apply_op(gray, "BrightnessIncreasing", 10, negate=True)) == 10  # 100 x (1 - 0.9)
    assert value(augment.apply_op(gray, "Brightness", 0)) == 10  # inc0: 0.1 at magnitude 0
    assert value(augment.apply_op(gray, "Brightness", 15)) == 190  # clipped to 10: 1.9
    # a shift of 0.45 of the side uncovers the fill colour on the far side
    shifted = np.asarray(augment.apply_op(gray, "TranslateXRel", 10, fill=(1, 2, 3)))
    assert (shifted[:, -3:] == (1, 2, 3)).all() and (shifted[:, :4] == 100).all()


def test_magnitude_noise_is_clipped_and_uniform_above_100():
    transform = augment.RandAugment("rand-m9-mstd0.5")
    assert transform.magnitude(0.0, 0.3) == 9 and transform.magnitude(1.0, 0.3) == 9.5
    assert augment.RandAugment("rand-m9").magnitude(3.0, 0.3) == 9
    assert augment.RandAugment("rand-m8-mstd101").magnitude(3.0, 0.25) == 2.0


def test_random_erasing_changes_one_rectangle_of_the_allowed_area():
    height, width = 60, 50
    img = torch.randn(3, height, width, generator=torch.Generator().manual_seed(0))
    assert torch.equal(augment.RandomErasing(0.0)(img, torch.Generator().manual_seed(0)), img)
    erase, fractions = augment.RandomErasing(1.0), []
    for seed in range(20):
        out = erase(img, torch.Generator().manual_seed(seed))
        assert torch.equal(out, erase(img, torch.Generator().manual_seed(seed))) and out.shape == img.shape
        changed = (out != img).any(0)
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        h, w = int(bottom - top), int(right - left)
        assert changed[top:bottom, left:right].all() and changed.sum() == h * w  # one full rectangle, nothing else
        slack = (h + w) / (height * width)  # rounding each side to whole pixels
        fractions.append(h * w / (height * width))
        assert 0.02 - slack <= fractions[-1] <= 1 / 3 + slack, (seed, h, w)
        assert 0.3 * 0.8 <= h / w <= 1 / 0.3 / 0.8
    assert max(fractions) - min(fractions) > 0.1  # the area is drawn, not fixed
    assert torch.equal(erase(img, torch.Generator().manual_seed(0)), erase(img.clone(), torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="must lie in"):
        augment.RandomErasing(1.5)


def test_random_erasing_at_a_quarter_erases_about_a_quarter():
    img, erase = torch.zeros(3, 32, 32), augment.RandomErasing(0.25)
    erased = sum(bool((erase(img, torch.Generator().manual_seed(s)) != 0).any()) for s in range(400))
    assert 60 <= erased <= 140


def test_pretrain_transform_applies_the_hooks_in_the_reference_order():
    img = photo(40, 50)
    plain = images.PretrainTransform(size=16)
    hooked = images.PretrainTransform(size=16, rand_augment=augment.RandAugment("rand-m9-mstd0.5-inc1"),
                                      random_erasing=augment.RandomErasing(1.0))  # fmt: skip
    calls = []
    spied = images.PretrainTransform(size=16, rand_augment=lambda x, g: calls.append(("ra", x.min().item() >= 0)) or x,
                                     random_erasing=lambda x, g: calls.append(("re", x.min().item() < 0)) or x)  # fmt: skip
    base = plain(img, torch.Generator().manual_seed(5))
    # no hooks draw nothing more: the pretraining transform is unchanged; identity hooks change nothing
    assert torch.equal(spied(img, torch.Generator().manual_seed(5)), base)
    assert calls == [("ra", True), ("re", True)]  # RandAugment on [0, 1] pixels, erasing after normalising
    out = hooked(img, torch.Generator().manual_seed(5))
    assert out.shape == base.shape and not torch.equal(out, base)
    assert torch.equal(out, hooked(img, torch.Generator().manual_seed(5)))
