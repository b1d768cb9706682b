"""Pre-flight validation: one test per bad-input kind, on files generated in the test."""

from __future__ import annotations

import pytest

from chiptag.data.validate import preflight
from chiptag.errors import ChiptagError
from validate_helpers import GOOD, kinds, make_data, skip


def test_missing_label_file(tmp_path):
    data = make_data(tmp_path)
    data.labels = "nope.csv"
    with pytest.raises(ChiptagError, match="label table not found: .*nope.csv"):
        preflight(data)


def test_empty_label_file(tmp_path):
    with pytest.raises(ChiptagError, match="empty"):
        preflight(make_data(tmp_path, text=""))


def test_missing_columns(tmp_path):
    with pytest.raises(ChiptagError, match="missing id column 'image_name'.*columns: name, tags"):
        preflight(make_data(tmp_path, header="name,tags"))
    with pytest.raises(ChiptagError, match="missing tags column 'tags'"):
        preflight(make_data(tmp_path / "b", header="image_name,labels", format="tags"))


def test_bom_and_crlf_are_handled_and_noted(tmp_path):
    text = "\ufeffimage_name,tags\r\n" + "".join(f"g{i},{t}\r\n" for i, t in enumerate(GOOD))
    ds, report = preflight(make_data(tmp_path, text=text))
    assert ds.table.names == [f"g{i}" for i in range(5)]
    assert "cloudy" in ds.table.tags and not any("\r" in t for t in ds.table.tags)
    assert set(kinds(report)) == {"bom", "crlf"} and not report.bad


def test_identical_duplicate_rows_are_kept_once_and_noted(tmp_path):
    data = make_data(tmp_path, [("g1", "primary haze")])  # same set as row 3, other order
    ds, report = preflight(data)  # on_bad_image=error: nothing is ambiguous, so nothing stops
    assert ds.table.names.count("g1") == 1 and len(ds.table) == 5 and not report.bad
    assert kinds(report)["duplicate_same"] == [(7, "'g1' first at row 3")]
    assert "identical duplicate row (same name, same tags): kept once: 1\n    row 7:" in report.format()


def test_repeated_tag_in_a_row_is_noted(tmp_path):
    ds, report = preflight(make_data(tmp_path, [("r", "cultivation primary cultivation"), ("s", "clear clear")]))
    assert kinds(report)["repeated_tag"] == [(7, "'r': cultivation"), (8, "'s': clear")]
    assert ds.table.tag_strings()[ds.table.names.index("r")] == "cultivation primary"


def test_onehot_text_column_is_ignored_and_noted(tmp_path):
    text = ("Id,Title,clear,haze\n" + "".join(f"g{i},A title {i},{i % 2},{1 - i % 2}\n" for i in range(5))
            + "g1,A title 1,1,0\n")  # an identical duplicate too
    data = make_data(tmp_path, text=text, id_column="Id")
    ds, report = preflight(data)
    assert ds.table.tags == ["clear", "haze"] and len(ds.table) == 5 and not report.bad
    assert kinds(report)["ignored_column"] == [(1, "'Title'")]
    named = make_data(tmp_path / "b", text=text, id_column="Id", tag_columns=["haze"], on_bad_image="skip")
    ds, report = preflight(named)  # exactly the named columns: rows without a haze tag have no tags left
    assert ds.table.tags == ["haze"] and ds.table.names == ["g0", "g2", "g4"]
    assert kinds(report)["ignored_column"] == [(1, "'Title', 'clear'")]
    with pytest.raises(ChiptagError, match=r"data.tag_columns names column\(s\) not in the table: 'nope'"):
        preflight(make_data(tmp_path / "c", text=text, id_column="Id", tag_columns=["nope"]))


def test_duplicate_conflicting_tags(tmp_path):
    ds, report = preflight(skip(make_data(tmp_path, [("g1", "cloudy")])))
    assert [r for r, _ in kinds(report)["duplicate_conflict"]] == [3, 7]
    assert "g1" not in ds.table.names


