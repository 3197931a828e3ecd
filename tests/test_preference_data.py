"""Preference data for Diffusion-DPO: JSONL / folder / datasets sources, bad rows, preparation, the
latent cache, and pairs ranked from the model's own samples."""

import io
import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _threads import one_thread  # noqa: F401
from PIL import Image

from align.core.errors import AlignError, ConfigError
from align.train.preference_data import (
    BadPreferenceRow,
    ImagePreparation,
    LatentCache,
    PreferenceColumns,
    PreferenceCounts,
    encode_pairs,
    iter_preference_pairs,
    pairs_from_rewards,
)

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255), "black": (0, 0, 0)}


def _png(colour: str, size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, COLOURS[colour]).save(buf, "PNG")
    return buf.getvalue()


def _colour(image) -> str:
    rgb = image.getpixel((0, 0))
    return next(name for name, value in COLOURS.items() if value == rgb)


def _write_images(folder):
    for name in COLOURS:
        (folder / f"{name}.png").write_bytes(_png(name))


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _row(a, b, label, caption="a cat"):
    return {"jpg_0": f"{a}.png", "jpg_1": f"{b}.png", "label_0": label, "caption": caption}


# -- JSONL and folders -----------------------------------------------------------------------------


def test_jsonl_pairs_come_winner_first_and_ties_are_dropped(tmp_path):
    _write_images(tmp_path)
    rows = [_row("red", "blue", 1), _row("red", "blue", 0.0, "a dog"), _row("green", "white", 0.5), _row("red", "green", "tie")]
    _write_jsonl(tmp_path / "metadata.jsonl", rows)
    for source in (tmp_path, tmp_path / "metadata.jsonl"):
        counts = PreferenceCounts()
        pairs = list(iter_preference_pairs(source, counts=counts))
        assert [(p.caption, _colour(p.winner), _colour(p.loser), p.row) for p in pairs] == [
            ("a cat", "red", "blue", 1),
            ("a dog", "blue", "red", 2),
        ]
        assert (counts.rows, counts.pairs, counts.ties, counts.skipped) == (4, 2, 2, 0)
        assert pairs[0].winner.mode == "RGB"


def test_custom_column_names(tmp_path):
    _write_images(tmp_path)
    _write_jsonl(tmp_path / "p.jsonl", [{"good": "red.png", "bad": "blue.png", "pref": 1, "text": "x"}])
    columns = PreferenceColumns(image_0="good", image_1="bad", label="pref", caption="text")
    (pair,) = iter_preference_pairs(tmp_path / "p.jsonl", columns=columns)
    assert (_colour(pair.winner), _colour(pair.loser), pair.caption) == ("red", "blue", "x")


def test_a_data_set_without_the_needed_columns_is_an_error_naming_them(tmp_path):
    _write_images(tmp_path)
    _write_jsonl(tmp_path / "p.jsonl", [{"jpg_0": "red.png", "jpg_1": "blue.png", "caption": "x"}])
    with pytest.raises(AlignError, match=r"has no column 'label_0'; found: 'jpg_0', 'jpg_1', 'caption'"):
        next(iter_preference_pairs(tmp_path / "p.jsonl"))


def _bad_rows(tmp_path):
    _write_images(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    rows = [
        _row("red", "blue", 1),  # line 1: good
        _row("red", "blue", 2),  # line 2: label outside {0, 1, tie}
        _row("red", "blue", True),  # line 3: a boolean is not a label
        "{not json",  # line 4
        _row("red", "broken", 1),  # line 5: undecodable image
        _row("red", "missing", 0),  # line 6: no such file
        {"jpg_0": "red.png", "jpg_1": "blue.png", "caption": "x"},  # line 7: no label
        _row("red", "blue", 1, caption=7),  # line 8: caption not a string
        _row("green", "white", 0),  # line 9: good
    ]
    _write_jsonl(tmp_path / "p.jsonl", rows)
    return tmp_path / "p.jsonl"


def test_bad_rows_stop_the_stream_with_their_line_by_default(tmp_path):
    path = _bad_rows(tmp_path)
    pairs = iter_preference_pairs(path)
    assert _colour(next(pairs).winner) == "red"  # rows are read lazily: the good first row comes out
    with pytest.raises(BadPreferenceRow, match=r"p.jsonl line 2: label 2 is not one of 1 \(image 0 preferred\), 0"):
        next(pairs)


@pytest.mark.parametrize(
    "line, match",
    [
        (3, "label True is not one of"),
        (4, "not a JSON object"),
        (5, "jpg_1 could not be decoded"),
        (6, "jpg_1 could not be decoded"),
        (7, "no 'label_0'"),
        (8, "caption 7 is not a string"),
    ],
)
def test_each_kind_of_bad_row_is_named(tmp_path, line, match):
    path = _bad_rows(tmp_path)
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[line - 1] + "\n")
    with pytest.raises(BadPreferenceRow, match=f"line 2: {match}"):
        list(iter_preference_pairs(path))


