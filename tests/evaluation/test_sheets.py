"""The report's error sheets: which chips they show and in which order (checked against an independent loss
computation), grey tiles for chips that cannot be read, bounded decoding, and the pure selection helpers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from chiptag.cli import app
from chiptag.evaluation import mistakes
from chiptag.evaluation.report import load_eval_probs, write_report
from chiptag.config import ReportConfig
from chiptag.evaluation.sheets import write_sheets
from chiptag.evaluation.tiles import GREY, TILE_IN, Tile, TileReader, place_tiles, tag_lines, tile_pixels
from chiptag.runs.layout import RunDir

runner = CliRunner()


def _bce_order(probs: dict) -> list[str]:
    """The expected top-errors order, computed with torch's BCE (not chiptag's): largest summed loss first."""
    p = torch.from_numpy(probs["test_probs"]).double().clamp(1e-7, 1 - 1e-7)
    loss = torch.nn.functional.binary_cross_entropy(p, torch.from_numpy(probs["test_targets"]).double(),
                                                    reduction="none").sum(dim=1).numpy()
    order = sorted(range(len(loss)), key=lambda i: (-loss[i], i))
    return [str(probs["test_names"][i]) for i in order]


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """The trained tiny run with its own copy of the data (so chips can be broken) and no report yet."""
    src = Path(trained_run["run_dir"])
    run_dir = Path(shutil.copytree(src, tmp_path / "run"))
    shutil.rmtree(run_dir / "report")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    data = Path(shutil.copytree(cfg["data"]["root"], tmp_path / "data"))
    cfg["data"]["root"] = str(data)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run_dir


def test_report_writes_sheets_in_loss_order(run_copy):
    probs = load_eval_probs(run_copy)
    summary = json.loads(RunDir(run_copy).summary.read_text())
    n, k = 5, 3
    files = write_report(run_copy, {"top_errors": n, "tag_sheets": k})
    run = RunDir(run_copy)
    for name in ("top_errors", "cooccurrence"):
        assert files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sheets = write_sheets(run_copy, summary, probs, ReportConfig(top_errors=n, tag_sheets=k))
    assert sheets.top_names == _bce_order(probs)[:n]
    assert not sheets.unreadable
    # The k tags with the worst test F2 (among those with an error) get a sheet listing the tag's own errors,
    # most confident false positive / most missed false negative first.
    y, p = probs["test_targets"], probs["test_probs"]
    tags, per_class = summary["tags"], summary["metrics"]["test"]["per_class"]
    expected = {}
    for c, tag in enumerate(tags):
        pred = p[:, c] >= summary["thresholds"][tag]
        fp = [i for i in np.argsort(-p[:, c], kind="stable") if pred[i] and not y[i, c]]
        fn = [i for i in np.argsort(p[:, c], kind="stable") if y[i, c] and not pred[i]]
        if fp or fn:
            expected[tag] = ([probs["test_names"][i] for i in fp[:6]], [probs["test_names"][i] for i in fn[:6]])
    worst = sorted(expected, key=lambda t: (per_class[t]["f2"], -per_class[t]["support"], t))[:k]
    assert sheets.tag_names == {t: expected[t] for t in worst}
    assert sorted(p.name for p in run.per_tag_dir.glob("*.png")) == sorted(f"{t}.png" for t in worst)
    md = run.report_md.read_text()
    assert "## Errors" in md and "](top_errors.png)" in md and "](cooccurrence.png)" in md
    assert f"the {n} test chips with the largest loss" in md
    assert [line.split("]")[0] for line in md.splitlines() if "](per_tag/" in line] == [f"  - [{t}" for t in worst]
    assert all(files[f"per_tag/{t}"] == run.per_tag_dir / f"{t}.png" for t in worst)
    # Bounded: each chip on any sheet decoded once, never the whole split.
    shown = set(sheets.top_names) | {c for fp, fn in sheets.tag_names.values() for c in fp + fn}
    assert sheets.decoded == len(shown)


def test_unreadable_chips_become_grey_tiles(run_copy):
    probs = load_eval_probs(run_copy)
    summary = json.loads(RunDir(run_copy).summary.read_text())
    data = Path(yaml.safe_load((run_copy / "config.yaml").read_text())["data"]["root"])
    corrupt, missing = str(probs["test_names"][0]), str(probs["test_names"][1])
    (data / "train-jpg" / f"{corrupt}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    (data / "train-jpg" / f"{missing}.jpg").unlink()
    n_test = len(probs["test_names"])
    # Every test chip is drawn, so both broken ones are on the sheet.
    sheets = write_sheets(run_copy, summary, probs, ReportConfig(top_errors=n_test, tag_sheets=1))
    assert set(sheets.unreadable) == {corrupt, missing}
    assert "cannot read image" in sheets.unreadable[corrupt] and corrupt in sheets.unreadable[corrupt]
    assert "not found" in sheets.unreadable[missing]
    assert RunDir(run_copy).top_errors.stat().st_size > 0
    reader = TileReader.for_run(run_copy, summary["image_size"])
    image, why = reader(corrupt)
    assert why and image.shape == (summary["image_size"], summary["image_size"], 3)
    assert np.all(image == GREY)
    good, why = reader(str(probs["test_names"][2]))
    assert not why and good.std() > 0.01  # a real chip is not grey
    md = RunDir(run_copy).report_md
    write_report(run_copy, {"top_errors": n_test, "tag_sheets": 1})
    assert "2 chip(s) could not be read and show as grey tiles" in md.read_text()


def test_report_command_options_and_stale_tag_sheets(run_copy):
    stale = RunDir(run_copy).per_tag_dir / "no_such_tag.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    r = runner.invoke(app, ["report", str(run_copy), "--top-errors", "3", "--tag-sheets", "2"],
                      catch_exceptions=False)
    assert r.exit_code == 0, r.output
    md = RunDir(run_copy).report_md.read_text()
    assert "the 3 test chips with the largest loss" in md
    assert len(list(RunDir(run_copy).per_tag_dir.glob("*.png"))) <= 2 and not stale.exists()


def test_sheets_follow_the_run_config_and_can_be_turned_off(run_copy):
    run = RunDir(run_copy)
    write_report(run_copy, {"tag_sheets": 1})  # an earlier report's sheets: --no-error-sheets removes them
    assert run.top_errors.exists() and run.cooccurrence.exists() and list(run.per_tag_dir.glob("*.png"))
    r = runner.invoke(app, ["report", str(run_copy), "--no-error-sheets"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert not run.top_errors.exists() and not run.cooccurrence.exists() and not run.per_tag_dir.exists()
    assert "## Errors" not in run.report_md.read_text() and run.report_md.exists()
    cfg = yaml.safe_load((run_copy / "config.yaml").read_text())
    cfg["report"] = {"top_errors": 2, "tag_sheets": 1}
    (run_copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    write_report(run_copy)
    assert "the 2 test chips with the largest loss" in RunDir(run_copy).report_md.read_text()
    cfg["report"] = {"top_errors": 0}
    (run_copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = runner.invoke(app, ["report", str(run_copy)])
    assert r.exit_code == 2 and "report.top_errors" in r.output and "Traceback" not in r.output


def test_without_a_usable_config_every_tile_is_grey(run_copy):
    (run_copy / "config.yaml").write_text("data: {root: 3, nonsense: true}\n")
    probs = load_eval_probs(run_copy)
    summary = json.loads(RunDir(run_copy).summary.read_text())
    sheets = write_sheets(run_copy, summary, probs, ReportConfig(top_errors=4, tag_sheets=1))
    assert set(sheets.top_names) <= set(sheets.unreadable) and sheets.decoded == 0
    assert all("config.yaml" in why for why in sheets.unreadable.values())


def _fabricated_run(root: Path, n_test: int, n_tags: int, size: int, n_images: int) -> tuple[Path, dict, dict]:
    """A run dir with only what the sheets read: config.yaml, summary.json, eval_probs.npz; `n_images` of the
    test chips exist as `size` px JPEGs (the rest are missing files, i.e. grey tiles)."""
    rng = np.random.default_rng(0)
    tags = [f"tag_{k:02d}_{'x' * (k % 9)}" for k in range(n_tags)]  # long, varied names: the worst case
    names = [f"chip_{i}" for i in range(n_test)]
    (root / "data" / "img").mkdir(parents=True)
    for name in names[:n_images]:
        chip = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(chip).save(root / "data" / "img" / f"{name}.jpg")
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"root": str(root / "data"), "images": "img"}}))
    summary = {"tags": tags, "thresholds": {t: 0.5 for t in tags}, "image_size": size}
    probs = {"test_probs": rng.random((n_test, n_tags)), "test_names": np.asarray(names),
             "test_targets": (rng.random((n_test, n_tags)) < 0.3).astype(np.uint8)}
    return run, summary, probs


def test_sheets_at_25_tags_and_256px_stay_bounded_on_a_large_split(tmp_path):
    run, summary, probs = _fabricated_run(tmp_path, n_test=5000, n_tags=25, size=256, n_images=60)
    opts = ReportConfig(top_errors=6, tag_tiles=2, tag_sheets=2)
    sheets = write_sheets(run, summary, probs, opts)
    assert sheets.decoded <= opts.top_errors + 2 * opts.tag_tiles * opts.tag_sheets
    assert sheets.top_names == _bce_order(probs)[:6]
    assert len(sheets.tag_names) == 2 and len(list(RunDir(run).per_tag_dir.glob("*.png"))) == 2
    assert RunDir(run).cooccurrence.stat().st_size > 0


@pytest.mark.parametrize("dpi", [100, 50])
def test_tiles_are_drawn_once_at_the_tiles_pixel_size_without_axes(dpi):
    """A chip is resized once to TILE_IN at the figure's dpi and drawn 1:1 (the saved PNG holds exactly those
    pixels); a chip that could not be read is a grey tile that says why; its tags stay below it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    side = round(TILE_IN * dpi)
    chip = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    grey = np.full((64, 64, 3), GREY, np.float32)
    tiles = [Tile(chip, "chip_a\nF2 0.10", tag_lines(["clear"], ["road"], [])),
             Tile(grey, "chip_b\nF2 0.00", tag_lines([], [], ["haze"]), "cannot read image chip_b.jpg: truncated")]
    fig = Figure(figsize=(2 * TILE_IN + 1, TILE_IN + 1.5), dpi=dpi)
    place_tiles(fig, tiles, (0.2, 0.3), ncols=2)
    assert not fig.axes and [im.get_array().shape for im in fig.images] == [(side, side, 3)] * 2
    texts = [t.get_text() for t in fig.texts]
    assert "unreadable\ncannot read image chip_b.jpg:\ntruncated" in texts
    assert {"chip_a\nF2 0.10", "ok: clear", "missed: road", "extra: haze"} <= set(texts)
    # the top-left tile's chip lands at (0.2 in, 0.3 in + the title's height) from the figure's top-left, 1:1
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    drawn = np.asarray(canvas.buffer_rgba())[..., :3]
    top, left = round(fig.get_size_inches()[1] * dpi) - fig.images[0].oy - side, fig.images[0].ox
    assert left == round(0.2 * dpi)
    inner = (slice(top + 2, top + side - 2), slice(left + 2, left + side - 2))  # inside the frame
    assert np.array_equal(drawn[inner], tile_pixels(chip, side)[2:-2, 2:-2])
    below = fig.texts[[t.get_text() for t in fig.texts].index("ok: clear")].get_window_extent(canvas.get_renderer())
    assert below.y1 <= fig.images[0].oy  # the tags do not overlap the chip


