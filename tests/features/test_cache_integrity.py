"""Feature cache integrity: a truncated, bit-flipped or foreign cache file is detected, reported, recomputed."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from chiptag.features import cache as cachefile
from chiptag.data.images import Preprocessing
from chiptag.data.inputs import ImageInput
from chiptag.features.extraction import Extractor, cached_features, fingerprint
from chiptag.features.backends import torch_forward
from chiptag.models.backbones import build_backbone, state_fingerprint


@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    return build_backbone("resnet18", None, 32, progress=False)


def features(bb, paths, cache):
    ex = Extractor(bb.name, state_fingerprint(bb.net), ImageInput(bb.preprocessing),
                   torch_forward(bb.net, torch.device("cpu"), False),
                   batch_size=32, num_workers=0, show_progress=False)
    feats, info = cached_features(ex, paths, cache)
    return feats, info.to_dict()


def one_file(cache: Path) -> Path:
    (path,) = cache.glob("*.pt")
    return path


def _flip_a_feature_byte(path: Path, feats: torch.Tensor) -> None:
    """Flip one bit inside the stored feature data (found by its bytes, so the zip/pickle stays loadable)."""
    raw = bytearray(path.read_bytes())
    stored = torch.load(path, weights_only=True)["features"]  # the encoded values (features.cache.encode)
    needle = stored.contiguous().numpy().tobytes()[:64]
    at = raw.find(needle)
    assert at > 0
    raw[at + 10] ^= 0x04
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "garbage"])
def test_damaged_cache_is_reported_and_recomputed(small_net, tiny_data, tmp_path, capsys, damage):
    paths = sorted((tiny_data / "train-jpg").glob("*.jpg"))[:40]
    cache = tmp_path / "cache"
    first, info = features(small_net, paths, cache)
    assert info["cache"] == "miss"
    path = one_file(cache)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "bitflip":
        _flip_a_feature_byte(path, first)
        damaged = torch.load(path, weights_only=True)["features"]  # still loads: only the checksum can tell
        assert not torch.equal(damaged, first)
    else:
        path.write_bytes(b"\0" * 100)
    again, info = features(small_net, paths, cache)
    assert info["cache"] == "miss" and info["recomputed_because"]
    if damage == "bitflip":
        assert "checksum mismatch" in info["recomputed_because"]
    assert "not usable" in capsys.readouterr().err
    assert torch.equal(again, first)
    assert features(small_net, paths, cache)[1]["cache"] == "hit"  # the rewritten file is trusted again


def test_fingerprint_mismatch_is_not_used(tiny_data, tmp_path):
    path = tmp_path / "f.pt"
    feats = torch.randn(4, 8).half()
    cachefile.save_features(path, "key-a", feats, [])
    assert cachefile.load_features(path, "key-a", 4)[0] is not None
    assert "fingerprint mismatch" in cachefile.load_features(path, "key-b", 4)[1]
    assert "rows" in cachefile.load_features(path, "key-a", 5)[1]


def test_cache_keeps_features_float16_cannot_hold(tmp_path):
    """A random-init EfficientNet's features are ~1e-14: plain float16 stored them as exact zeros."""
    rng = torch.Generator().manual_seed(0)
    feats = torch.rand(50, 16, generator=rng) * 1e-14 * torch.logspace(0, 3, 16)  # dims of different scales
    feats[:, 3] = -feats[:, 3]
    feats[:, 5] = 0.0  # an all-zero dimension stays zero
    cachefile.save_features(tmp_path / "f.pt", "k", feats, [])
    back, problem = cachefile.load_features(tmp_path / "f.pt", "k", 50)
    assert problem == "" and back.dtype == torch.float32 and not torch.equal(feats.half().float(), feats)
    rel = ((back - feats).abs() / feats.abs().amax(0).clamp_min(1e-30)).max()
    assert rel < 2 ** -11 and torch.equal(back[:, 5], feats[:, 5])
    assert (back[:, 0].std() > 0) and (back[:, 3] < 0).all()


