"""Tests for chiptag.metrics: sklearn agreement, baseline choice, threshold tuning."""

import json

import numpy as np
import pytest
from sklearn.metrics import fbeta_score, precision_score, recall_score

from chiptag.evaluation import metrics as M, thresholds as T
from chiptag.errors import ChiptagError

GRID = np.round(np.arange(0.02, 0.99, 0.01), 2)

PLANET_TAGS = [
    "primary", "clear", "agriculture", "road", "water", "partly_cloudy", "cultivation",
    "habitation", "haze", "cloudy", "bare_ground", "selective_logging", "artisinal_mine",
    "blooming", "slash_burn", "blow_down", "conventional_mine",
]
_RARE = {"bare_ground": .021, "selective_logging": .008, "artisinal_mine": .008,
         "blooming": .008, "slash_burn": .005, "blow_down": .002, "conventional_mine": .002}


def planet_like_labels(n: int, seed: int) -> np.ndarray:
    """Labels with Planet's marginals (primary .927, clear .702, agriculture .304, ...)
    and its main structure: exactly one weather tag, 'cloudy' chips carry nothing
    else, and road/cultivation/habitation cluster with agriculture."""
    rng = np.random.default_rng(seed)
    ix = {t: i for i, t in enumerate(PLANET_TAGS)}
    y = np.zeros((n, len(PLANET_TAGS)), dtype=np.uint8)
    weather = ["clear", "partly_cloudy", "haze", "cloudy"]
    w = rng.choice(4, size=n, p=np.array([.702, .179, .067, .051]) / .999)
    for k, tag in enumerate(weather):
        y[w == k, ix[tag]] = 1
    visible = w != 3

    def draw(prob):
        return visible & (rng.random(n) < prob)

    agri = draw(.32)
    y[:, ix["agriculture"]] = agri
    y[:, ix["primary"]] = draw(.977)
    y[:, ix["road"]] = draw(np.where(agri, .55, .03))
    y[:, ix["cultivation"]] = draw(np.where(agri, .30, .01))
    y[:, ix["habitation"]] = draw(np.where(agri, .25, .02))
    y[:, ix["water"]] = draw(.193)
    for tag, prob in _RARE.items():
        y[:, ix[tag]] = draw(prob / .949)
    return y


def noisy_probs(y: np.ndarray, seed: int, signal: float = 1.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logit = rng.normal(0.0, 1.5, y.shape) + signal * (2 * y.astype(int) - 1) - 1.0
    return 1.0 / (1.0 + np.exp(-logit))


def random_case(seed: int, n: int = 300, c: int = 8):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < rng.uniform(0.05, 0.7, c)).astype(np.uint8)
    return y, noisy_probs(y, seed + 1000)


def best_global_f2(y, p) -> float:
    return max(M.f2_samples(y, M.binarize(p, t)) for t in GRID)


# --- f2_samples / binarize ---


def test_f2_samples_hand_example():
    y_true = np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0]])
    y_pred = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]])
    # row 0: TP1 FN1 -> 5/9; row 1: TP1 FP1 -> 5/6; row 2: nothing true or predicted -> 0.
    expected = (5 / 9 + 5 / 6 + 0.0) / 3
    assert M.f2_samples(y_true, y_pred) == pytest.approx(expected, abs=1e-15)
    assert M.f2_samples(y_true, y_pred) == pytest.approx(
        fbeta_score(y_true, y_pred, beta=2, average="samples", zero_division=0.0), abs=1e-15)


def test_f2_samples_matches_sklearn_random():
    rng = np.random.default_rng(0)
    y, yp = (rng.random((500, 17)) < 0.2), (rng.random((500, 17)) < 0.3)
    assert isinstance(M.f2_samples(y, yp), float)
    assert M.f2_samples(y, yp) == fbeta_score(y, yp, beta=2, average="samples", zero_division=0.0)


def test_f2_per_sample_matches_sklearn_row_by_row():
    rng = np.random.default_rng(1)
    y, yp = (rng.random((200, 17)) < 0.2), (rng.random((200, 17)) < 0.3)
    y[0], yp[0] = False, False  # no true and no predicted tags: 0, as sklearn's zero_division=0.0
    per_row = M.f2_per_sample(y, yp)
    expected = [fbeta_score(y[i], yp[i], beta=2, zero_division=0.0) for i in range(len(y))]
    assert per_row == pytest.approx(expected, abs=1e-12)
    assert per_row.mean() == pytest.approx(M.f2_samples(y, yp), abs=1e-12)