def test_tile_pixels_keep_a_chips_aspect():
    assert tile_pixels(np.zeros((100, 50, 3), np.float32), 190).shape == (190, 95, 3)
    assert tile_pixels(np.zeros((256, 256, 3), np.uint8), 190).dtype == np.uint8


# --- the pure selection helpers ---


def test_chip_losses_and_top_losses_break_ties_in_split_order():
    y = np.array([[1, 0], [1, 0], [0, 1], [0, 0]])
    p = np.array([[0.9, 0.1], [0.2, 0.5], [0.2, 0.5], [0.0, 1.0]])
    expected = -np.log([0.9 * 0.9, 0.2 * 0.5, 0.8 * 0.5, 1e-7 * (1 - 1e-7)])
    assert mistakes.chip_losses(y, p) == pytest.approx(expected, rel=1e-6)
    assert mistakes.top_losses(mistakes.chip_losses(y, p), 3).tolist() == [3, 1, 2]
    assert mistakes.top_losses([1.0, 1.0, 1.0], 2).tolist() == [0, 1]


def test_tag_errors_and_cooccurrence_by_hand():
    tags = ["clear", "haze", "road"]
    y = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 0], [1, 0, 0]])
    p = np.array([[0.9, 0.8, 0.2], [0.6, 0.7, 0.1], [0.7, 0.9, 0.1], [0.8, 0.1, 0.1]])
    errs = {e.tag: e for e in mistakes.tag_errors(y, p, [0.5, 0.5, 0.5], tags)}
    assert errs["haze"].false_positives.tolist() == [2, 0]  # most confident first
    assert errs["clear"].false_positives.tolist() == [1] and errs["road"].false_negatives.tolist() == [0]
    assert [e.tag for e in mistakes.tag_errors(y, p, [0.5] * 3, tags, max_tags=1)] == ["road"]  # F2 0: worst
    truth, counts = mistakes.cooccurrence(y)
    assert counts.tolist() == [3, 1, 1]
    assert truth[0].tolist() == pytest.approx([1, 0, 1 / 3]) and truth[2].tolist() == [1, 0, 1]
    pred, _ = mistakes.cooccurrence(mistakes.metrics.binarize(p, 0.5))
    assert np.isnan(pred[2]).all()  # road is never predicted
    assert pred[0, 1] == pytest.approx(3 / 4)  # clear predicted on 4 chips, 3 of them also haze
    assert "haze also carry clear more often in the prediction (100%) than in the truth (0%)" in \
        mistakes.cooccurrence_reading(truth, pred, tags)
    assert mistakes.tile_tags(y[0], [1, 1, 0], tags) == (["clear"], ["road"], ["haze"])