def test_bad_rows_are_skipped_and_counted_when_asked(tmp_path):
    counts = PreferenceCounts()
    pairs = list(iter_preference_pairs(_bad_rows(tmp_path), on_bad_row="skip", counts=counts))
    assert [(_colour(p.winner), _colour(p.loser), p.row) for p in pairs] == [("red", "blue", 1), ("white", "green", 9)]
    assert (counts.rows, counts.pairs, counts.ties, counts.skipped) == (9, 2, 0, 7)
    assert counts.reasons == {"label": 2, "json": 1, "image": 2, "column": 1, "caption": 1}
    assert len(counts.examples) == 5 and counts.examples[0].endswith("line 2: label 2 is not one of 1 (image 0 preferred), 0 (image 1), 0.5 or 'tie'")
    assert counts.summary().startswith("2 pairs from 9 rows, 0 ties dropped, 7 bad rows skipped (caption: 1, column: 1")
    with pytest.raises(ConfigError, match="on_bad_row='warn'"):
        next(iter_preference_pairs(tmp_path / "p.jsonl", on_bad_row="warn"))


def test_missing_or_unrecognised_sources_are_errors(tmp_path):
    with pytest.raises(AlignError, match="not found"):
        next(iter_preference_pairs(tmp_path / "nope.jsonl"))
    with pytest.raises(AlignError, match="not found"):
        next(iter_preference_pairs("./no/such/folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AlignError, match="is not a preference data set; accepted: a .jsonl file"):
        next(iter_preference_pairs(tmp_path / "empty"))


# -- Hugging Face datasets (local only: save_to_disk and Parquet) -------------------------------------


def _hf_dict():
    return {
        "jpg_0": [_png("red"), _png("green"), _png("red"), _png("white"), b"garbage"],
        "jpg_1": [_png("blue"), _png("white"), _png("black"), _png("black"), _png("blue")],
        "label_0": [1.0, 0.0, 0.5, 2.0, 1.0],
        "caption": ["c0", "c1", "c2", "c3", "c4"],
        "model_0": ["m"] * 5,
    }


def test_datasets_sources_saved_to_disk_and_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict(_hf_dict())
    ds.save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    want = [("c0", "red", "blue", 0), ("c1", "white", "green", 1)]
    for source, split in ((tmp_path / "disk", "train"), (tmp_path / "dict", "validation"), (tmp_path / "pq", "train"),
                          (tmp_path / "pq" / "part-0.parquet", "train")):
        counts = PreferenceCounts()
        pairs = list(iter_preference_pairs(source, split=split, on_bad_row="skip", counts=counts))
        assert [(p.caption, _colour(p.winner), _colour(p.loser), p.row) for p in pairs] == want, source
        assert (counts.rows, counts.pairs, counts.ties, counts.reasons) == (5, 2, 1, {"label": 1, "image": 1})
        assert f"{source} row 4: jpg_0 could not be decoded (cannot identify image file" in counts.examples[1]
    with pytest.raises(AlignError, match="has no split 'train'; accepted: validation"):
        next(iter_preference_pairs(tmp_path / "dict"))
    with pytest.raises(BadPreferenceRow, match="row 3: label 2.0 is not one of"):
        list(iter_preference_pairs(tmp_path / "disk"))


def test_datasets_image_features_and_missing_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({k: v[:2] for k, v in _hf_dict().items()})
    ds = ds.cast_column("jpg_0", datasets.Image()).cast_column("jpg_1", datasets.Image())
    ds.save_to_disk(str(tmp_path / "img"))
    pairs = list(iter_preference_pairs(tmp_path / "img"))
    assert [(_colour(p.winner), _colour(p.loser)) for p in pairs] == [("red", "blue"), ("white", "green")]
    ds.remove_columns(["caption"]).save_to_disk(str(tmp_path / "nocap"))
    with pytest.raises(AlignError, match=r"has no column 'caption'; found: 'jpg_0', 'jpg_1', 'label_0', 'model_0'"):
        next(iter_preference_pairs(tmp_path / "nocap"))


def test_datasets_sources_without_the_package_say_how_to_install_it(tmp_path, monkeypatch):
    (tmp_path / "part.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(AlignError, match=r"needs the 'datasets' package: pip install 'diffusion-align\[data\]'"):
        next(iter_preference_pairs(tmp_path / "part.parquet"))


# -- preparation ---------------------------------------------------------------------------------------


def _ramp(width=40, height=20):
    """Red grows with x, green with y: every pixel says where it came from."""
    x = np.arange(width, dtype=np.uint8)[None, :].repeat(height, 0) * 6
    y = np.arange(height, dtype=np.uint8)[:, None].repeat(width, 1) * 12
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1), "RGB")


def _pixels(image):
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


def test_preparation_resizes_the_shorter_side_crops_the_centre_and_records_sizes():
    image = _ramp(40, 20)
    out = ImagePreparation(10, hflip=False)(image)
    assert out.pixels.shape == (3, 10, 10) and out.original_size == (20, 40) and out.crop_top_left == (0, 5)
    want = _pixels(image.resize((20, 10), Image.BILINEAR).crop((5, 0, 15, 10)))
    assert torch.equal(out.pixels, want)
    # already square at the resolution: the pixels themselves
    square = _ramp(16, 16)
    assert torch.equal(ImagePreparation(16, hflip=False)(square).pixels, _pixels(square))
    portrait = ImagePreparation(8, hflip=False)(_ramp(16, 30))
    assert portrait.original_size == (30, 16) and portrait.crop_top_left == (4, 0)  # 8 x 15; round(3.5) = 4, as torchvision


def test_random_crop_and_flip_are_seeded_per_row_and_slot():
    image = _ramp(40, 20)
    prep = ImagePreparation(10, random_crop=True, hflip=True, seed=3)
    resized = image.resize((20, 10), Image.BILINEAR)
    seen_lefts, flips = set(), 0
    for row in range(40):
        for slot in (0, 1):
            out = prep(image, row, slot)
            assert torch.equal(out.pixels, prep(image, row, slot).pixels)  # deterministic
            top, left = out.crop_top_left
            assert top == 0 and 0 <= left <= 10
            crop = _pixels(resized.crop((left, 0, left + 10, 10)))
            flipped = torch.equal(out.pixels, crop.flip(-1))
            assert flipped or torch.equal(out.pixels, crop)
            flips += flipped
            seen_lefts.add(left)
    assert len(seen_lefts) > 5 and 25 <= flips <= 55  # 80 fair coin flips


# -- latent cache ----------------------------------------------------------------------------------------


class CountingEncoder:
    """A stand-in for a VAE encoder: 2x2 average pooling, in float16, counting the images it sees."""

    def __init__(self):
        self.images = 0

    def __call__(self, images):
        self.images += images.shape[0]
        return (F.avg_pool2d(images, 2) * 2 - 1).half()


def _six_pairs(tmp_path):
    _write_images(tmp_path)
    names = list(COLOURS)
    rows = [_row(names[i % 5], names[(i + 1) % 5], i % 2, f"caption {i}") for i in range(6)]
    _write_jsonl(tmp_path / "p.jsonl", rows)
    return tmp_path / "p.jsonl"


def test_latent_cache_is_built_once_and_reads_back_the_same_latents(tmp_path):
    source = _six_pairs(tmp_path)
    prep = ImagePreparation(4, hflip=True, seed=1)
    direct = list(encode_pairs(iter_preference_pairs(source), prep, CountingEncoder(), batch_size=4))
    assert [len(b) for b in direct] == [4, 2]
    encoder, fingerprint = CountingEncoder(), {"source": str(source), "resolution": 4, "hflip": True, "encoder": "pool"}

    def batches(counts):
        return lambda: encode_pairs(iter_preference_pairs(source, counts=counts), prep, encoder, batch_size=4)

    counts = PreferenceCounts()
    cache = LatentCache.build_or_load(tmp_path / "cache", fingerprint, batches(counts), counts=counts, shard_size=5)
    assert encoder.images == 12 and len(cache) == 6
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["manifest.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    read = list(cache.iter_batches(batch_size=3))
    assert [len(b) for b in read] == [3, 3]
    for name in ("winners", "losers", "rows", "winner_original_sizes", "winner_crops", "loser_original_sizes", "loser_crops"):
        got = torch.cat([getattr(b, name) for b in read])
        want = torch.cat([getattr(b, name) for b in direct])
        assert got.dtype == want.dtype and torch.equal(got, want), name
    assert read[0].winners.dtype == torch.float16
    assert [c for b in read for c in b.captions] == [f"caption {i}" for i in range(6)]
    assert read[0].winner_original_sizes[0].tolist() == [10, 12]

    again = LatentCache.build_or_load(tmp_path / "cache", fingerprint, batches(PreferenceCounts()))
    assert encoder.images == 12  # reused, not re-encoded
    assert (again.counts.rows, again.counts.pairs) == (6, 6)
    shuffled = list(again.iter_batches(batch_size=4, generator=torch.Generator().manual_seed(0)))
    rows = torch.cat([b.rows for b in shuffled])
    assert sorted(rows.tolist()) == list(range(1, 7)) and rows.tolist() != list(range(1, 7))
    by_row = {int(r): i for i, r in enumerate(torch.cat([b.rows for b in direct]))}
    winners = torch.cat([b.winners for b in direct])
    for b in shuffled:
        for k in range(len(b)):
            assert torch.equal(b.winners[k], winners[by_row[int(b.rows[k])]])


def test_latent_cache_refuses_other_settings_and_rebuilds_unfinished_builds(tmp_path):
    source = _six_pairs(tmp_path)
    prep, encoder = ImagePreparation(4), CountingEncoder()
    fingerprint = {"source": str(source), "resolution": 4}

    def batches():
        return encode_pairs(iter_preference_pairs(source), prep, encoder, batch_size=4)

    LatentCache.build_or_load(tmp_path / "cache", fingerprint, batches)
    with pytest.raises(AlignError, match=r"built for other settings \(resolution: cached 4, wanted 8\); delete it"):
        LatentCache.build_or_load(tmp_path / "cache", {**fingerprint, "resolution": 8}, batches)
    (tmp_path / "cache" / "manifest.json").unlink()  # as if the build had been interrupted
    (tmp_path / "cache" / "shard-00007.safetensors").write_bytes(b"stale")
    cache = LatentCache.build_or_load(tmp_path / "cache", fingerprint, batches)
    assert encoder.images == 24 and len(cache) == 6
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["manifest.json", "shard-00000.safetensors"]


# -- online pairs ---------------------------------------------------------------------------------------

REWARDS = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.3, 0.3, 1.0, math.nan, 0.2, 0.7])
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])


