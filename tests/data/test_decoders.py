"""The nvjpeg decoder path (bytes in workers, batched decode on the device, per-image CPU fallback) run on the
CPU: the same batches as the cpu decoder, the same per-image errors. Only nvJPEG's kernel needs CUDA."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from chiptag.data.decoders import choose_decoder, device_batches, nvjpeg_can_take, resolve_decoder
from chiptag.data.images import ImageDataset, Preprocessing
from chiptag.data.inputs import ImageInput
from chiptag.errors import ChiptagError


def _jpeg(mode: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).convert(mode).save(
        buf, "JPEG", **kw)
    return buf.getvalue()


def test_header_check_sends_only_plain_jpegs_to_nvjpeg(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    assert nvjpeg_can_take(_jpeg("RGB")) and nvjpeg_can_take(_jpeg("L"))
    assert nvjpeg_can_take(_jpeg("RGB", progressive=True))
    assert not nvjpeg_can_take(_jpeg("CMYK"))  # 4 components
    assert not nvjpeg_can_take(png.getvalue()) and not nvjpeg_can_take(b"") and not nvjpeg_can_take(b"\xff\xd8")


def _mixed_inputs(tiny_data, tmp_path):
    good = sorted((tiny_data / "train-jpg").glob("*.jpg"))[:5]
    png_named_jpg = tmp_path / "png.jpg"
    Image.open(good[0]).save(png_named_jpg, "PNG")
    cmyk = tmp_path / "cmyk.jpg"
    cmyk.write_bytes(_jpeg("CMYK"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(good[1].read_bytes()[:200])  # a JPEG header, then nothing: nvJPEG and libjpeg fail
    return good[:2] + [png_named_jpg, cmyk, broken, tmp_path / "missing.jpg"] + good[2:]


@pytest.mark.parametrize("view", [0, 5])
@pytest.mark.parametrize("workers", [0, 1])
def test_device_path_gives_the_cpu_batches_with_the_same_errors(tiny_data, tmp_path, view, workers):
    paths = _mixed_inputs(tiny_data, tmp_path)
    data = ImageDataset(paths, Preprocessing(32), view=view, keep_errors=True)
    cpu = list(ImageInput(Preprocessing(32)).batches(paths, 4, 0, view=view, keep_errors=True))
    dev = list(device_batches(data, 4, workers, "cpu"))  # the nvjpeg path, decoding with the CPU kernel
    assert [b[1].tolist() for b in dev] == [b[1].tolist() for b in cpu]
    assert [b[2] for b in dev] == [b[2] for b in cpu]
    errors = [e for b in dev for e in b[2]]
    assert "broken.jpg" in errors[4] and "missing.jpg" in errors[5] and errors[2] == errors[3] == ""
    for (xd, _, _), (xc, _, _) in zip(dev, cpu):
        assert xd.dtype == torch.uint8 and xd.shape == xc.shape
        assert (xd.int() - xc.int()).abs().max() <= 1  # float resize rounded vs the uint8 kernel


def test_device_path_raises_naming_the_file_when_errors_are_not_kept(tiny_data, tmp_path):
    data = ImageDataset(_mixed_inputs(tiny_data, tmp_path), Preprocessing(32))
    with pytest.raises(ChiptagError, match="broken.jpg"):
        list(device_batches(data, 8, 0, "cpu"))


def test_decoder_choice():
    assert resolve_decoder("auto", torch.device("cpu")) == "cpu"
    assert resolve_decoder("auto", torch.device("cuda")) == "nvjpeg"
    with pytest.raises(ChiptagError, match="nvjpeg"):
        resolve_decoder("nvjpeg", torch.device("cpu"))
    with pytest.raises(ChiptagError, match="unknown decoder"):
        resolve_decoder("pillow", torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)")
def test_nvjpeg_on_cuda_is_within_a_few_levels_of_libjpeg(tiny_data, tmp_path):
    paths = _mixed_inputs(tiny_data, tmp_path)
    data = ImageDataset(paths, Preprocessing(32), keep_errors=True)
    cpu = torch.cat([b[0] for b in ImageInput(Preprocessing(32)).batches(paths, 4, 0, keep_errors=True)])
    gpu = torch.cat([b[0].cpu() for b in device_batches(data, 4, 0, "cuda")])
    assert (gpu.int() - cpu.int()).abs().max() <= 8  # IDCT differences (not yet measured on a GPU)


def test_files_nvjpeg_cannot_take_decode_in_the_workers_never_in_the_main_process(tiny_data, tmp_path,
                                                                                     monkeypatch):
    """The real Planet chips are CMYK: on the nvjpeg path they were decoded one by one in the main process."""
    import os

    import chiptag.data.decoders as decoders_mod
    import chiptag.data.images as images_mod

    good = sorted((tiny_data / "train-jpg").glob("*.jpg"))[:6]
    paths = []
    for k, p in enumerate(good):
        cmyk = tmp_path / f"cmyk{k}.jpg"
        Image.open(p).convert("CMYK").save(cmyk, "JPEG", quality=95)
        paths += [cmyk, p]
    log = tmp_path / "decoded_in.txt"
    real = images_mod.decode_rgb

    def recording(raw, name):  # workers are forked: they inherit this patch and append their own pid
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(raw, name)

    monkeypatch.setattr(images_mod, "decode_rgb", recording)
    monkeypatch.setattr(decoders_mod, "decode_rgb", recording, raising=False)
    pre = Preprocessing(32)
    dev = list(ImageInput(pre, torch.device("cpu"), "nvjpeg").batches(paths, 4, 2))
    pids = {int(s) for s in log.read_text().split()}
    assert len(log.read_text().split()) == 6 and os.getpid() not in pids  # the 6 CMYK chips, all in workers
    log.unlink()
    cpu = list(ImageInput(pre).batches(paths, 4, 0))
    for (xd, idx_d, _), (xc, idx_c, _) in zip(dev, cpu):
        assert idx_d.tolist() == idx_c.tolist() and (xd.int() - xc.int()).abs().max() <= 1


def test_auto_takes_nvjpeg_only_when_most_chips_are_nvjpeg_decodable():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    decoder, why = choose_decoder("auto", cuda, 0.0)  # the real Planet chips: all CMYK
    assert decoder == "cpu" and "nvJPEG can take 0% of the images" in why and "CPU workers" in why
    decoder, why = choose_decoder("auto", cuda, 0.97)
    assert decoder == "nvjpeg" and "97%" in why and "GPU" in why
    assert choose_decoder("auto", cuda)[0] == "nvjpeg"  # share unknown (predict on a folder): as before
    assert choose_decoder("auto", cpu, 1.0) == ("cpu", "auto: the device is cpu")
    assert choose_decoder("nvjpeg", cuda, 0.0)[0] == "nvjpeg"  # asked for by name: as asked
