"""The GPU pipeline against its limits: extraction, fine-tuning and prediction vs the bare forward/train step.

On generated JPEG chips (default 4,000 at 256 px), ResNet50 @224, random init (the speed does not depend on the
weights):
  forward_limit_img_s  the extraction engine's forward alone (bf16, channels_last), input already on the GPU
  extract_img_s        chiptag's extraction into an empty cache: nvJPEG decode + resize + normalise + forward
  train_limit_img_s    one fine-tuning train step alone (all stages trainable, bf16, channels_last), input on
                       the GPU
  finetune_img_s       a fine-tuning epoch through chiptag's image loader, D4-augmented (train_one_epoch)
  predict_img_s        chiptag.inference.predictor.Predictor.predict on the same chips (auto engine/decoder)
  decoder_max_abs_feature_diff  nvJPEG vs libjpeg decodes of 512 chips, through the same backbone
  extract_cpu_decoder_img_s    extraction with decoder cpu (libjpeg in the workers) on the same RGB chips
  cmyk_extract_nvjpeg_img_s    extraction with decoder nvjpeg on the same chips saved as CMYK JPEGs (as the real
                               Planet chips are): nvJPEG takes none, the workers decode them all
  cmyk_extract_cpu_img_s       the same CMYK chips with decoder cpu
  cmyk_auto_decoder            what decoder: auto picks for the CMYK set from its pre-flight share (data.decoders)
Each figure is the best of --rounds. On a machine without CUDA it prints one line and exits 0 (nothing written).

    python benchmarks/gpu_pipeline.py --out benchmarks/results/gpu_pipeline.json
    python benchmarks/gpu_pipeline.py --device cpu --n 64 --size 64 --image-size 32 --backbone resnet18  # smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from PIL import Image

from chiptag.data.decoders import choose_decoder
from chiptag.data.image_check import check_images
from chiptag.data.problems import Report
from chiptag.data.augment import Augment
from chiptag.data.inputs import ImageInput, labelled_loader
from chiptag.data.labels import parse_table, read_table
from chiptag.data.synthetic import generate_dataset
from chiptag.features.backends import torch_forward
from chiptag.features.extraction import Extractor, cached_features, default_workers, extract
from chiptag.inference.predictor import Predictor
from chiptag.models.backbones import build_backbone, state_fingerprint
from chiptag.models.head import HeadSpec, Tagger
from chiptag.training.epoch import Step, train_one_epoch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4000, help="generated chips")
    p.add_argument("--size", type=int, default=256, help="generated chip size (px)")
    p.add_argument("--image-size", type=int, default=224, help="backbone input size (px)")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--batch-size", type=int, default=256, help="extraction and prediction batch")
    p.add_argument("--train-batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cuda", help="cuda (the benchmark); cpu only to smoke-test this script")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_pipeline.json"))
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def forward_limit(net: nn.Module, args, device: torch.device) -> float:
    forward = torch_forward(net, device)  # the extraction engine on CUDA: bf16 autocast, channels_last
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    forward(x)  # warm-up: cuDNN algorithm choice and allocations are not throughput
    steps = max(4, args.n // args.batch_size)
    return steps * args.batch_size / timed(lambda: [forward(x) for _ in range(steps)], device)


def trainable_tagger(bb, n_tags: int, device: torch.device) -> nn.Module:
    tagger = Tagger(bb.net, HeadSpec(bb.dim, n_tags).build(), frozen=False).to(device)
    for p in tagger.parameters():  # all stages: the predictor's frozen Tagger shared this backbone
        p.requires_grad_(True)
    return tagger.to(memory_format=torch.channels_last).train()


def train_limit(tagger: nn.Module, n_tags: int, args, device: torch.device) -> float:
    opt = torch.optim.AdamW(tagger.parameters(), lr=1e-4)
    x = torch.randn(args.train_batch_size, 3, args.image_size, args.image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (args.train_batch_size, n_tags), device=device).float()
    loss_fn = nn.BCEWithLogitsLoss()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(tagger(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    steps = max(4, args.n // args.train_batch_size // 2)
    return steps * args.train_batch_size / timed(lambda: [step() for _ in range(steps)], device)


def finetune_seconds(tagger: nn.Module, paths, y, bb, args, device: torch.device, workers: int) -> float:
    """A fine-tuning epoch as `chiptag train` runs it: its loader (decoder auto: nvJPEG batches on CUDA) with
    the default augmentation (D4; on the device after the decode)."""
    images = ImageInput.resolve(bb.preprocessing, device)
    loader = labelled_loader(images, paths, y, args.train_batch_size, shuffle=True,
                             generator=torch.Generator().manual_seed(0), num_workers=workers, augment=Augment())
    opt = torch.optim.AdamW(tagger.parameters(), lr=1e-4)
    step = Step(nn.BCEWithLogitsLoss(), device, amp=True, channels_last=True)
    train_one_epoch(tagger, loader, opt, step)  # warm-up epoch: workers start, cuDNN chooses
    return timed(lambda: train_one_epoch(tagger, loader, opt, step), device)


def decoder_difference(ex: Extractor, paths) -> dict:
    """max |features(nvjpeg) - features(libjpeg)| on the same chips, absolute and over the features' scale."""
    ours = extract(ex, paths).float()
    cpu = extract(replace(ex, images=replace(ex.images, decoder="cpu")), paths).float()
    diff = (ours - cpu).abs().max().item()
    return {"decoder_max_abs_feature_diff": diff,
            "decoder_max_feature_diff_over_scale": diff / max(cpu.abs().max().item(), 1e-12)}


