"""Label tables (tags and one-hot forms) and the iterative-stratified split."""

from __future__ import annotations

import numpy as np
import pytest

from chiptag.data.labels import align, decode, find_label_file, parse_table, read_table
from chiptag.data.split import load_split, save_split, split_indices
from chiptag.data.synthetic import PLANET_TAGS, sample_tags
from chiptag.errors import ChiptagError


def read_labels(path, fmt="auto", **columns):
    """What data.validate does with a table file: read it, then parse it (the two public steps)."""
    return parse_table(path, read_table(path), fmt, **columns)


def test_tags_form_sorted_vocabulary(tmp_path):
    p = tmp_path / "train_v2.csv"
    p.write_text("image_name,tags\ntrain_0,haze primary\ntrain_1,clear primary water\n")
    t = read_labels(p)
    assert t.tags == ["clear", "haze", "primary", "water"]
    assert t.names == ["train_0", "train_1"]
    assert t.y.tolist() == [[0, 1, 1, 0], [1, 0, 1, 1]]
    assert decode(t.y, t.tags) == ["haze primary", "clear primary water"]
    assert find_label_file(tmp_path) == p


def test_onehot_form_and_bom_crlf(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_bytes("\ufeffid,water,clear\r\na1,1,0\r\na2,0,1\r\n".encode("utf-8"))
    t = read_labels(p, id_column="id")
    assert t.tags == ["clear", "water"] and t.y.tolist() == [[0, 1], [1, 0]]


@pytest.mark.parametrize("content, message", [
    ("", "empty"),
    ("image_name,tags\n", "no rows"),
    ("name,tags\na,clear\n", "missing id column 'image_name'"),
    ("image_name,tags\na,clear\na,haze\n", "row 3: duplicate image name 'a'"),
    ("image_name,tags\na,clear\nb,\n", "row 3: image 'b' has an empty tag list"),
    ("image_name,water\na,1\nb,2\n", "row 3, column 'water': expected 0 or 1"),
])
def test_bad_tables_name_file_and_row(tmp_path, content, message):
    p = tmp_path / "t.csv"
    p.write_text(content)
    with pytest.raises(ChiptagError, match=message):
        read_labels(p)


def test_missing_file(tmp_path):
    with pytest.raises(ChiptagError, match="not found"):
        read_labels(tmp_path / "x.csv")
    with pytest.raises(ChiptagError, match="train_v2.csv"):
        find_label_file(tmp_path)


def test_align_to_run_vocabulary(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("image_name,tags\na,water\n")
    t = align(read_labels(p), ["clear", "water"])
    assert t.y.tolist() == [[0, 1]]
    with pytest.raises(ChiptagError, match="not in the run's vocabulary: water"):
        align(read_labels(p), ["clear"])


def _planet_like(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    tags = list(PLANET_TAGS)
    y = np.zeros((n, len(tags)), dtype=np.uint8)
    for i in range(n):
        for t in sample_tags(rng):
            y[i, tags.index(t)] = 1
    return y


def test_split_is_seeded_disjoint_and_stratified(tmp_path):
    y = _planet_like()
    a = split_indices(y, seed=3)
    b = split_indices(y, seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    allidx = np.concatenate(list(a.values()))
    assert len(allidx) == len(y) == len(set(allidx.tolist()))
    assert abs(len(a["train"]) / len(y) - 0.7) < 0.01 and abs(len(a["test"]) / len(y) - 0.15) < 0.01
    present = y.sum(0) >= 6  # a tag with at least a handful of chips appears in every split
    for idx in a.values():
        assert (y[idx][:, present].sum(0) > 0).all()
    names = [f"n{i}" for i in range(len(y))]
    save_split(names, a, tmp_path)
    again = load_split(names, tmp_path)
    assert all(np.array_equal(a[k], again[k]) for k in a)
    assert not np.array_equal(split_indices(y, seed=4)["test"], a["test"])


def test_split_rejects_bad_fractions():
    with pytest.raises(ChiptagError, match="sum to 1"):
        split_indices(np.ones((10, 2), dtype=np.uint8), 0.5, 0.2, 0.2)


def test_given_split_is_used_exactly_and_bad_lists_are_clear_errors(tmp_path):
    from chiptag.data.split import given_split

    names = ["a", "b", "c", "d", "e", "f"]
    files = {}
    for split, text in {"train": "a\nb\n\nc\n", "val": "Id,title\nd,\"x, y\"\n", "test": "e.jpg\n"}.items():
        files[split] = tmp_path / (f"{split}.csv" if split == "val" else f"{split}.txt")
        files[split].write_text(text)
    out = given_split(names, frozenset(), files, ".jpg")
    assert {k: v.tolist() for k, v in out.items()} == {"train": [0, 1, 2], "val": [3], "test": [4]}
    assert given_split(names + ["x"], frozenset({"b"}), files, ".jpg")["train"].tolist() == [0, 2]  # skipped
    files["test"].write_text("e\nzz\n")
    with pytest.raises(ChiptagError, match=r"test.txt: 1 name\(s\) not in the label table \(e.g. 'zz'\)"):
        given_split(names, frozenset(), files)
    files["test"].write_text("e\na\n")
    with pytest.raises(ChiptagError, match=r"1 name\(s\) are in more than one list; 1 in both .*train.txt \(train\) "
                                           r"and .*test.txt \(test\): 'a'$"):
        given_split(names, frozenset(), files)
    files["test"].write_text("\n")
    with pytest.raises(ChiptagError, match=r"test.txt: no image names in it"):
        given_split(names, frozenset(), files)


def test_given_split_overlap_names_every_shared_name_counted(tmp_path):
    """A real set had five names in two lists; the error named only the first. Now: all, counted per pair."""
    from chiptag.data.split import given_split

    names = [f"n{i}" for i in range(10)]
    files = {s: tmp_path / f"{s}.txt" for s in ("train", "val", "test")}
    files["train"].write_text("n0\nn1\nn2\nn3\nn4\n")
    files["val"].write_text("n5\nn1\nn2\n")
    files["test"].write_text("n6\nn3\nn4\nn1\n")
    with pytest.raises(ChiptagError) as err:
        given_split(names, frozenset(), files)
    msg = str(err.value)
    assert "4 name(s) are in more than one list" in msg  # n1..n4, counted once though n1 is in all three
    assert "2 in both" in msg and "'n1', 'n2'" in msg  # train & val
    assert "3 in both" in msg and "'n3', 'n4', 'n1'" in msg  # train & test
    assert "1 in both" in msg  # val & test: n1
