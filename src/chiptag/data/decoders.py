"""The two decoders behind the one input object (data.inputs.ImageInput): `cpu` and `nvjpeg`.

cpu: workers (or a prefetch thread) decode with libjpeg (torchvision, Pillow as fallback) and resize on uint8;
batches leave them as uint8 (N, 3, S, S).

nvjpeg: workers only read file bytes; each batch of JPEGs is decoded on the device in one call
(`torchvision.io.decode_jpeg(list, device=...)`, nvJPEG on CUDA), resized and turned into its D4 view there.
Anything nvJPEG cannot take - not a JPEG (a PNG behind a .jpg name), CMYK or 12-bit JPEG, arithmetic or
lossless coding, a decode error - goes to the CPU decoder for that image alone, with the same per-image error
reporting (named file; one bad file never ends a batch when errors are kept). nvJPEG and libjpeg use
different IDCTs, so their pixels differ by a few levels; the feature cache records which decoder produced
its features (features.extraction.fingerprint).

The batch decoder takes the device as a parameter: CPU tests run this very path with torchvision's CPU
decode_jpeg, so only the nvJPEG kernel itself is left to a CUDA machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from chiptag.data.images import ImageDataset, d4, fit, prefetched, read_rgb
from chiptag.errors import ChiptagError
from chiptag.interrupt import ignore_sigint_in_worker

DECODERS = ("auto", "cpu", "nvjpeg")
# Huffman-coded baseline, extended and progressive frames; nvJPEG has no arithmetic or lossless decoder.
_NVJPEG_FRAMES = {0xC0, 0xC1, 0xC2}
_OTHER_FRAMES = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def resolve_decoder(name: str, device: torch.device) -> str:
    """auto -> nvjpeg on CUDA, cpu elsewhere."""
    if name not in DECODERS:
        raise ChiptagError(f"features.decoder: unknown decoder {name!r} (valid: {', '.join(DECODERS)})")
    if name == "auto":
        return "nvjpeg" if device.type == "cuda" else "cpu"
    if name == "nvjpeg" and device.type != "cuda":
        raise ChiptagError(f"features.decoder is nvjpeg but the device is {device}; use decoder: auto or cpu")
    return name


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
    """Item: (file bytes as a uint8 tensor, index, error, nvjpeg_can_take). Reading is all a worker does."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str, bool]:
        try:
            data = Path(self.paths[i]).read_bytes()
        except FileNotFoundError:
            return torch.empty(0, dtype=torch.uint8), i, f"image not found: {self.paths[i]}", False
        except OSError as exc:
            return torch.empty(0, dtype=torch.uint8), i, f"cannot read image {self.paths[i]}: {exc}", False
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), i, "", nvjpeg_can_take(data[:65536])


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
    cpu decoder gives, decoded on the device."""
    size = data.pre.image_size
    errors = [e for _, _, e, _ in items]
    images: list[torch.Tensor | None] = [None] * len(items)
    fast = [k for k, (_, _, e, ok) in enumerate(items) if ok and not e]
    for k, img in zip(fast, _device_decode([items[k][0] for k in fast], device) if fast else []):
        images[k] = img
    for k, (_, i, e, _) in enumerate(items):
        if images[k] is None and not e:
            try:  # the CPU decoder: PNG behind .jpg, CMYK, 16-bit, a file nvJPEG rejected
                images[k] = read_rgb(data.paths[i]).to(device)
            except ChiptagError as exc:
                errors[k] = str(exc)
        if errors[k]:
            if not data.keep_errors:
                raise ChiptagError(errors[k])
            images[k] = torch.zeros(3, size, size, dtype=torch.uint8, device=device)
    x = torch.stack([fit(img, data.pre) for img in images])
    idx = torch.tensor([i for _, i, _, _ in items])
    return (d4(x, data.view) if data.view else x), idx, errors


def device_batches(data: ImageDataset, batch_size: int, num_workers: int, device: torch.device | str,
                   prefetch: int = 2) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """Ordered batches of `data`, bytes read ahead by workers (or a thread), decoded on `device`."""
    device = torch.device(device)
    raw = FileBytes(data.paths)
    if num_workers == 0:
        loader = prefetched(raw, batch_size, prefetch, collate_fn=as_list)
    else:
        loader = torch.utils.data.DataLoader(raw, batch_size=batch_size, num_workers=num_workers,
                                             collate_fn=as_list, prefetch_factor=prefetch,
                                             worker_init_fn=ignore_sigint_in_worker)
    for items in loader:
        yield decode_batch(items, data, device)