def test_inconsistent_stored_arrays_cost_the_sheets_not_the_report(run_copy):
    probs = load_eval_probs(run_copy)
    probs["test_names"] = probs["test_names"][:-1]
    np.savez_compressed(RunDir(run_copy).eval_probs, **probs)
    files = write_report(run_copy)
    md = files["report"].read_text()
    assert "No error sheets:" in md and "test names" in md and "pr_curves" in files
    assert "top_errors" not in files


def test_tiles_show_the_square_the_model_saw(run_copy):
    """A run trained with data.resize: crop (or pad) shows its chips cropped (padded) on the sheets too."""
    from chiptag.data.images import read_rgb, resize

    probs = load_eval_probs(run_copy)
    cfg = yaml.safe_load((run_copy / "config.yaml").read_text())
    name = str(probs["test_names"][0])
    chip = read_rgb(Path(cfg["data"]["root"]) / "train-jpg" / f"{name}.jpg")[:, :, 8:]  # make it non-square
    Image.fromarray(chip.permute(1, 2, 0).numpy()).save(Path(cfg["data"]["root"]) / "train-jpg" / f"{name}.png")
    for mode in ("crop", "pad"):
        cfg["data"].update(resize=mode, extension=".png")
        (run_copy / "config.yaml").write_text(yaml.safe_dump(cfg))
        tile, why = TileReader.for_run(run_copy, 32)(name)
        expected = resize(chip, 32, mode).permute(1, 2, 0).numpy().astype(np.float32) / 255.0
        assert not why and np.array_equal(tile, expected), mode


