"""Using a trained run: Predictor API, `chiptag predict` submissions, TTA, and ONNX/TorchScript exports that
match PyTorch on real decoded chips, including from a process that cannot import chiptag or torch.

The run trains at image_size 48 == the chips' size, so no resize happens and the standalone script's
preprocessing can be compared exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from chiptag.cli import app
from chiptag.errors import ChiptagError
from chiptag.inference.export import export_run, run_exported
from chiptag.inference.predictor import Predictor

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


@pytest.fixture
def run_dir(trained_run) -> Path:
    return Path(trained_run["run_dir"])


@pytest.fixture(scope="module")
def onnx_model(trained_run, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    r = invoke("export", trained_run["run_dir"], "--format", "onnx", "--out", path)
    assert r.exit_code == 0, r.output
    return path


@pytest.fixture(scope="module")
def chips(tiny_data) -> list[Path]:
    return sorted((tiny_data / "train-jpg").glob("*.jpg"))[:24]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_predictor_needs_only_the_checkpoint(run_dir, chips, tmp_path):
    lone = tmp_path / "elsewhere" / "model.pt"
    lone.parent.mkdir()
    shutil.copy(run_dir / "checkpoint.pt", lone)  # no config.yaml, no data set, no split next to it
    p = Predictor.from_run(lone)
    probs = p.predict(chips, batch_size=7)  # batches that do not divide the input
    assert probs.shape == (len(chips), len(p.tags)) and probs.dtype == np.float32
    assert np.all((probs >= 0) & (probs <= 1))
    x = p.images.stack([p.images.chip(c) for c in chips])  # on p.device
    with torch.inference_mode():  # the same device as the Predictor: like is compared with like
        expected = torch.sigmoid(p.model.tagger(x)).cpu().numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    np.testing.assert_allclose(Predictor.from_run(run_dir).predict(chips[:4]), probs[:4], atol=1e-6)
    assert p.tag_strings(probs[:1])[0] == " ".join(t for t, v, th in zip(p.tags, probs[0], p.thresholds) if v >= th)


def test_predictor_raises_or_collects_errors(run_dir, chips, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    p = Predictor.from_run(run_dir)
    with pytest.raises(ChiptagError, match="bad.jpg"):
        p.predict([chips[0], bad])
    errors: dict[int, str] = {}
    probs = p.predict([chips[0], bad, chips[1]], errors=errors)
    assert list(errors) == [1] and "bad.jpg" in errors[1]
    assert np.isnan(probs[1]).all() and np.isfinite(probs[[0, 2]]).all()
    assert p.tag_strings(probs)[1] == ""
    with pytest.raises(ChiptagError, match="no checkpoint"):
        Predictor.from_run(tmp_path)


def test_tta_is_invariant_to_flips_and_rotations(run_dir, chips, tmp_path):
    """A rotated/mirrored copy of a chip gets the same TTA probabilities (its 8 views are the same set), while
    the plain prediction is allowed to change. PNG keeps the rotated pixels exact."""
    p = Predictor.from_run(run_dir)
    variants = []
    for k, op in enumerate([None, Image.Transpose.ROTATE_90, Image.Transpose.FLIP_LEFT_RIGHT,
                            Image.Transpose.TRANSPOSE]):
        with Image.open(chips[3]) as im:
            im = im.convert("RGB")
            (im if op is None else im.transpose(op)).save(tmp_path / f"v{k}.png")
        variants.append(tmp_path / f"v{k}.png")
    tta = p.predict(variants, tta=True)
    plain = p.predict(variants)
    np.testing.assert_allclose(tta, np.repeat(tta[:1], len(variants), axis=0), atol=1e-5)
    assert np.abs(plain - plain[:1]).max() > 1e-4  # so the invariance above is TTA's doing
    assert not np.allclose(tta[0], plain[0], atol=1e-5)


def test_predict_csv_keeps_order_and_every_row(run_dir, chips, tiny_data, tmp_path):
    names = [c.stem for c in chips[:10]][::-1]  # not sorted: output must follow the CSV
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    shutil.copy(chips[11], extra / "from_second_dir.jpg")
    names[3:3] = ["corrupt", "missing_chip", "from_second_dir"]
    csv = tmp_path / "sample_submission.csv"
    pd.DataFrame({"image_name": names, "tags": "primary"}).to_csv(csv, index=False)
    out, probs_csv = tmp_path / "sub" / "predictions.csv", tmp_path / "probs.csv"
    r = invoke("predict", run_dir, csv, "--out", out, "--probabilities", probs_csv, "--images",
               tiny_data / "train-jpg", "--images", extra, "--workers", "0")
    assert r.exit_code == 1, r.output
    assert "corrupt" in r.output and "missing_chip" in r.output and "2 image(s) failed" in r.output
    sub = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(sub.columns) == ["image_name", "tags"] and sub["image_name"].tolist() == names
    errors = pd.read_csv(tmp_path / "sub" / "predictions.errors.csv")
    assert errors["image_name"].tolist() == ["corrupt", "missing_chip"]
    assert set(sub.set_index("image_name").loc[["corrupt", "missing_chip"], "tags"]) == {""}
    tags = json.loads((run_dir / "summary.json").read_text())["tags"]
    assert all(set(t.split()) <= set(tags) for t in sub["tags"])
    probs = pd.read_csv(probs_csv)
    assert list(probs.columns) == ["image_name", *tags] and probs["image_name"].tolist() == names
    ok = [i for i, n in enumerate(names) if n not in ("corrupt", "missing_chip")]
    paths = [tiny_data / "train-jpg" / f"{n}.jpg" if n != "from_second_dir" else extra / f"{n}.jpg"
             for n in np.asarray(names)[ok]]
    np.testing.assert_allclose(probs.iloc[ok, 1:].to_numpy(), Predictor.from_run(run_dir).predict(paths), atol=1e-6)
    assert probs.iloc[[3, 4], 1:].isna().all().all()
    # A clean rerun removes the stale errors file and exits 0.
    names_ok = [n for n in names if n not in ("corrupt", "missing_chip")]
    pd.DataFrame({"image_name": names_ok}).to_csv(csv, index=False)
    r = invoke("predict", run_dir, csv, "--out", out, "--images", tiny_data / "train-jpg", "--images", extra,
               "--workers", "0", "--tta")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "sub" / "predictions.errors.csv").exists()
    assert pd.read_csv(out)["image_name"].tolist() == names_ok


def test_predict_folder_and_bad_inputs(run_dir, chips, tmp_path):
    folder = tmp_path / "chips"
    folder.mkdir()
    for i in (10, 2, 1):
        shutil.copy(chips[i], folder / f"test_{i}.jpg")
    out = tmp_path / "p.csv"
    r = invoke("predict", run_dir, folder, "--out", out, "--workers", "0")
    assert r.exit_code == 0, r.output
    assert pd.read_csv(out)["image_name"].tolist() == ["test_1", "test_2", "test_10"]  # natural order
    # Planet's layout: sample_submission.csv next to test-jpg/ and test-jpg-additional/, found without --images.
    kaggle = tmp_path / "kaggle"
    for sub, name in (("test-jpg", "test_0"), ("test-jpg-additional", "file_0")):
        (kaggle / sub).mkdir(parents=True)
        shutil.copy(chips[0], kaggle / sub / f"{name}.jpg")
    (kaggle / "sample_submission.csv").write_text("image_name,tags\nfile_0,primary clear\ntest_0,primary clear\n")
    r = invoke("predict", run_dir, kaggle / "sample_submission.csv", "--out", out, "--workers", "0")
    assert r.exit_code == 0, r.output
    assert pd.read_csv(out)["image_name"].tolist() == ["file_0", "test_0"]
    csv = tmp_path / "names.csv"
    csv.write_text("image_name\nnowhere_1\nnowhere_2\n")
    r = invoke("predict", run_dir, csv, "--out", out, "--images", folder)
    assert r.exit_code == 2 and "none of the 2 images" in r.output
    csv.write_text("id,tags\nx,primary\n")
    r = invoke("predict", run_dir, csv, "--out", out)
    assert r.exit_code == 2 and "first column must be image_name" in r.output


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch_on_real_chips(run_dir, chips, tmp_path, fmt, request):
    if fmt == "onnx":
        path = request.getfixturevalue("onnx_model")
    else:
        path = tmp_path / "model.pt"
        r = invoke("export", run_dir, "--format", fmt, "--out", path)
        assert r.exit_code == 0, r.output
    p = Predictor.from_run(run_dir, device="cpu")  # exported files run on the CPU here: compare with the CPU
    x = p.images.stack([p.images.chip(c) for c in chips[:5]])
    expected = p.predict_tensor(x).numpy()
    for batch in (x[:1], x):  # the batch dimension is dynamic
        got = run_exported(fmt, path, batch.numpy())
        assert got.shape == (len(batch), len(p.tags))
        np.testing.assert_allclose(got, expected[: len(batch)], atol=1e-4, rtol=0)
    if fmt == "onnx":
        import onnx

        meta = {e.key: e.value for e in onnx.load(str(path)).metadata_props}
    else:
        meta = {k: "" for k in ("tags", "thresholds", "image_size", "mean", "std")}
        with warnings.catch_warnings():  # torch.jit is deprecated, but it is the TorchScript loader
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.load(str(path), _extra_files=meta)
        meta = {k: v.decode() for k, v in meta.items()}
    assert json.loads(meta["tags"]) == p.tags
    assert json.loads(meta["thresholds"]) == pytest.approx(p.thresholds.tolist())
    assert int(meta["image_size"]) == 48
    assert json.loads(meta["mean"]) == pytest.approx(list(p.preprocessing.mean))
    assert json.loads(meta["std"]) == pytest.approx(list(p.preprocessing.std))


def test_export_errors_are_clean(run_dir, tmp_path):
    with pytest.raises(ChiptagError, match="unknown export format"):
        export_run(run_dir, "tflite", tmp_path / "m")
    r = invoke("export", tmp_path, "--out", tmp_path / "m.onnx")
    assert r.exit_code == 2 and "no checkpoint" in r.output


# Run in a fresh interpreter with an import hook that refuses chiptag and torch: the script must need neither.
RUNNER = """\
import runpy, sys


