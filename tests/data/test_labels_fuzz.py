"""Fuzz the label-table readers: any file either parses or raises chiptag's own error, never anything else."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

from chiptag.config import DataConfig
from chiptag.data.labels import LabelTable, parse_table, read_table
from chiptag.data.validate import preflight
from chiptag.errors import ChiptagError

TOKENS = ["image_name", "tags", "clear", "haze", "primary", "a", "0", "1", "2", ",", ",", "\n", "\n", "\r\n", " ",
          "  ", "\t", '"', "'", "\ufeff", "\x00", "é", "#", ";", "nan", "NA", ""]
csv_like = st.lists(st.sampled_from(TOKENS), max_size=60).map("".join).map(lambda s: s.encode("utf-8"))
cell = st.lists(st.sampled_from(["clear", "haze", "primary", "a", "0", "1", "2", " ", "", "\t", '"', "é", "nan"]),
                max_size=4).map("".join)
structured = st.builds(  # mostly well-formed tables, so the row-level checks are reached too
    lambda header, rows, eol: (header + eol + "".join(",".join(r) + eol for r in rows)).encode("utf-8"),
    st.sampled_from(["image_name,tags", "image_name,clear,haze", "\ufeffimage_name,tags", "image_name, tags ",
                     "image_name,tags,tags", "image_name,,clear"]),
    st.lists(st.lists(cell, min_size=1, max_size=4), max_size=6), st.sampled_from(["\n", "\r\n"]))
table_bytes = st.one_of(structured, csv_like, st.binary(max_size=200))
formats = st.sampled_from(["auto", "tags", "onehot"])
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(raw=table_bytes, fmt=formats)
def test_label_parsing_parses_or_raises_chiptag_error(raw, fmt):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "labels.csv"
        path.write_bytes(raw)
        try:
            table = parse_table(path, read_table(path), fmt)
        except ChiptagError as exc:
            assert str(exc)
            return
        assert isinstance(table, LabelTable)
        assert table.y.shape == (len(table.names), len(table.tags))
        assert set(table.y.ravel().tolist()) <= {0, 1}


@FUZZ
@given(raw=table_bytes, fmt=formats, policy=st.sampled_from(["error", "skip"]))
def test_preflight_parses_or_raises_chiptag_error(raw, fmt, policy):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "train-jpg").mkdir()
        (root / "labels.csv").write_bytes(raw)
        data = DataConfig(root=root, labels="labels.csv", format=fmt, on_bad_image=policy)
        try:
            preflight(data)
        except ChiptagError as exc:
            assert str(exc)
            return
        raise AssertionError("no image exists, so preflight must stop with a ChiptagError")
