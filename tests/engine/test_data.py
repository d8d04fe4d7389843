"""Data readers, embedded data and the resumable loader."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from d2v2.engine.data import audio, embedded, images, text
from d2v2.engine.data.base import CorruptSample, derive_seed
from d2v2.engine.data.loader import DataPosition, EpochBatchSampler, MaskingCollater, SkipCorrupt


@pytest.fixture
def image_tree(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    return tmp_path


def test_image_folder_lists_classes_and_flat_folders(image_tree, tmp_path_factory):
    paths, labels, classes = images.list_images(image_tree)
    assert classes == ["cat", "dog"] and len(paths) == 7 and labels.count(0) == 3
    flat = tmp_path_factory.mktemp("flat")
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    assert images.list_images(flat)[2] == [flat.name]


def test_image_folder_errors_name_the_cause(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        images.list_images(tmp_path / "missing")
    with pytest.raises(ValueError, match="no images"):
        images.list_images(tmp_path)


def _modes(tmp_path) -> dict:
    """One small 1-high image per Pillow mode, with the [r, g, b] each of its pixels must decode to."""
    gray16 = np.array([[0, 16384, 65535]], np.uint16)
    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    palette.putdata([0, 1, 2])
    la = Image.fromarray(np.array([[[100, 255], [100, 0], [200, 255]]], np.uint8), "LA")
    halves = np.zeros((4, 8, 3), np.uint8)
    halves[:, :4, 0], halves[:, 4:, 2] = 255, 255
    rotated = Image.fromarray(halves)  # stored 8 wide, 4 high: red left half, blue right half
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    cases = {
        "16-bit.png": (Image.fromarray(gray16), [[0] * 3, [16384 / 65535] * 3, [1] * 3], {}),
        "palette.png": (palette, [[1, 0, 0], [0, 1, 0], [0, 0, 1]], {}),
        "la.png": (la, [[100 / 255] * 3, [1] * 3, [200 / 255] * 3], {}),  # the transparent pixel composited over white
        "cmyk.jpg": (Image.new("CMYK", (3, 1), (0, 255, 255, 0)), [[1, 0, 0]] * 3, {"quality": 100}),
        "exif.jpg": (rotated, None, {"exif": exif, "quality": 100, "subsampling": 0}),
    }
    out = {}
    for name, (img, expected, kwargs) in cases.items():
        img.save(tmp_path / name, **kwargs)
        out[name] = expected
    return out


def test_every_pillow_mode_decodes_to_its_colours(tmp_path):
    for name, expected in _modes(tmp_path).items():
        rgb = images.load_rgb(str(tmp_path / name))
        if expected is None:  # EXIF orientation 6: shown 4 wide, 8 high, the red half on top
            assert rgb.shape == (3, 8, 4), name
            assert rgb[0, 1, 1] > 0.9 > 0.1 > rgb[2, 1, 1] and rgb[2, 6, 1] > 0.9 > 0.1 > rgb[0, 6, 1], name
            continue
        want = torch.tensor(expected, dtype=torch.float32).T.reshape(3, 1, 3)  # rows of pixels -> [3, 1, W]
        assert torch.allclose(rgb, want, atol=0.02), (name, rgb.flatten().tolist())


def test_pretrain_transform_is_a_pure_function_of_the_seed(image_tree):
    ds = images.ImageFolderDataset(image_tree, images.PretrainTransform(size=16))
    a, b = ds[(0, 7)]["source"], ds[(0, 7)]["source"]
    assert a.shape == (3, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, ds[(0, 8)]["source"])
    with pytest.raises(CorruptSample, match="broken.jpg"):
        ds[(ds.paths.index(str(image_tree / "dog" / "broken.jpg")), 0)]


def test_random_resized_crop_box_stays_inside_and_covers_the_scale():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = images.random_resized_crop_box(30, 50, (0.2, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 50
        assert h * w >= 0.15 * 30 * 50


def _write_wavs(folder, lengths, rate=16_000):
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(lengths):
        sf.write(folder / f"u{i}.wav", np.random.default_rng(i).standard_normal(n).astype(np.float32) * 0.1, rate)


def test_manifest_round_trip_and_audio_reading(tmp_path):
    _write_wavs(tmp_path / "wav" / "sub", [40_000, 33_000, 16_000])
    train, valid, n = audio.write_manifest(tmp_path / "wav", tmp_path / "m")
    assert n == 3 and valid is None
    m = audio.read_manifest(train)
    assert sorted(m.sizes) == [16_000, 33_000, 40_000]
    ds = audio.AudioManifestDataset(train, min_samples=32_000)
    assert len(ds) == 2  # the 1 s file is below the reference's 2 s minimum
    wav = ds[(0, 0)]["source"]
    assert abs(float(wav.mean())) < 1e-4 and abs(float(wav.std()) - 1) < 1e-2


def test_audio_errors_name_the_cause(tmp_path):
    with pytest.raises(FileNotFoundError, match="d2v2 manifest"):
        audio.read_manifest(tmp_path / "nope.tsv")
    _write_wavs(tmp_path / "w8k", [40_000], rate=8_000)
    warnings = []
    train, _, _ = audio.write_manifest(tmp_path / "w8k", tmp_path / "m8k", warn=warnings.append)
    assert warnings and "u0.wav (8000 Hz)" in warnings[0]
    with pytest.raises(ValueError, match="8000 Hz, the recipe needs 16000 Hz"):
        audio.AudioManifestDataset(train)[(0, 0)]
    (tmp_path / "bad.tsv").write_text("/root\nfile.wav\tabc\n")
    with pytest.raises(ValueError, match="bad.tsv:2"):
        audio.read_manifest(tmp_path / "bad.tsv")
    (tmp_path / "rootless.tsv").write_text(f"{tmp_path / 'gone'}\nfile.wav\t40000\n")
    with pytest.raises(FileNotFoundError, match="gone, which does not exist"):
        audio.AudioManifestDataset(tmp_path / "rootless.tsv")


def test_crop_batch_crops_to_the_shortest():
    waves = [torch.arange(10.0), torch.arange(7.0), torch.arange(12.0)]
    out = audio.crop_batch(waves, 100, torch.Generator().manual_seed(0))
    assert out.shape == (3, 7)
    assert torch.equal(out[1], torch.arange(7.0))
    assert torch.all(out[:, 1:] - out[:, :-1] == 1)


def test_text_cache_and_blocks(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(embedded.pydoc_text()[:40_000])
    folder = text.build_token_cache(text.list_text_files(corpus), tmp_path / "cache", vocab_size=600)
    assert text.build_token_cache(text.list_text_files(corpus), tmp_path / "cache", vocab_size=600) == folder
    ds = text.TokenBlockDataset(folder, block_size=64)
    assert len(ds) > 10
    block = ds[(3, 0)]["source"]
    assert block.shape == (64,) and block.dtype == torch.int64 and int(block.max()) < ds.vocab_size
    with pytest.raises(ValueError, match="fewer than one block"):
        text.TokenBlockDataset(folder, block_size=10**9)


@pytest.mark.parametrize("damage, says", [
    ({"dtype": "O"}, "is not one d2v2 wrote"),  # numpy would read pointers out of tokens.bin
    ({"num_tokens": "many"}, "is not one d2v2 wrote"),
    ({"num_tokens": 10**6}, "not the 2000000 its meta.json names"),
    (None, "is not valid JSON"),
], ids=["object-dtype", "word", "too-many", "not-json"])  # fmt: skip
def test_a_planted_token_cache_is_refused_before_it_is_mapped(tmp_path, damage, says):
    import json

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(embedded.pydoc_text()[:20_000])
    folder = text.build_token_cache(text.list_text_files(corpus), tmp_path / "cache", vocab_size=600)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text("[" * 100_000 if damage is None else json.dumps({**meta, **damage}))
    with pytest.raises(ValueError, match=says) as info:
        text.TokenBlockDataset(folder, block_size=64)
    assert f"delete {folder} and it is rebuilt" in str(info.value)


def test_token_cache_follows_the_tokenizer_content_not_its_path(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(embedded.pydoc_text()[:20_000])
    files = text.list_text_files(corpus)
    tokenizer = tmp_path / "tokenizer.json"
    text.train_tokenizer(files, 600, tokenizer)
    small = text.build_token_cache(files, tmp_path / "cache", tokenizer_path=str(tokenizer))
    text.train_tokenizer(files, 400, tokenizer)  # replaced in place: same path, another vocabulary
    other = text.build_token_cache(files, tmp_path / "cache", tokenizer_path=str(tokenizer))
    assert other != small
    assert text.TokenBlockDataset(other, 16).vocab_size == 400 != text.TokenBlockDataset(small, 16).vocab_size


def test_embedded_digits_and_prose():
    imgs, labels = embedded.digits(size=16)
    assert imgs.shape == (1797, 3, 16, 16) and labels.unique().numel() == 10
    assert 0 <= float(imgs.min()) and float(imgs.max()) <= 1
    sentences = embedded.prose_sentences()
    assert len(sentences) > 200 and all(s[-1] in ".!?" for s in sentences)


def test_synthetic_speech_is_real_audio(tmp_path, monkeypatch):
    monkeypatch.setenv("D2V2_CACHE", str(tmp_path))
    manifest = embedded.synthetic_speech(num_utterances=3)
    m = audio.read_manifest(manifest)
    assert len(m.paths) == 3 and min(m.sizes) >= 2.5 * 16_000
    wav = audio.read_waveform(str(tmp_path / "speech-3" / "wav" / m.paths[0]))
    assert wav.std() > 0.01  # not silence


def test_sampler_resumes_mid_epoch_exactly():
    full = EpochBatchSampler(10, seed=3, batch_size=3)
    it = iter(full)
    first = [next(it) for _ in range(5)]  # crosses into the second epoch (3 batches per epoch)
    resumed = iter(EpochBatchSampler(10, seed=3, batch_size=3, start=DataPosition(epoch=0, batch=2)))
    assert [next(resumed) for _ in range(3)] == first[2:]
    assert first[3][0][2] == 1  # epoch field


def test_sampler_batches_audio_by_total_samples():
    sizes = [100, 400, 200, 300, 250, 120]
    s = EpochBatchSampler(len(sizes), seed=0, sizes=sizes, max_tokens=600)
    batches = s.epoch_batches(0)
    assert sorted(int(i) for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) * max(sizes[i] for i in b) <= 600 or len(b) == 1


def test_collater_skips_corrupt_files_and_makes_masks(image_tree):
    ds = SkipCorrupt(images.ImageFolderDataset(image_tree, images.PretrainTransform(size=16)))
    broken = ds.dataset.paths.index(str(image_tree / "dog" / "broken.jpg"))

    class HalfMasker:  # two clones per sample, 16 positions, half masked
        def make_masks(self, batch_size, source, generator):
            noise = torch.rand(batch_size * 2, 16, generator=generator)
            return noise.argsort(1).argsort(1) < 8

    collate = MaskingCollater(seed=0, masker=HalfMasker())
    batch = collate([ds[(i, derive_seed(0, i), 0, 0)] for i in (0, broken, 1)])
    assert batch["skipped"] and batch["skipped"][0].endswith("broken.jpg")
    assert batch["source"].shape == (2, 3, 16, 16) and batch["mask"].shape == (4, 16)
    assert torch.equal(batch["mask"], collate([ds[(i, derive_seed(0, i), 0, 0)] for i in (0, 1)])["mask"])