@pytest.mark.parametrize(
    "pairing, want",
    [
        ("best_worst", [(1, 0), (6, 8)]),  # group 1 is a tie: no pair; index 7 is NaN: left out
        ("halves", [(1, 0), (6, 8)]),  # group 0's middle pair (2, 3) is tied
        ("all", [(1, 2), (1, 3), (1, 0), (2, 0), (3, 0), (6, 9), (6, 8), (9, 8)]),
    ],
)
def test_pairs_from_rewards_rank_within_groups_and_skip_ties(pairing, want):
    winners, losers = pairs_from_rewards(REWARDS, GROUPS, pairing=pairing)
    assert list(zip(winners.tolist(), losers.tolist())) == want
    assert bool((REWARDS[winners] > REWARDS[losers]).all())


def test_pairs_from_rewards_margin_and_validity():
    winners, losers = pairs_from_rewards(REWARDS, GROUPS, pairing="all", min_margin=0.45)
    assert list(zip(winners.tolist(), losers.tolist())) == [(1, 0), (6, 8), (9, 8)]
    valid = torch.ones(10, dtype=torch.bool)
    valid[1] = False
    winners, losers = pairs_from_rewards(REWARDS, GROUPS, valid=valid)
    assert list(zip(winners.tolist(), losers.tolist())) == [(2, 0), (6, 8)]
    winners, losers = pairs_from_rewards(torch.tensor([0.5, 0.5]), torch.tensor([0, 0]))
    assert winners.numel() == 0 and losers.dtype == torch.long
    with pytest.raises(ConfigError, match="pairing='top'"):
        pairs_from_rewards(REWARDS, GROUPS, pairing="top")
    with pytest.raises(AlignError, match="must both be"):
        pairs_from_rewards(REWARDS, GROUPS[:3])