def test_binarize_scalar_and_per_class_inclusive():
    p = np.array([[0.5, 0.2], [0.49, 0.9]])
    assert M.binarize(p, 0.5).tolist() == [[1, 0], [0, 1]]
    assert M.binarize(p, np.array([0.4, 0.2])).tolist() == [[1, 1], [1, 1]]
    assert M.binarize(p, 0.5).dtype == np.uint8


# --- classification_metrics / baseline_metrics / pr_curves ---


def test_classification_metrics_fields_and_json():
    y, p = random_case(1, n=200, c=4)
    y[:, 3] = 0  # a tag absent from this split
    tags = ["a", "b", "c", "d"]
    thr = np.array([0.3, 0.5, 0.6, 0.5])
    out = M.classification_metrics(y, p, thr, tags)
    json.dumps(out)
    assert set(out) == {"f2", "f2_micro", "f2_macro", "precision", "recall", "per_class"}
    yp = M.binarize(p, thr)
    assert out["f2"] == pytest.approx(M.f2_samples(y, yp), abs=1e-12)
    assert out["f2_micro"] == pytest.approx(fbeta_score(y, yp, beta=2, average="micro"), abs=1e-12)
    assert out["precision"] == pytest.approx(
        precision_score(y, yp, average="samples", zero_division=0.0), abs=1e-12)
    assert out["recall"] == pytest.approx(
        recall_score(y, yp, average="samples", zero_division=0.0), abs=1e-12)
    assert list(out["per_class"]) == tags
    for c, tag in enumerate(tags):
        row = out["per_class"][tag]
        assert set(row) == {"support", "precision", "recall", "f2", "threshold"}
        assert type(row["support"]) is int and row["support"] == int(y[:, c].sum())
        assert all(type(row[k]) is float for k in ("precision", "recall", "f2", "threshold"))
        assert row["threshold"] == thr[c]
    assert out["per_class"]["d"]["support"] == 0 and out["per_class"]["d"]["recall"] == 0.0


def test_baseline_metrics_predicts_mask_everywhere():
    y = planet_like_labels(2000, seed=3)
    mask = np.zeros(17, dtype=np.uint8)
    mask[:3] = 1
    out = M.baseline_metrics(y, mask, PLANET_TAGS)
    assert out["f2"] == pytest.approx(M.f2_samples(y, np.tile(mask, (len(y), 1))), abs=1e-12)
    assert out["per_class"]["primary"]["recall"] == 1.0
    assert out["per_class"]["road"]["recall"] == 0.0
    json.dumps(out)


def test_pr_curves_omits_tags_without_positives():
    y, p = random_case(2, n=150, c=3)
    y[:, 1] = 0
    curves = M.pr_curves(y, p, ["a", "b", "c"])
    assert set(curves) == {"a", "c"}
    for curve in curves.values():
        assert len(curve["precision"]) == len(curve["recall"]) > 1
        assert curve["recall"][-1] == 0.0 and curve["precision"][-1] == 1.0
    json.dumps(curves)


# --- constant_baseline ---


def prefix_scores(y):
    order = np.argsort(-y.sum(axis=0), kind="stable")
    scores = []
    for k in range(1, y.shape[1] + 1):
        mask = np.zeros(y.shape[1], dtype=np.uint8)
        mask[order[:k]] = 1
        scores.append((M.f2_samples(y, np.tile(mask, (len(y), 1))), mask))
    return scores


def test_constant_baseline_planet_like():
    y = planet_like_labels(10000, seed=0)
    mask = M.constant_baseline(y)
    assert mask.dtype == np.uint8 and mask.shape == (17,)
    chosen = {t for t, m in zip(PLANET_TAGS, mask) if m}
    assert {"primary", "clear", "agriculture"} <= chosen
    # Nothing at or below ~10% frequency earns a place in a fixed set.
    assert not chosen & {"cultivation", "habitation", "haze", "cloudy", *_RARE}
    score = M.f2_samples(y, np.tile(mask, (len(y), 1)))
    assert score == pytest.approx(0.69, abs=0.03)
    # It is the best frequency-ordered prefix, not merely a good one.
    assert score == max(s for s, _ in prefix_scores(y))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_constant_baseline_is_best_prefix(seed):
    y, _ = random_case(seed, n=200, c=6)
    best_score, best_mask = max(prefix_scores(y), key=lambda sm: sm[0])
    mask = M.constant_baseline(y)
    assert M.f2_samples(y, np.tile(mask, (len(y), 1))) == best_score


# --- tune_thresholds ---