def cmyk_copies(paths, out: Path) -> list[Path]:
    """The chips as 4-component CMYK JPEGs, as the real Planet train-jpg files are."""
    out.mkdir(parents=True, exist_ok=True)
    copies = []
    for p in paths:
        copies.append(out / Path(p).name)
        with Image.open(p) as im:
            im.convert("CMYK").save(copies[-1], "JPEG", quality=95)
    return copies


def decoder_extracts(ex: Extractor, rgb, cmyk, cache: Path, rounds: int, device: torch.device) -> dict:
    """Extraction img/s by decoder on RGB and CMYK chips, and what auto picks for the CMYK set."""
    rates = {}
    for label, paths, decoder in (("extract_cpu_decoder", rgb, "cpu"), ("cmyk_extract_nvjpeg", cmyk, "nvjpeg"),
                                  ("cmyk_extract_cpu", cmyk, "cpu")):
        run = replace(ex, images=replace(ex.images, decoder=decoder))
        best = min(timed(lambda: cached_features(run, paths, cache / f"{label}-{r}"), device) for r in range(rounds))
        rates[f"{label}_img_s"] = len(paths) / best
    report = Report()
    check_images(cmyk, report, check_size=False)
    decoder, why = choose_decoder("auto", device if device.type == "cuda" else torch.device("cuda"),
                                  report.nvjpeg_share)
    return {**rates, "cmyk_nvjpeg_share": report.nvjpeg_share, "cmyk_auto_decoder": decoder,
            "cmyk_auto_why": why}


def measure(args, device: torch.device, paths, y, cmyk) -> dict:
    torch.manual_seed(0)
    bb = build_backbone(args.backbone, None, args.image_size, progress=False)
    workers = default_workers("auto", device)
    limits, extracts, predicts = [], [], []
    predictor = Predictor(Tagger(bb.net, HeadSpec(bb.dim, y.shape[1]).build(), frozen=True), [str(i) for i in
                          range(y.shape[1])], [0.5] * y.shape[1], bb.preprocessing, device)
    predictor.predict(paths[:args.batch_size], batch_size=args.batch_size)  # engine built before timing
    with tempfile.TemporaryDirectory() as cache:
        for r in range(args.rounds):
            limits.append(forward_limit(bb.net, args, device))
            ex = Extractor(bb.name, state_fingerprint(bb.net), ImageInput.resolve(bb.preprocessing, device),
                           torch_forward(bb.net, device), args.batch_size, workers, show_progress=False)
            extracts.append(timed(lambda: cached_features(ex, paths, Path(cache) / f"r{r}"), device))
            predicts.append(timed(lambda: predictor.predict(paths, batch_size=args.batch_size), device))
        decode_diff = decoder_difference(ex, paths[:512])
        by_decoder = decoder_extracts(ex, paths, cmyk, Path(cache), args.rounds, device)
    tagger = trainable_tagger(bb, y.shape[1], device)
    t_limit = max(train_limit(tagger, y.shape[1], args, device) for _ in range(args.rounds))
    t_finetune = min(finetune_seconds(tagger, paths, y, bb, args, device, workers) for _ in range(args.rounds))
    limit, extract = max(limits), len(paths) / min(extracts)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "backbone": args.backbone, "image_size": args.image_size, "chip_size": args.size,
            "images": len(paths), "forward_limit_img_s": limit, "extract_img_s": extract,
            "extract_efficiency": extract / limit, "train_limit_img_s": t_limit,
            "finetune_img_s": len(paths) / t_finetune, "finetune_efficiency": len(paths) / t_finetune / t_limit,
            "predict_img_s": len(paths) / min(predicts), "predict_vs_extract": min(extracts) / min(predicts),
            "decoder": predictor.images.decoder, **decode_diff, "engine": predictor.engine, "decode_workers": workers,
            **by_decoder}


def main() -> None:
    args = parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("make bench-gpu: no CUDA device on this machine; nothing measured, "
              f"{args.out} left as it is")
        sys.exit(0)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="chiptag-bench-gpu-") as tmp:
        data = generate_dataset(Path(tmp) / "data", n=args.n, size=args.size, seed=0)
        table = parse_table(data / "train_classes.csv", read_table(data / "train_classes.csv"), "tags")
        paths = [data / "train-jpg" / f"{n}.jpg" for n in table.names]
        cmyk = cmyk_copies(paths, Path(tmp) / "cmyk-jpg")
        res = measure(args, device, paths, table.y.astype("float32"), cmyk)
    for key, value in res.items():
        print(f"{key:<36}{value:.4g}" if isinstance(value, float) else f"{key:<36}{value}")
    print(f"CMYK chips: nvjpeg path {res['cmyk_extract_nvjpeg_img_s']:.0f} img/s, cpu path "
          f"{res['cmyk_extract_cpu_img_s']:.0f} img/s (RGB: nvjpeg {res['extract_img_s']:.0f}, cpu "
          f"{res['extract_cpu_decoder_img_s']:.0f}); auto picks {res['cmyk_auto_decoder']}")
    print(f"targets: extract_efficiency >= 0.6 -> {'met' if res['extract_efficiency'] >= 0.6 else 'MISSED'}; "
          f"finetune_efficiency >= 0.7 -> {'met' if res['finetune_efficiency'] >= 0.7 else 'MISSED'}; "
          f"predict >= 0.85 x extract -> {'met' if res['predict_vs_extract'] >= 0.85 else 'MISSED'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**res, "command": " ".join(["python"] + sys.argv)}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
