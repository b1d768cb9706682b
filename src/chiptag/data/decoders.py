"""The two decoders behind the one input object (data.inputs.ImageInput): `cpu` and `nvjpeg`.

cpu: workers (or a prefetch thread) decode with libjpeg (torchvision, Pillow as fallback) and resize on uint8;
batches leave them as uint8 (N, 3, S, S).

nvjpeg: workers read file bytes and check each header (nvjpeg_can_take); each batch of JPEGs nvJPEG takes is
decoded on the device in one call (`torchvision.io.decode_jpeg(list, device=...)`, nvJPEG on CUDA), resized and
turned into its D4 view there. Anything nvJPEG cannot take - not a JPEG (a PNG behind a .jpg name), CMYK (the
real Planet chips) or 12-bit JPEG, arithmetic or lossless coding - is decoded and resized by the CPU decoder
in the worker that read it, so those decode in parallel, never one by one in the main process; only a file
that passed the header check and still failed on the device (corrupt data: rare) is decoded from its bytes in
the main process, to report its error as the cpu decoder would. Per-image error reporting is the cpu
decoder's (named file; one bad file never ends a batch when errors are kept). nvJPEG and libjpeg use different
IDCTs, so their pixels differ by a few levels; the feature cache records which decoder produced its features
(features.extraction.fingerprint).

`decoder: auto` (choose_decoder) takes nvjpeg on CUDA only when most of the dataset is nvJPEG-decodable
(pre-flight counts it: data.problems.Report.nvjpeg): below that the workers decode most chips anyway, and
the cpu path does the same work without the header checks and the second path.

The batch decoder takes the device as a parameter: CPU tests run this very path with torchvision's CPU
decode_jpeg, so only the nvJPEG kernel itself is left to a CUDA machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from chiptag.data.images import ImageDataset, Preprocessing, blank, d4, decode, fit, prefetched
from chiptag.errors import ChiptagError
from chiptag.interrupt import ignore_sigint_in_worker

DECODERS = ("auto", "cpu", "nvjpeg")
# Huffman-coded baseline, extended and progressive frames; nvJPEG has no arithmetic or lossless decoder.
_NVJPEG_FRAMES = {0xC0, 0xC1, 0xC2}
_OTHER_FRAMES = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


NVJPEG_MIN_SHARE = 0.5  # auto takes nvjpeg when at least this share of the images is nvJPEG-decodable


def choose_decoder(name: str, device: torch.device, nvjpeg_share: float | None = None) -> tuple[str, str]:
    """-> (decoder, why). auto: cpu off CUDA; on CUDA nvjpeg, unless pre-flight found that less than
    NVJPEG_MIN_SHARE of the images are nvJPEG-decodable (`nvjpeg_share`; None: not known, e.g. predict on a
    folder). Both paths decode what nvJPEG cannot take in the workers, so with few decodable chips the GPU
    would add little and the cpu path does the same decoding in one place."""
    if name not in DECODERS:
        raise ChiptagError(f"features.decoder: unknown decoder {name!r} (valid: {', '.join(DECODERS)})")
    share = "" if nvjpeg_share is None else f"nvJPEG can take {nvjpeg_share:.0%} of the images"
    if name == "nvjpeg" and device.type != "cuda":
        raise ChiptagError(f"features.decoder is nvjpeg but the device is {device}; use decoder: auto or cpu")
    if name != "auto":
        return name, f"features.decoder: {name}" + (f" ({share})" if share else "")
    if device.type != "cuda":
        return "cpu", f"auto: the device is {device.type}"
    if nvjpeg_share is not None and nvjpeg_share < NVJPEG_MIN_SHARE:
        return "cpu", (f"auto: {share} (CMYK, 12-bit or non-JPEG files are the rest), under "
                       f"{NVJPEG_MIN_SHARE:.0%}: every image decodes in the CPU workers")
    return "nvjpeg", ("auto: CUDA" + (f", {share}: batches on the GPU, the rest in the CPU workers" if share
                                      else ", nvJPEG batches on the GPU (files it cannot take: in the workers)"))


def resolve_decoder(name: str, device: torch.device, nvjpeg_share: float | None = None) -> str:
    """The decoder by choose_decoder's rule: auto -> nvjpeg on CUDA (unless few images are nvJPEG-decodable),
    cpu elsewhere."""
    return choose_decoder(name, device, nvjpeg_share)[0]


def nvjpeg_can_take(data: bytes) -> bool:
    """Whether the bytes are a JPEG nvJPEG decodes: an 8-bit Huffman frame with 1 (gray) or 3 components.
    Walks the marker segments up to the frame header; anything else goes to the CPU decoder."""
    if data[:2] != b"\xff\xd8":
        return False
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _NVJPEG_FRAMES:
            return i + 9 < len(data) and data[i + 4] == 8 and data[i + 9] in (1, 3)
        if marker in _OTHER_FRAMES or marker == 0xDA:  # another coding, or scan data before any frame
            return False
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return False


class FileBytes(torch.utils.data.Dataset):
    """Item: (payload, index, error, on_device). on_device: the payload is the file's bytes (uint8, 1-D) for the
    batched device decode. Otherwise it is the image already decoded and fitted by the CPU decoder here, in
    the worker (uint8 3xSxS; nvJPEG cannot take the file), or empty with `error` saying why."""

    def __init__(self, paths: Sequence[Path], pre: Preprocessing):
        self.paths, self.pre = list(paths), pre

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str, bool]:
        path = Path(self.paths[i])
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return torch.empty(0, dtype=torch.uint8), i, f"image not found: {path}", False
        except OSError as exc:
            return torch.empty(0, dtype=torch.uint8), i, f"cannot read image {path}: {exc}", False
        if nvjpeg_can_take(data[:65536]):
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), i, "", True
        chip, error = cpu_decode(data, path, self.pre)
        return chip, i, error, False


def cpu_decode(data: bytes, path: Path, pre: Preprocessing) -> tuple[torch.Tensor, str]:
    """Bytes -> (fitted uint8 3xSxS, "") by the cpu decoder, or (empty, the message ImageDataset would give)."""
    try:
        return fit(decode(data, path, pre), pre), ""
    except ChiptagError as exc:
        return torch.empty(0, dtype=torch.uint8), str(exc)
    except Exception as exc:  # noqa: BLE001 - e.g. a decoder's RuntimeError, reported per image as ImageDataset does
        return torch.empty(0, dtype=torch.uint8), f"cannot read image {path}: {exc.__class__.__name__}: {exc}"


def as_list(batch):
    return batch


def _device_decode(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """One batched decode; when it fails, image by image (None: this one needs the CPU decoder)."""
    try:
        return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
    except Exception:  # noqa: BLE001 - one undecodable file fails the whole batched call
        pass
    out: list[torch.Tensor | None] = []
    for d in datas:
        try:
            out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
        except Exception:  # noqa: BLE001 - falls back to the CPU decoder, which reports the error
            out.append(None)
    return out


def decode_batch(items: list, data: ImageDataset,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """FileBytes items -> (uint8 (N, 3, S, S) on `device` in data.view, indices, errors): the same batch the
    cpu decoder gives, the nvJPEG-decodable part decoded on the device, the rest as the workers decoded it."""
    errors = [e for _, _, e, _ in items]
    images: list[torch.Tensor | None] = [None if on_device or e else x.to(device, non_blocking=True)
                                         for x, _, e, on_device in items]
    fast = [k for k, (_, _, _, on_device) in enumerate(items) if on_device]
    for k, img in zip(fast, _device_decode([items[k][0] for k in fast], device) if fast else []):
        images[k] = img
    for k, (payload, i, _, on_device) in enumerate(items):
        if images[k] is None and on_device:  # passed the header check, failed on the device: corrupt, rare
            chip, errors[k] = cpu_decode(payload.numpy().tobytes(), data.paths[i], data.pre)
            images[k] = chip.to(device) if not errors[k] else None
        if errors[k]:
            if not data.keep_errors:
                raise ChiptagError(errors[k])
            images[k] = blank(data.pre).to(device)
    x = torch.stack([fit(img, data.pre) for img in images])
    idx = torch.tensor([i for _, i, _, _ in items])
    return (d4(x, data.view) if data.view else x), idx, errors


def device_batches(data: ImageDataset, batch_size: int, num_workers: int, device: torch.device | str,
                   prefetch: int = 2) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Ordered batches of `data`, bytes read ahead by workers (or a thread), decoded on `device`."""
    device = torch.device(device)
    raw = FileBytes(data.paths, data.pre)
    if num_workers == 0:
        loader = prefetched(raw, batch_size, prefetch, collate_fn=as_list)
    else:
        loader = torch.utils.data.DataLoader(raw, batch_size=batch_size, num_workers=num_workers,
                                             collate_fn=as_list, prefetch_factor=prefetch,
                                             worker_init_fn=ignore_sigint_in_worker)
    for items in loader:
        yield decode_batch(items, data, device)