class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("chiptag", "torch", "torchvision"):
            raise ImportError(name + " is blocked in this test")


sys.meta_path.insert(0, Block())
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def test_standalone_onnx_script_reproduces_predict(run_dir, chips, tmp_path, onnx_model):
    model = onnx_model
    folder = tmp_path / "chips"
    folder.mkdir()
    for c in chips[:12]:
        shutil.copy(c, folder / c.name)
    ours = tmp_path / "ours.csv"
    r = invoke("predict", run_dir, folder, "--out", tmp_path / "sub.csv", "--probabilities", ours, "--workers", "0")
    assert r.exit_code == 0, r.output
    theirs, sub = tmp_path / "theirs.csv", tmp_path / "theirs_sub.csv"
    (tmp_path / "runner.py").write_text(RUNNER)
    args = [REPO / "examples" / "onnx_predict.py", model, folder, "--out", theirs, "--submission", sub]
    done = subprocess.run([sys.executable, "runner.py", *map(str, args)], capture_output=True, text=True,
                          cwd=tmp_path, env={"PATH": os.environ.get("PATH", "")}, timeout=120)
    assert done.returncode == 0, done.stderr
    a = pd.read_csv(ours).set_index("image_name").sort_index()
    b = pd.read_csv(theirs).set_index("image_name").sort_index()
    assert list(a.columns) == list(b.columns) and list(a.index) == list(b.index)
    assert float((a - b).abs().max().max()) < 1e-4
    ours_sub = pd.read_csv(tmp_path / "sub.csv", keep_default_na=False).set_index("image_name").sort_index()
    theirs_sub = pd.read_csv(sub, keep_default_na=False).set_index("image_name").sort_index()
    assert ours_sub.equals(theirs_sub)