def test_degenerate_features_are_named():
    from chiptag.features.extraction import degenerate, feature_warning

    assert degenerate(torch.zeros(4, 3)) == "all zero"
    assert degenerate(torch.ones(4, 3)) == "constant across images"
    assert "vanishingly small" in degenerate(torch.rand(4, 3) * 1e-12)
    assert degenerate(torch.rand(1, 4, 3)) is None
    msg = feature_warning(torch.zeros(1, 4, 3), "efficientnet_b0", None)
    assert "efficientnet_b0" in msg and "model.weights" in msg and "model.freeze: false" in msg


def test_fingerprint_covers_images_and_preprocessing(tiny_data, tmp_path):
    paths = sorted((tiny_data / "train-jpg").glob("*.jpg"))[:3]
    pre = Preprocessing(32)
    base = fingerprint("h", pre, paths, 0)
    assert fingerprint("h", Preprocessing(64), paths, 0) != base
    assert fingerprint("h", Preprocessing(32, resize="pad"), paths, 0) != base
    assert fingerprint("other", pre, paths, 0) != base
    assert fingerprint("h", pre, paths, 1) != base
    assert fingerprint("h", pre, paths[:2], 0) != base
    assert fingerprint("h", pre, paths, 0, decoder="nvjpeg") != base  # nvJPEG's pixels are not libjpeg's


def test_damaged_partial_chunk_is_dropped_and_recomputed(tmp_path):
    final = tmp_path / "x.pt"
    partial = cachefile.PartialCache(final, "k")
    a, b = torch.ones(3, 2).half(), torch.zeros(2, 2).half()
    partial.save(0, a)
    partial.save(3, b)
    chunk = partial.dir / "000000003.pt"
    chunk.write_bytes(chunk.read_bytes()[:50])
    chunks, dropped = partial.load()
    assert [c.shape[0] for c in chunks] == [3] and "000000003.pt" in dropped[0]
    assert not chunk.exists()


def test_checkpoint_from_other_version_missing_keys_or_truncated_is_a_clear_error(tmp_path):
    from chiptag.models import checkpoint
    from chiptag.training import resume
    from chiptag.runs.layout import RunDir
    from chiptag.errors import ChiptagError

    path = tmp_path / "checkpoint.pt"
    full = {k: 0 for k in checkpoint.REQUIRED}
    torch.save({**full, "format_version": 99, "chiptag_version": "9.9"}, path)
    with pytest.raises(ChiptagError, match="format 99 .*chiptag 9.9"):
        checkpoint.load(path)
    torch.save({k: v for k, v in full.items() if k != "tags"}, path)
    with pytest.raises(ChiptagError, match="missing tags"):
        checkpoint.load(path)
    torch.save({**full, "format_version": checkpoint.FORMAT_VERSION}, path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ChiptagError, match="cannot read checkpoint"):
        checkpoint.load(path)
    state = RunDir(tmp_path).resume
    state.write_bytes(b"\0" * 10)
    with pytest.raises(ChiptagError, match="cannot be resumed"):
        resume.load(state)


def test_resumed_extraction_gives_bit_for_bit_the_uninterrupted_features(small_net, tiny_data, tmp_path,
                                                                          monkeypatch):
    """Chunks saved before an interrupt were float16-encoded with their own scales, then re-encoded with the
    global ones: a resumed extraction's features (and so its metrics) differed from an uninterrupted one's."""
    from chiptag.features import extraction
    from chiptag.interrupt import Interrupted

    paths = sorted((tiny_data / "train-jpg").glob("*.jpg"))
    straight, _ = features(small_net, paths, tmp_path / "straight")
    polls = {"n": 0}

    def stop_at_third_batch():
        polls["n"] += 1
        return signal.SIGTERM if polls["n"] == 3 else None

    monkeypatch.setattr(extraction, "stop_requested", stop_at_third_batch)
    with pytest.raises(Interrupted, match=f"stopped at image 96/{len(paths)}"):
        features(small_net, paths, tmp_path / "resumed")
    monkeypatch.setattr(extraction, "stop_requested", lambda: None)
    resumed, info = features(small_net, paths, tmp_path / "resumed")
    assert info["resumed_from"] == 96
    assert torch.equal(resumed, straight)
    on_disk = [torch.load(one_file(tmp_path / d), weights_only=True) for d in ("straight", "resumed")]
    assert all(torch.equal(on_disk[0][k], on_disk[1][k]) for k in ("features", "scale"))