def test_empty_tag_list(tmp_path):
    ds, report = preflight(skip(make_data(tmp_path, [("e", ""), ("f", "   ")])))
    assert [r for r, _ in kinds(report)["empty_tags"]] == [7, 8]
    assert len(ds.table) == 5


def test_stray_whitespace_is_stripped_and_noted(tmp_path):
    ds, report = preflight(make_data(tmp_path, [(" w ", " clear  primary ")]))
    assert "w" in ds.table.names and kinds(report)["whitespace"][0][0] == 7
    assert ds.table.tag_strings()[ds.table.names.index("w")] == "clear primary"


def test_tags_outside_vocabulary(tmp_path):
    vocab = ["clear", "cloudy", "haze", "partly_cloudy", "primary"]
    ds, report = preflight(skip(make_data(tmp_path)), vocabulary=vocab)
    assert kinds(report)["unknown_tag"] == [(5, "'g3': water")]
    assert ds.table.tags == vocab and "g3" not in ds.table.names


def test_image_names_outside_the_image_folder_are_errors_naming_the_row(tmp_path):
    """`../x` and absolute names were read (and trained on) without a word, from anywhere on the disk."""
    from validate_helpers import chip, jpeg_bytes

    outside = ["../escape", str(tmp_path / "abs")]
    data = make_data(tmp_path, [(outside[0], "clear primary"), (outside[1], "haze primary"),
                                ("sub/g9", "clear primary")], dict.fromkeys([*outside, "sub/g9"]))
    (tmp_path / "data" / "escape.jpg").write_bytes(jpeg_bytes(chip(1)))  # both exist: only the name is wrong
    (tmp_path / "abs.jpg").write_bytes(jpeg_bytes(chip(2)))
    (tmp_path / "data" / "train-jpg" / "sub").mkdir()
    (tmp_path / "data" / "train-jpg" / "sub" / "g9.jpg").write_bytes(jpeg_bytes(chip(3)))
    with pytest.raises(ChiptagError) as err:
        preflight(data)
    msg = str(err.value)
    assert "resolves outside data.images" in msg and "row 7: " in msg and "row 8: " in msg and "'../escape'" in msg
    ds, report = preflight(skip(data))
    assert [r for r, _ in kinds(report)["outside_images"]] == [7, 8]  # a subfolder of data.images is fine
    assert ds.table.names == ["g0", "g1", "g2", "g3", "g4", "sub/g9"] and "image_missing" not in kinds(report)


def test_a_rare_tag_one_edit_from_a_common_one_is_named_with_its_rows(tmp_path):
    """`primray` on one row silently became a tag of its own; now a warning names both tags and the row, and the
    data is still used as it is (a real rare tag is not refused)."""
    rows = [(f"p{i}", "clear primary") for i in range(8)] + [("typo", "clear primray"), ("rare", "clear blow_down")]
    ds, report = preflight(make_data(tmp_path, rows))
    assert kinds(report)["tag_typo"] == [(15, "'primray' on 1 row(s) (15) is one edit from 'primary' (12 rows)")]
    assert "primray" in ds.table.tags and not report.bad  # warned, not refused
    assert "worth a look" in report.format() and "'primray'" in report.format()


def test_onehot_problems_are_all_listed(tmp_path):
    text = "image_name,clear,haze\ng0,1,0\ng1,2,0\ng2,0,yes\ng3,0,0\ng4,0,1\n"
    data = make_data(tmp_path, text=text)
    with pytest.raises(ChiptagError) as err:
        preflight(data)
    msg = str(err.value)
    assert "one-hot cell that is not 0 or 1: 2\n    row 3:" in msg and "\n    row 4:" in msg and "'yes'" in msg
    assert "empty tag list: 1\n    row 5:" in msg  # every problem, not only the first
    ds, _ = preflight(skip(data))
    assert ds.table.names == ["g0", "g4"] and ds.table.tags == ["clear", "haze"]


# ---- images ---------------------------------------------------------------------------------------------------