def test_cli_and_python_api_default_to_the_same_device(run_dir, monkeypatch):
    """`chiptag predict --device auto` and Predictor.from_run() must compute on the same device by default."""
    import chiptag.device
    from chiptag.inference.submission import PredictOptions

    assert Predictor.from_run(run_dir).device == chiptag.device.resolve_device("auto")
    assert PredictOptions().device == "auto"
    seen = []
    monkeypatch.setattr(chiptag.device, "resolve_device", lambda name="auto", what="": seen.append(name) or
                        torch.device("cpu"))
    invoke("predict", run_dir, run_dir.parent, "--out", run_dir.parent / "p.csv")  # CLI default
    assert seen == ["auto"]


# Measured on one NVIDIA H200 (issue 14): CLI on CUDA vs Predictor on CPU differed by up to 5.9e-5 in probability
# (cuDNN/TF32 convolution kernels); 2e-4 leaves a 3x margin for other GPUs and backbones.
CPU_CUDA_ATOL = 2e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_predictions_agree_within_the_measured_tolerance(run_dir, chips):
    cpu = Predictor.from_run(run_dir, device="cpu").predict(chips)
    cuda = Predictor.from_run(run_dir, device="cuda").predict(chips)
    np.testing.assert_allclose(cuda, cpu, atol=CPU_CUDA_ATOL, rtol=0)


