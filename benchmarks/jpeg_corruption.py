"""What strict libjpeg-turbo says about damaged JPEG scan data, and how chiptag classifies it.

Chips from `chiptag demo-data`'s generator (Pillow, quality 95 as the generator writes them) are damaged three
ways inside the entropy-coded data (markers before it untouched, EOI intact): 40 bytes overwritten, a run of
1-63 bytes removed, 3 bits flipped. For each: libjpeg-turbo's strict message (simplejpeg), chiptag's verdict
(data.images: harmless padding or corrupt), and the share of pixels more than 32 levels off the intact decode.
It also prints how many "extraneous bytes before marker 0xd9" counts fall within data.images.MAX_JPEG_PADDING
(damage that would pass as padding).

    python benchmarks/jpeg_corruption.py --n 60 --size 256 --out benchmarks/results/jpeg_corruption.json
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import simplejpeg

from chiptag.data.images import MAX_JPEG_PADDING, jpeg_corruption
from chiptag.data.synthetic import generate_dataset


def strict(raw: bytes) -> str:
    try:
        simplejpeg.decode_jpeg(raw, strict=True)
    except ValueError as exc:
        return str(exc)
    return "clean"


def damaged(raw: bytes, kind: str, rng: np.random.Generator) -> bytes:
    sos = raw.rfind(b"\xff\xda")
    start, end = sos + 2 + int.from_bytes(raw[sos + 2:sos + 4], "big"), len(raw) - 2
    out = bytearray(raw)
    pos = int(rng.integers(start, end - 64))
    if kind == "overwrite":
        out[pos:pos + 40] = rng.integers(0, 255, 40, dtype=np.uint8).tobytes()  # 0..254: writes no marker
    elif kind == "remove":
        del out[pos:pos + int(rng.integers(1, 64))]
    else:
        for _ in range(3):
            out[int(rng.integers(start, end))] ^= 1 << int(rng.integers(8))
    return bytes(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=60, help="chips")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--per", type=int, default=20, help="damaged copies per chip and kind")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/jpeg_corruption.json"))
    a = p.parse_args()
    rng = np.random.default_rng(0)
    outcomes: dict = collections.defaultdict(lambda: {"count": 0, "chiptag_corrupt": 0, "pixels_off": []})
    counts = []
    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(Path(tmp), n=a.n, size=a.size, seed=3)
        for f in sorted((Path(tmp) / "train-jpg").glob("*.jpg")):
            raw = f.read_bytes()
            ref = simplejpeg.decode_jpeg(raw).astype(np.int64)
            for kind in ("overwrite", "remove", "flip"):
                for _ in range(a.per):
                    bad = damaged(raw, kind, rng)
                    said = strict(bad)
                    o = outcomes[f"{kind}: {re.sub(r'[0-9a-f]*[0-9][0-9a-f]*', 'N', said)}"]
                    o["count"] += 1
                    o["chiptag_corrupt"] += jpeg_corruption(bad) is not None
                    try:
                        px = simplejpeg.decode_jpeg(bad, strict=False).astype(np.int64)
                        o["pixels_off"].append(float((np.abs(px - ref) > 32).mean()) if px.shape == ref.shape
                                               else 1.0)
                    except ValueError:
                        pass
                    m = re.search(r"(\d+) extraneous bytes before marker 0xd9", said)
                    if m:
                        counts.append(int(m.group(1)))
    table = {k: {"count": v["count"], "chiptag_corrupt": v["chiptag_corrupt"],
                 "median_pixels_off_32": float(np.median(v["pixels_off"])) if v["pixels_off"] else None,
                 "over_1pct_pixels_off": int(sum(x > 0.01 for x in v["pixels_off"]))}
             for k, v in sorted(outcomes.items())}
    c = np.asarray(counts)
    result = {"command": "python " + " ".join(sys.argv), "chips": a.n, "size": a.size, "outcomes": table,
              "extraneous_before_eoi": {"n": len(c), "median": float(np.median(c)),
                                        f"at_most_{MAX_JPEG_PADDING}": int((c <= MAX_JPEG_PADDING).sum())}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    for k, v in table.items():
        print(f"{v['count']:5d} {k}  chiptag corrupt {v['chiptag_corrupt']}  median px off "
              f"{v['median_pixels_off_32']}  >1% off {v['over_1pct_pixels_off']}")
    print(json.dumps(result["extraneous_before_eoi"]))


if __name__ == "__main__":
    main()
