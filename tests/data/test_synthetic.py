"""Tests for the synthetic Planet-style dataset generator."""

from __future__ import annotations

import csv
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from chiptag.data.synthetic import (
    PLANET_TAGS,
    TAG_FREQUENCIES,
    WEATHER_TAGS,
    draw_chip,
    generate_dataset,
    sample_tags,
)
from chiptag.errors import ChiptagError

N_DRAWS = 20_000


@pytest.fixture(scope="module")
def draws() -> list[list[str]]:
    rng = np.random.default_rng(12345)
    return [sample_tags(rng) for _ in range(N_DRAWS)]


def _read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _chips(tags: list[str], count: int = 16, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.stack([draw_chip(tags, size, np.random.default_rng([seed, i])) for i in range(count)]).astype(float)


def test_constants():
    assert len(PLANET_TAGS) == 17
    assert list(PLANET_TAGS) == sorted(PLANET_TAGS)
    assert set(TAG_FREQUENCIES) == set(PLANET_TAGS)
    assert set(WEATHER_TAGS) <= set(PLANET_TAGS)
    assert sum(TAG_FREQUENCIES[t] for t in WEATHER_TAGS) == pytest.approx(1.0, abs=1e-9)


def test_tag_frequencies_match_real_ones(draws):
    counts = Counter(t for tags in draws for t in tags)
    for tag, real in TAG_FREQUENCIES.items():
        freq = counts[tag] / N_DRAWS
        if real >= 0.03:
            assert freq == pytest.approx(real, abs=0.015), tag
        else:  # rare tags: present, but rare
            assert 0 < freq < 0.03 and freq == pytest.approx(real, abs=0.005), tag
    mean_tags = sum(len(tags) for tags in draws) / N_DRAWS
    assert mean_tags == pytest.approx(2.87, abs=0.05)


def test_tag_structure(draws):
    for tags in draws:
        assert set(tags) <= set(PLANET_TAGS)
        assert len(set(tags)) == len(tags)
        assert sum(t in WEATHER_TAGS for t in tags) == 1
        if "cloudy" in tags:
            assert tags == ["cloudy"]


def test_habitation_mostly_with_road(draws):
    with_hab = [tags for tags in draws if "habitation" in tags]
    assert sum("road" in tags for tags in with_hab) / len(with_hab) > 0.6


def test_dataset_layout(tmp_path):
    out = generate_dataset(tmp_path / "ds", n=12, size=32, seed=3)
    assert out == tmp_path / "ds"
    with open(out / "train_classes.csv", encoding="utf-8") as fh:
        assert fh.readline().strip() == "image_name,tags"
    rows = _read_csv(out / "train_classes.csv")
    assert [r["image_name"] for r in rows] == [f"train_{i}" for i in range(12)]
    for row in rows:
        tags = row["tags"].split(" ")
        assert tags and set(tags) <= set(PLANET_TAGS)
        with Image.open(out / "train-jpg" / f"{row['image_name']}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (32, 32)
    # Only the CSV and the image folder: the atomic write leaves no temp file behind.
    assert sorted(p.name for p in out.iterdir()) == ["train-jpg", "train_classes.csv"]
    assert len(list((out / "train-jpg").iterdir())) == 12


def test_custom_prefix(tmp_path):
    out = generate_dataset(tmp_path, n=2, size=16, prefix="demo_")
    assert [r["image_name"] for r in _read_csv(out / "train_classes.csv")] == ["demo_0", "demo_1"]
    assert (out / "train-jpg" / "demo_1.jpg").is_file()


def _snapshot(out, n: int) -> tuple[str, list[bytes]]:
    text = (out / "train_classes.csv").read_text(encoding="utf-8")
    images = [(out / "train-jpg" / f"train_{i}.jpg").read_bytes() for i in range(n)]
    return text, images


def test_deterministic_and_prefix_stable(tmp_path):
    a = _snapshot(generate_dataset(tmp_path / "a", n=8, size=48, seed=7), 8)
    b = _snapshot(generate_dataset(tmp_path / "b", n=8, size=48, seed=7), 8)
    assert a == b
    short = _snapshot(generate_dataset(tmp_path / "short", n=3, size=48, seed=7), 3)
    assert short[1] == a[1][:3]
    assert short[0].splitlines() == a[0].splitlines()[:4]
    other = _snapshot(generate_dataset(tmp_path / "other", n=8, size=48, seed=8), 8)
    assert other[1] != a[1] and all(x != y for x, y in zip(other[1], a[1]))


@pytest.mark.parametrize(
    "kwargs",
    [{"n": 0}, {"n": -5}, {"n": 2.5}, {"n": True}, {"size": 15}, {"size": 1025}, {"size": 64.0},
     {"seed": -1}, {"quality": 0}, {"prefix": "a/b"}],
)
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ChiptagError):
        generate_dataset(tmp_path, **{"n": 2, "size": 16, **kwargs})


def test_draw_chip_rejects_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ChiptagError):
        draw_chip(["clear", "volcano"], 32, rng)
    with pytest.raises(ChiptagError):
        draw_chip(["clear"], 8, rng)