@pytest.mark.parametrize("seed", range(5))
def test_tuning_never_lowers_f2(seed):
    y, p = random_case(seed)
    thr = T.tune_thresholds(y, p)
    assert thr.shape == (y.shape[1],) and thr.dtype == np.float64
    tuned = M.f2_samples(y, M.binarize(p, thr))
    assert tuned >= M.f2_samples(y, M.binarize(p, 0.5))
    assert tuned >= best_global_f2(y, p)


def test_tuning_starts_from_best_global_threshold():
    y, p = random_case(7)
    start = T.tune_thresholds(y, p, rounds=0)
    assert np.unique(start).size == 1
    assert M.f2_samples(y, M.binarize(p, start)) == best_global_f2(y, p)


def test_tuning_finds_low_thresholds_for_calibrated_probs():
    # Calibrated, mostly small probabilities: F2's recall bias favours thresholds
    # well below 0.5, which tuning must find.
    rng = np.random.default_rng(5)
    p = rng.beta(1.0, 5.0, size=(800, 6))
    y = (rng.random(p.shape) < p).astype(np.uint8)
    thr = T.tune_thresholds(y, p)
    assert np.median(thr) < 0.35
    assert M.f2_samples(y, M.binarize(p, thr)) > M.f2_samples(y, M.binarize(p, 0.5)) + 0.1


def test_class_without_positives_keeps_sane_threshold():
    rng = np.random.default_rng(6)
    p = rng.beta(1.0, 5.0, size=(500, 5))
    y = (rng.random(p.shape) < p).astype(np.uint8)
    y[:, 2] = 0
    p[:, 2] = rng.random(500)  # a trigger-happy threshold would fire on many rows
    start = T.tune_thresholds(y, p, rounds=0)[0]
    assert start < 0.5  # so this case exercises the fall-back to `default`
    thr = T.tune_thresholds(y, p)
    assert thr[2] == max(start, 0.5) == 0.5
    assert T.tune_thresholds(y, p, default=0.7)[2] == 0.7


def test_tuning_is_deterministic_with_ties():
    y, p = random_case(8)
    p = np.round(p, 1)  # coarse probabilities -> many tied candidate thresholds
    a, b = T.tune_thresholds(y, p), T.tune_thresholds(y, p)
    assert np.array_equal(a, b)


def test_incremental_f2_equals_sklearn():
    rng = np.random.default_rng(9)
    y, p = random_case(9, n=400, c=7)
    y[:40] = 0  # rows with no true tags; some will have no predicted tags either
    y_b = y.astype(bool)
    thr = rng.choice(GRID, size=7)
    pred = p >= thr
    tp, pred_sum, true_sum = (pred & y_b).sum(1), pred.sum(1), y_b.sum(1)
    assert T._mean_fbeta(tp, true_sum, pred_sum) == pytest.approx(
        M.f2_samples(y, pred), abs=1e-12)
    for c in range(7):
        scores = T._candidate_scores(y_b[:, c], p[:, c], thr[c], GRID, tp, pred_sum, true_sum)
        for t, score in zip(GRID[::7], scores[::7]):
            trial = thr.copy()
            trial[c] = t
            expected = fbeta_score(y, M.binarize(p, trial), beta=2, average="samples",
                                   zero_division=0.0)
            assert abs(score - expected) < 1e-12


# --- input validation ---


def test_bad_inputs_raise_chiptag_error():
    y, p = random_case(10, n=20, c=3)
    tags = ["a", "b", "c"]
    nan_p = p.copy()
    nan_p[0, 0] = np.nan
    bad_calls = [
        lambda: M.f2_samples(y, y[:, :2]),
        lambda: M.f2_samples(y[0], y[0]),
        lambda: M.f2_samples(y * 2, y),
        lambda: M.classification_metrics(y, p[:10], 0.5, tags),
        lambda: M.classification_metrics(y, p, 0.5, ["a", "b"]),
        lambda: M.classification_metrics(y, p, [0.5, 0.5], tags),
        lambda: T.tune_thresholds(y, p[:, :2]),
        lambda: T.tune_thresholds(y, nan_p),
        lambda: T.tune_thresholds(y, p * 5 - 2),  # logits, not probabilities
        lambda: M.binarize(nan_p, 0.5),
        lambda: M.pr_curves(y, p.T, tags),
        lambda: M.baseline_metrics(y, np.ones(2), tags),
        lambda: M.constant_baseline(np.zeros((0, 3))),
    ]
    for call in bad_calls:
        with pytest.raises(ChiptagError):
            call()
    with pytest.raises(ChiptagError, match=r"\(20, 3\).*\(10, 3\)"):
        M.classification_metrics(y, p[:10], 0.5, tags)
