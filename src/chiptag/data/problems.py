"""Validation report: problems grouped by kind, with counts and the first examples (file and CSV row).

Severities: `bad` items are unusable rows or images (policy `data.on_bad_image` decides: stop, or skip them
and list them); `warn` items are used as they are but look like a mistake (a tag that looks like a typo of
another): named with their rows, never refused; `note` items were handled on read (a BOM, CRLF, stray spaces, a
PNG behind a .jpg name) and are only reported; conversions to RGB are counted per source mode.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from chiptag.atomic import write_json, write_text

# kind -> (severity, what the user reads)
KINDS: dict[str, tuple[str, str]] = {
    "empty_name": ("bad", "empty image name"),
    "duplicate_same": ("note", "identical duplicate row (same name, same tags): kept once"),
    "duplicate_conflict": ("bad", "duplicate image name with conflicting tags (skip drops every copy)"),
    "empty_tags": ("bad", "empty tag list"),
    "unknown_tag": ("bad", "tag outside the run's vocabulary"),
    "onehot_value": ("bad", "one-hot cell that is not 0 or 1"),
    "outside_images": ("bad", "image name that resolves outside data.images (../, an absolute path): never read"),
    "image_missing": ("bad", "image file missing"),
    "image_unreadable": ("bad", "image file not readable (permissions)"),
    "zero_bytes": ("bad", "image file is empty (0 bytes)"),
    "not_an_image": ("bad", "not an image Pillow can identify"),
    "truncated": ("bad", "truncated or corrupt image data"),
    "bomb": ("bad", "image over the pixel cap (data.max_image_pixels; decompression bomb guard)"),
    "size_off": ("bad", "image size far from the expected one (data.expected_size)"),
    "too_small": ("bad", "image smaller than data.min_side"),
    "corrupt": ("bad", "corrupt image data (found by a full decode)"),
    "band_missing": ("bad", "raster with fewer bands than data.bands asks for"),
    "band_count": ("bad", "raster whose band count differs from the other chips' (or the model's files')"),
    "sample_type": ("bad", "raster samples chiptag does not read (complex, or float64 beyond float32's range)"),
    "nodata": ("bad", "raster with NaN/nodata pixels (data.fill: error; data.fill: mean fills them with the "
                      "band's training mean)"),
    "mostly_nodata": ("bad", "raster over half NaN/nodata (data.nodata or its GDAL_NODATA tag): too little to tag"),
    "size_unusual": ("note", "image size far from the usual one (fine: data.resize makes it square; set "
                             "data.expected_size to make this an error)"),
    "ignored_column": ("note", "label-table column that is not a 0/1 tag column (ignored; data.tag_columns "
                               "names the label columns)"),
    "repeated_tag": ("note", "tag repeated within a row (counted once)"),
    "bom": ("note", "UTF-8 byte-order mark at the start of the label table (ignored)"),
    "crlf": ("note", "CRLF (Windows) line ends in the label table (handled)"),
    "whitespace": ("note", "stray whitespace around names or tags (stripped)"),
    "tag_typo": ("warn", "rare tag one edit away from a common one: a typo? (trained as a tag of its own; fix "
                         "the rows if it is one)"),
    "format_mismatch": ("note", "file content does not match its extension (decoded by content)"),
    "multi_frame": ("note", "multi-frame image (animated GIF/WebP/PNG, multi-page TIFF): its first frame is used"),
}
EXAMPLES = 3


@dataclass
class Problem:
    kind: str
    file: str
    row: int | None  # CSV row number as an editor shows it (the header is row 1); None: not from a row
    detail: str = ""

    def where(self) -> str:
        return (f"row {self.row}: " if self.row is not None else "") + self.file


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    converted: Counter = field(default_factory=Counter)  # source mode -> images converted to RGB
    rows: int = 0
    images: int = 0
    policy: str = "error"
    nvjpeg: int = 0  # usable images nvJPEG can decode on the GPU (the rest: CPU decoder; data.decoders)
    usable: int = 0  # usable images checked (the share's denominator)

    @property
    def nvjpeg_share(self) -> float | None:
        """The share of usable images nvJPEG can take (what decoder: auto weighs), None when none were checked."""
        return self.nvjpeg / self.usable if self.usable else None

    def add(self, kind: str, file: str | Path, row: int | None = None, detail: str = "") -> None:
        if kind not in KINDS:
            raise KeyError(f"unknown problem kind {kind!r}")
        self.problems.append(Problem(kind, str(file), row, detail))

    def skipped_rows(self, usable: int) -> int:
        """Rows left out of `usable` ones; the repeats of identical duplicate rows are merged, not skipped."""
        return self.rows - usable - len(self.by_kind().get("duplicate_same", []))

    def of_severity(self, severity: str) -> list[Problem]:
        return [p for p in self.problems if KINDS[p.kind][0] == severity]

    @property
    def bad(self) -> list[Problem]:
        return self.of_severity("bad")

    def by_kind(self, problems: list[Problem] | None = None) -> dict[str, list[Problem]]:
        groups: dict[str, list[Problem]] = {}
        for p in self.problems if problems is None else problems:
            groups.setdefault(p.kind, []).append(p)
        return groups

    def _lines(self, problems: list[Problem]) -> list[str]:
        lines = []
        for kind, items in self.by_kind(problems).items():
            lines.append(f"  {KINDS[kind][1]}: {len(items)}")
            lines += [f"    {p.where()}" + (f" ({p.detail})" if p.detail else "") for p in items[:EXAMPLES]]
            if len(items) > EXAMPLES:
                lines.append(f"    ... and {len(items) - EXAMPLES} more")
        return lines

    def format(self) -> str:
        """The listing the user reads: unusable items first, then what was handled on read."""
        lines = [f"checked {self.rows} label rows and {self.images} images"]
        if self.usable:
            lines[0] += (f"; nvJPEG (GPU decoding) can take {self.nvjpeg} of {self.usable} usable "
                         f"({self.nvjpeg_share:.0%}: not CMYK, 12-bit, PNG...)")
        if self.bad:
            lines.append(f"{len(self.bad)} problem(s) that make rows or images unusable:")
            lines += self._lines(self.bad)
        warnings = self.of_severity("warn")
        if warnings:
            lines.append("worth a look (used as they are):")
            lines += self._lines(warnings)
        notes = self.of_severity("note")
        if notes or self.converted:
            lines.append("handled on read (no action needed):")
            lines += self._lines(notes)
            if self.converted:
                counts = ", ".join(f"{m} {n}" for m, n in sorted(self.converted.items()))
                lines.append(f"  converted to RGB: {counts}")
        return "\n".join(lines)

    def error_message(self) -> str:
        return (f"data validation failed (data.on_bad_image=error):\n{self.format()}\n"
                "Fix these files, or set data.on_bad_image=skip to leave them out (each skipped item is listed "
                "in the run dir's skipped.csv).")

    def to_dict(self, skipped: int = 0) -> dict:
        return {
            "policy": self.policy, "rows": self.rows, "images": self.images, "skipped": skipped,
            "problems": {k: len(v) for k, v in self.by_kind().items()},
            "converted_to_rgb": dict(self.converted),
            "nvjpeg_decodable": {"images": self.nvjpeg, "of": self.usable},
            "skipped_items": [vars(p) for p in self.bad],
        }

    def write(self, skipped_csv: Path, validation_json: Path, skipped: int) -> None:
        """The list of every unusable item with its reason (CSV) and this report as JSON, both atomic."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["row", "file", "kind", "reason", "detail"])
        for p in self.bad:
            w.writerow(["" if p.row is None else p.row, p.file, p.kind, KINDS[p.kind][1], p.detail])
        write_text(skipped_csv, buf.getvalue())
        write_json(validation_json, self.to_dict(skipped))