def test_predict_accepts_a_text_file_of_names(run_dir, chips, tiny_data, tmp_path):
    names = [c.stem for c in chips[:4]]
    listing = tmp_path / "test.txt"  # as a run's split/test.txt is written
    listing.write_text("".join(f"{n}\n" for n in names))
    out = tmp_path / "p.csv"
    r = invoke("predict", run_dir, listing, "--out", out, "--images", tiny_data / "train-jpg", "--workers", "0")
    assert r.exit_code == 0, r.output
    assert pd.read_csv(out)["image_name"].tolist() == names


def test_export_metadata_says_how_images_were_made_square(run_dir, tmp_path):
    from chiptag.inference.export import metadata
    from chiptag.models import checkpoint as ckpt_mod

    ckpt = ckpt_mod.load(run_dir / "checkpoint.pt")
    assert metadata(ckpt)["resize"] == "squash" == ckpt.preprocessing.resize
    raw = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    del raw["preprocessing"]["resize"]  # as written before data.resize existed
    torch.save(raw, tmp_path / "old.pt")
    assert metadata(ckpt_mod.load(tmp_path / "old.pt"))["resize"] == "squash"  # those checkpoints squashed


def test_predict_reads_an_animated_gif_by_its_first_frame(run_dir, chips, tmp_path):
    """An animated GIF among the chips (here behind a .jpg name) crashed the whole batch; now it is predicted
    from its first frame, exactly as that frame alone, and the command says so."""
    folder = tmp_path / "chips"
    folder.mkdir()
    frames = [Image.open(chips[i]).convert("RGB") for i in (3, 4, 5)]
    frames[0].save(folder / "anim.jpg", "GIF", save_all=True, append_images=frames[1:])
    frames[0].save(folder / "still.jpg", "GIF")  # the first frame alone, through the same GIF palette
    shutil.copy(chips[0], folder / "plain.jpg")
    out = tmp_path / "p.csv"
    r = invoke("predict", run_dir, folder, "--out", out, "--workers", "0", "--probabilities", tmp_path / "pr.csv")
    assert r.exit_code == 0, r.output
    assert "first frame used for 1 multi-frame image(s), e.g. anim.jpg (GIF, 3 frames)" in r.output
    probs = pd.read_csv(tmp_path / "pr.csv").set_index("image_name")
    assert probs.loc["anim"].tolist() == probs.loc["still"].tolist()
    assert not (tmp_path / "p.errors.csv").exists()


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_standalone_onnx_script_honours_the_resize_mode_and_natural_order(run_dir, chips, tmp_path, mode):
    """Non-square images through a pad / crop run: the script makes them square as chiptag does (not squashed),
    and lists a folder in natural name order, as `chiptag predict` does."""
    from dataclasses import replace

    from chiptag.models import checkpoint

    ckpt = checkpoint.load(run_dir / "checkpoint.pt")
    run = tmp_path / "run"
    run.mkdir()
    replace(ckpt, preprocessing=replace(ckpt.preprocessing, resize=mode)).save(run / "checkpoint.pt")
    model = tmp_path / "model.onnx"
    assert invoke("export", run, "--format", "onnx", "--out", model).exit_code == 0
    folder = tmp_path / "wide"
    folder.mkdir()
    for i, c in enumerate(chips[:11]):  # 48x48 chips stretched to 80x48 / 48x64: far from square
        with Image.open(c) as im:
            im.resize((80, 48) if i % 2 else (48, 64)).save(folder / f"chip_{i}.png")
    ours = tmp_path / "ours.csv"
    r = invoke("predict", run, folder, "--out", tmp_path / "sub.csv", "--probabilities", ours, "--workers", "0",
               "--device", "cpu")
    assert r.exit_code == 0, r.output
    theirs = tmp_path / "theirs.csv"
    (tmp_path / "runner.py").write_text(RUNNER)
    args = [REPO / "examples" / "onnx_predict.py", model, folder, "--out", theirs]
    done = subprocess.run([sys.executable, "runner.py", *map(str, args)], capture_output=True, text=True,
                          cwd=tmp_path, env={"PATH": os.environ.get("PATH", "")}, timeout=120)
    assert done.returncode == 0, done.stderr
    a, b = pd.read_csv(ours).set_index("image_name"), pd.read_csv(theirs).set_index("image_name")
    assert list(b.index) == list(a.index) == [f"chip_{i}" for i in range(11)]
    # chiptag resizes 8-bit pixels, the script floats: one 8-bit level at most (measured 6.7e-4 with pad); the
    # script before it honoured `resize` squashed these images: 0.052 (pad), 0.017 (crop)
    assert float((a - b).abs().max().max()) < 2e-3