def test_sheets_decide_tags_under_the_runs_label_rules(run_copy):
    """Predicted tags on the sheets are the run's decisions: an exclusive group yields one tag at most."""
    from chiptag.evaluation.sheets import _load_test

    probs = load_eval_probs(run_copy)
    summary = json.loads(RunDir(run_copy).summary.read_text())
    weather = [t for t in ("clear", "partly_cloudy", "haze", "cloudy") if t in summary["tags"]]
    cols = [summary["tags"].index(t) for t in weather]
    summary["thresholds"] = {t: 1e-9 for t in summary["tags"]}  # every tag on: only the rule can turn some off
    assert _load_test(run_copy, summary, probs).pred[:, cols].sum(axis=1).min() == len(weather)
    cfg = yaml.safe_load((run_copy / "config.yaml").read_text())
    cfg["labels"] = {"exclusive": [weather], "implies_none": {}}
    (run_copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    # the rules the run kept on validation (summary.json, as its checkpoint), not the ones it was configured with
    assert _load_test(run_copy, summary, probs).pred[:, cols].sum(axis=1).min() == len(weather)
    kept = {**summary, "label_rules": {"exclusive": [weather], "implies_none": {}}}
    assert (_load_test(run_copy, kept, probs).pred[:, cols].sum(axis=1) == 1).all()
    older = {k: v for k, v in summary.items() if k != "label_rules_decision"}  # a run from before the choice
    assert (_load_test(run_copy, older, probs).pred[:, cols].sum(axis=1) == 1).all()