@pytest.mark.parametrize("size", [16, 128, 300])
def test_draw_chip_shape_for_every_tag(size):
    chip = draw_chip(PLANET_TAGS, size, np.random.default_rng(1))
    assert chip.shape == (size, size, 3) and chip.dtype == np.uint8


def _blueness(chips: np.ndarray) -> float:
    return float((chips[..., 2] - chips[..., :2].mean(-1)).mean())


def test_water_is_blue():
    assert _blueness(_chips(["clear", "primary", "water"])) > _blueness(_chips(["clear", "primary"])) + 8


def test_primary_is_green_forest():
    forest, savanna = _chips(["clear", "primary"]), _chips(["clear"])
    greenness = lambda c: float((c[..., 1] - c[..., [0, 2]].mean(-1)).mean())  # noqa: E731
    assert greenness(forest) > greenness(savanna) + 10
    assert forest.mean() < savanna.mean() - 30  # dark canopy vs light savanna


def test_cloudy_is_bright():
    assert _chips(["cloudy"]).mean() > _chips(["clear", "primary"]).mean() + 100


def test_partly_cloudy_adds_bright_area():
    bright = lambda c: float((c.mean(-1) > 200).mean())  # noqa: E731
    assert bright(_chips(["partly_cloudy", "primary"])) > bright(_chips(["clear", "primary"])) + 0.05


def test_haze_lowers_contrast_and_brightens():
    clear, hazy = _chips(["clear", "primary", "agriculture"]), _chips(["haze", "primary", "agriculture"])
    contrast = lambda c: float(c.mean(-1).std(axis=(1, 2)).mean())  # noqa: E731
    assert contrast(hazy) < 0.75 * contrast(clear)
    assert hazy.mean() > clear.mean() + 40


@pytest.mark.parametrize("tag", ["agriculture", "road", "habitation", "bare_ground", "conventional_mine"])
def test_light_land_tags_brighten_forest(tag):
    assert _chips(["clear", "primary", tag]).mean() > _chips(["clear", "primary"]).mean() + 3


def test_rewriting_a_folder_leaves_no_stale_chips_and_never_touches_other_files(tmp_path):
    generate_dataset(tmp_path / "ds", n=6, size=16)
    out = generate_dataset(tmp_path / "ds", n=3, size=16)
    assert sorted(p.name for p in (out / "train-jpg").iterdir()) == ["train_0.jpg", "train_1.jpg", "train_2.jpg"]
    assert len(_read_csv(out / "train_classes.csv")) == 3
    mine = out / "train-jpg" / "holiday.jpg"
    mine.write_bytes(b"not a chip")
    with pytest.raises(ChiptagError, match="holiday.jpg: write the demo data into a new or empty folder"):
        generate_dataset(tmp_path / "ds", n=2, size=16)
    assert mine.read_bytes() == b"not a chip" and (out / "train-jpg" / "train_2.jpg").exists()
