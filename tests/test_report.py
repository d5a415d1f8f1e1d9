"""Error-analysis report: per-image TP/FP/FN, per-threshold breakdown, worst-images picture, pairings, curves,
confusion with background, and the HTML page."""
from __future__ import annotations

import base64
import html.parser
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import EFFDET_TINY, FRCNN_TINY, write_config_dir
from pipeline.config import load_config
from pipeline.data import load_dataset
from pipeline.data.table import AnnotationTable
from pipeline.layout import (fold_dir, folds_path, fused_path, predictions_path, write_folds_file,
                             write_predictions)
from pipeline.metrics import Scorer
from pipeline.report import (BACKGROUND, GT_COLOUR, PRED_COLOUR, ReportError, confusion_matrix, fold_scores,
                             html_report_path, match, per_image_scores, per_threshold_breakdown, pr_curve,
                             rank_worst, recall_by, size_bucket, threshold_curve, worst_errors, worst_images_png,
                             write_ensemble_report, write_html_report)
from pipeline.report import main as report_main

W, H = 64, 48
LEGEND = 30
# image_id -> ground truth (x1, y1, x2, y2, label)
GT = {
    "perfect": [(10, 10, 30, 30, 0)],
    "miss": [(5, 5, 25, 25, 0)],
    "fp": [],
    "wrong_class": [(10, 10, 30, 30, 0)],
    "empty": [],
    "partial": [(0, 0, 20, 20, 0), (30, 0, 50, 20, 0)],
}
# (image_id, x1, y1, x2, y2, score, label)
PREDS = [
    ("perfect", 10, 10, 30, 30, 0.9, 0),
    ("fp", 5, 5, 20, 20, 0.8, 0),
    ("wrong_class", 10, 10, 30, 30, 0.9, 1),
    ("partial", 0, 0, 20, 20, 0.9, 0),
    ("partial", 30, 0, 42, 20, 0.7, 0),  # IoU 0.6 with the second box: a hit at 0.50 and 0.55 only (strict >)
    ("partial", 0, 30, 10, 40, 0.1, 0),  # low score: dropped by score_thr=0.3
    ("unlisted", 0, 0, 5, 5, 0.9, 0),  # not in the table: ignored
]


@pytest.fixture
def table(tmp_path: Path) -> AnnotationTable:
    for image_id in GT:
        Image.new("RGB", (W, H), (128, 128, 128)).save(tmp_path / f"{image_id}.png")
    images = pd.DataFrame({"image_id": list(GT), "path": [str(tmp_path / f"{i}.png") for i in GT],
                           "width": W, "height": H})
    boxes = pd.DataFrame([(i, *b) for i, bs in GT.items() for b in bs],
                         columns=["image_id", "x1", "y1", "x2", "y2", "label"])
    return AnnotationTable(images, boxes, ["a", "b"])


@pytest.fixture
def preds() -> pd.DataFrame:
    return pd.DataFrame(PREDS, columns=["image_id", "x1", "y1", "x2", "y2", "score", "label"])


def test_per_image_hand_cases(table, preds):
    df = per_image_scores(table, preds, score_thr=0.3).set_index("image_id")
    assert list(df.columns) == ["n_gt", "n_pred", "tp50", "fp50", "fn50", "score"]
    expect = {  # n_gt, n_pred, tp50, fp50, fn50, score
        "perfect": (1, 1, 1, 0, 0, 1.0),
        "miss": (1, 0, 0, 0, 1, 0.0),
        "fp": (0, 1, 0, 1, 0, 0.0),
        "wrong_class": (1, 1, 0, 1, 1, 0.0),
        "empty": (0, 0, 0, 0, 0, 1.0),
        "partial": (2, 2, 2, 0, 0, (2 * 1.0 + 4 * (1 / 3)) / 6),
    }
    for image_id, (n_gt, n_pred, tp, fp, fn, score) in expect.items():
        row = df.loc[image_id]
        assert (row.n_gt, row.n_pred, row.tp50, row.fp50, row.fn50) == (n_gt, n_pred, tp, fp, fn), image_id
        assert row.score == pytest.approx(score), image_id


def test_score_thr_and_label_free_matching(table, preds):
    low = per_image_scores(table, preds, ["partial"], score_thr=0.0).iloc[0]
    assert (low.n_pred, low.tp50, low.fp50) == (3, 2, 1)
    agnostic = per_image_scores(table, preds.drop(columns="label"), ["wrong_class"]).iloc[0]
    assert (agnostic.tp50, agnostic.fp50, agnostic.fn50, agnostic.score) == (1, 0, 0, 1.0)


def test_single_class_score_equals_gwd_metric():
    rng = np.random.default_rng(0)
    ids = [f"i{k}" for k in range(20)]

    def boxes(n: int) -> np.ndarray:
        xy = rng.uniform(0, 80, (n, 2))
        return np.hstack([xy, xy + rng.uniform(5, 20, (n, 2))]).round(1)

    gt = pd.DataFrame([(i, *b, 0) for i in ids for b in boxes(rng.integers(0, 6))],
                      columns=["image_id", "x1", "y1", "x2", "y2", "label"])
    pr = pd.DataFrame([(i, *b, s, 0) for i in ids for b in boxes(rng.integers(0, 6)) for s in [rng.uniform()]],
                      columns=["image_id", "x1", "y1", "x2", "y2", "score", "label"])
    table = AnnotationTable(pd.DataFrame({"image_id": ids, "path": ids, "width": 100, "height": 100}), gt, ["x"])
    ours = per_image_scores(table, pr, score_thr=0.25).set_index("image_id").score
    metric = Scorer("gwd", table)(pr[pr.score >= 0.25]).per_image
    np.testing.assert_allclose(ours.loc[metric.index].to_numpy(), metric.to_numpy())


def test_class_aware_counts_equal_per_class_sums():
    rng = np.random.default_rng(1)
    ids = [f"i{k}" for k in range(10)]
    rows = [(i, x, y, x + rng.uniform(5, 15), y + rng.uniform(5, 15), int(rng.integers(0, 3)))
            for i in ids for x, y in rng.uniform(0, 40, (int(rng.integers(0, 8)), 2))]
    gt = pd.DataFrame(rows, columns=["image_id", "x1", "y1", "x2", "y2", "label"])
    pr = gt.assign(x1=gt.x1 + rng.uniform(-2, 2, len(gt)), score=rng.uniform(size=len(gt)),
                   label=np.where(rng.uniform(size=len(gt)) < 0.2, (gt.label + 1) % 3, gt.label))
    images = pd.DataFrame({"image_id": ids, "path": ids, "width": 100, "height": 100})
    table = AnnotationTable(images, gt, ["a", "b", "c"])
    both = per_image_scores(table, pr).set_index("image_id")[["tp50", "fp50", "fn50"]]
    per_class = sum(per_image_scores(AnnotationTable(images, gt[gt.label == c], ["a", "b", "c"]),
                                     pr[pr.label == c]).set_index("image_id")[["tp50", "fp50", "fn50"]]
                    for c in range(3))
    pd.testing.assert_frame_equal(both, per_class)


def test_breakdown_hand_case(table, preds):
    df = per_threshold_breakdown(table, preds, ["perfect", "partial"], score_thr=0.3).set_index("iou")
    assert list(df.index) == pytest.approx([0.5, 0.55, 0.6, 0.65, 0.7, 0.75])
    at50, at60 = df.iloc[0], df.iloc[2]
    assert (at50.tp, at50.fp, at50.fn) == (3, 0, 0)
    assert (at50.precision, at50.recall, at50.ratio, at50.mean_image_score) == (1.0, 1.0, 1.0, 1.0)
    assert (at60.tp, at60.fp, at60.fn) == (2, 1, 1)
    assert at60.precision == pytest.approx(2 / 3) and at60.recall == pytest.approx(2 / 3)
    assert at60.ratio == pytest.approx(0.5) and at60.mean_image_score == pytest.approx((1 + 1 / 3) / 2)
    low = per_threshold_breakdown(table, preds, ["perfect", "partial"], score_thr=0.0).iloc[0]
    assert (low.tp, low.fp, low.precision) == (3, 1, 0.75)
    coco = per_threshold_breakdown(table, preds, score_thr=0.3, coco=True)
    assert len(coco) == 10 and coco.iou.iloc[-1] == pytest.approx(0.95)


def test_empty_denominators(table):
    no_preds = pd.DataFrame(columns=["image_id", "x1", "y1", "x2", "y2", "score", "label"])
    row = per_threshold_breakdown(table, no_preds, ["empty"]).iloc[0]
    assert (row.tp, row.fp, row.fn, row.precision, row.recall, row.ratio) == (0, 0, 0, 0.0, 0.0, 1.0)


def test_unknown_image_id_is_an_error(table, preds):
    with pytest.raises(ValueError, match="not in the annotation table"):
        per_image_scores(table, preds, ["nope"])


def test_worst_image_ranks_first(table, preds):
    ranked = rank_worst(per_image_scores(table, preds, score_thr=0.3))
    # score 0 for miss, fp and wrong_class; wrong_class has the most errors (1 FP + 1 FN)
    assert ranked.image_id.iloc[0] == "wrong_class"
    assert list(ranked.image_id.iloc[1:3]) == ["fp", "miss"]  # one error each: by image id
    assert ranked.image_id.iloc[-1] in ("empty", "perfect")


def _has(pixels: np.ndarray, colour: tuple[int, int, int]) -> bool:
    return bool((pixels.reshape(-1, 3) == colour).all(axis=1).any())


def test_worst_png_tiles_and_colours(table, preds, tmp_path):
    out = worst_images_png(table, preds, None, tmp_path / "out" / "worst.png", n=5, score_thr=0.3, tile=64)
    assert out.exists() and not list(out.parent.glob(".*.tmp"))
    arr = np.asarray(Image.open(out).convert("RGB"))
    assert arr.shape[:2] == (LEGEND + 2 * 64, 4 * 64)  # 5 tiles in 4 columns: 2 rows
    first = arr[LEGEND:LEGEND + 64, :64]  # wrong_class: GT and a prediction on the same box
    assert _has(first, GT_COLOUR) and _has(first, PRED_COLOUR)
    assert _has(arr[LEGEND:], GT_COLOUR) and _has(arr[LEGEND:], PRED_COLOUR)
    small = worst_images_png(table, preds, ["perfect", "miss"], tmp_path / "small.png", tile=64)
    assert Image.open(small).size == (2 * 64, LEGEND + 64)


def test_unreadable_image_gets_a_grey_tile(table, preds, tmp_path):
    Path(table.images.path[table.images.image_id == "miss"].iloc[0]).unlink()
    out = worst_images_png(table, preds, ["miss"], tmp_path / "w.png", tile=64)
    assert _has(np.asarray(Image.open(out).convert("RGB"))[LEGEND:], GT_COLOUR)


def test_write_ensemble_report(table, preds, tmp_path):
    result = write_ensemble_report(table, preds, list(GT), tmp_path / "rep", score_thr=0.3)
    for name in ("worst_oof.png", "per_threshold.csv", "per_image.csv"):
        assert (tmp_path / "rep" / name).exists(), name
    per_image = pd.read_csv(tmp_path / "rep" / "per_image.csv")
    assert per_image.image_id.iloc[0] == "wrong_class" and len(per_image) == len(GT)
    assert len(pd.read_csv(tmp_path / "rep" / "per_threshold.csv")) == 6
    assert (result["tp50"], result["fp50"], result["fn50"]) == (3, 2, 2)
    assert result["per_threshold"]["0.50"]["tp"] == 3 and result["n_images"] == len(GT)
    json.dumps(result)  # plain types only


# ------------------------------------------------------------------ pairings, curves, confusion (by hand)



def test_pr_curve_hand_case(table, preds):
    # class a, all images, descending score (stable: packed image order breaks the 0.9 tie):
    # perfect .9 TP, partial .9 TP, fp .8 FP, partial .7 TP (IoU 0.6), partial .1 FP; 5 class-a ground truths
    recall, precision, ap = pr_curve(match(table, preds, iou_thr=0.5), 0)
    np.testing.assert_allclose(recall, [0.2, 0.4, 0.4, 0.6, 0.6])
    np.testing.assert_allclose(precision, [1, 1, 2 / 3, 3 / 4, 3 / 5])
    assert ap == pytest.approx(0.2 * 1 + 0.2 * 1 + 0.2 * 0.75)  # the envelope: 1, 1, then 0.75 up to recall 0.6
    recall, precision, ap = pr_curve(match(table, preds, iou_thr=0.75), 0)  # the 0.6-IoU box is a miss now
    np.testing.assert_allclose(recall, [0.2, 0.4, 0.4, 0.4, 0.4])
    np.testing.assert_allclose(precision, [1, 1, 2 / 3, 2 / 4, 2 / 5])
    assert ap == pytest.approx(0.4)
    recall, precision, ap = pr_curve(match(table, preds), 1)  # class b: one box, no ground truth
    assert np.isnan(ap) and list(precision) == [0.0] and list(recall) == [0.0]


def test_threshold_curve_hand_case(table, preds):
    curve = threshold_curve(match(table, preds), [0.0, 0.5, 0.8, 0.9, 0.95]).set_index("score_thr")
    # 6 listed predictions (perfect .9 T, fp .8 F, wrong_class b .9 F, partial .9 T / .7 T / .1 F), 5 ground truths
    expect = {0.0: (3, 3, 2), 0.5: (3, 2, 2), 0.8: (2, 2, 3), 0.9: (2, 1, 3), 0.95: (0, 0, 5)}
    for t, (tp, fp, fn) in expect.items():
        row = curve.loc[t]
        assert (row.tp, row.fp, row.fn) == (tp, fp, fn), t
        p, r = (tp / (tp + fp) if tp + fp else 0.0), tp / 5
        assert (row.precision, row.recall) == (pytest.approx(p), pytest.approx(r)), t
        assert row.f1 == pytest.approx(2 * p * r / (p + r) if p + r else 0.0), t


def test_confusion_matrix_hand_case(table, preds):
    cm = confusion_matrix(table, preds, score_thr=0.3)
    assert list(cm.index) == ["a", "b", BACKGROUND] and list(cm.columns) == ["a", "b", BACKGROUND]
    # a->a: perfect + 2 partial; a->b: wrong_class found with the wrong label; a missed: miss; spurious a: fp
    np.testing.assert_array_equal(cm.to_numpy(), [[3, 1, 1], [0, 0, 0], [1, 0, 0]])
    low = confusion_matrix(table, preds, score_thr=0.0)  # the 0.1 box lies on nothing: one more spurious a
    assert low.loc[BACKGROUND, "a"] == 2 and low.to_numpy().sum() == cm.to_numpy().sum() + 1


def test_pairings_record_partners_both_ways(table, preds):
    m = match(table, preds, score_thr=0.3)
    paired = m.preds[m.preds.gt_row >= 0]
    assert (m.gt.pred_row.iloc[paired.gt_row].to_numpy() == paired.index.to_numpy()).all()
    assert ((m.gt.pred_row >= 0).sum(), (m.preds.gt_row >= 0).sum()) == (3, 3)
    fp, miss = worst_errors(m, "wrong_class")  # class-aware: the b box found nothing, the a object was missed
    assert (fp.label, fp.score, miss.label) == (1, 0.9, 0)
    fp, miss = worst_errors(match(table, preds), "partial")
    assert fp.score == pytest.approx(0.1) and miss is None
    assert worst_errors(m, "perfect") == (None, None)


def test_pairing_counts_equal_the_metric_matcher():
    """match() must pair by the same rule as the GWD numba matcher that scores per_image_scores."""
    rng = np.random.default_rng(3)
    ids = [f"i{k}" for k in range(25)]
    gt = pd.DataFrame([(i, x, y, x + w, y + h, int(rng.integers(0, 2))) for i in ids
                       for x, y, w, h in rng.uniform([0, 0, 4, 4], [60, 60, 20, 20], (int(rng.integers(0, 7)), 4))],
                      columns=["image_id", "x1", "y1", "x2", "y2", "label"])
    pr = gt.sample(frac=1.0, random_state=0).assign(
        x1=lambda d: d.x1 + rng.normal(0, 2, len(d)), score=lambda d: rng.uniform(size=len(d)).round(1),
        label=lambda d: np.where(rng.uniform(size=len(d)) < 0.2, 1 - d.label, d.label))
    pr = pd.concat([pr, pr.assign(x2=pr.x2 + 3, score=pr.score / 2)], ignore_index=True)  # near-duplicates
    table = AnnotationTable(pd.DataFrame({"image_id": ids, "path": ids, "width": 100, "height": 100}), gt, ["a", "b"])
    for thr, column in ((0.5, "tp50"), (0.75, None)):
        m = match(table, pr, iou_thr=thr)
        ours = m.preds.assign(hit=m.preds.gt_row >= 0).groupby("image_id").hit.sum().reindex(ids, fill_value=0)
        scores = per_image_scores(table, pr, iou_thresholds=[thr]).set_index("image_id")
        if column:
            np.testing.assert_array_equal(ours.to_numpy(), scores[column].to_numpy())
        n = scores.n_gt + scores.n_pred  # the metric's per-image TP/(TP+FP+FN) from our counts
        expect = np.where(n > 0, ours / np.maximum(n - ours, 1), 1.0)
        np.testing.assert_allclose(expect, scores.score.to_numpy())


def test_size_buckets_and_recall_by_group(table, preds):
    areas = pd.Series([31.9 ** 2, 32.0 ** 2, 95.0 ** 2, 96.0 ** 2, 500.0 ** 2])
    assert list(size_bucket(areas)) == ["small", "medium", "medium", "large", "large"]  # COCO: area < 32², < 96²
    m = match(table, preds, score_thr=0.3)
    groups = m.gt.image_id.map(lambda i: "partial" if i == "partial" else "other")
    by = recall_by(m, groups).set_index("group")
    assert by.loc["other"].tolist() == [3, 1, pytest.approx(1 / 3)]  # perfect found; miss, wrong_class not
    assert by.loc["partial"].tolist() == [2, 2, 1.0]


def test_fold_scores_hand_case(table):
    folds = pd.DataFrame({"image_id": ["perfect", "miss", "partial", "empty"], "fold": [0, 0, 1, 1]})
    exact = table.boxes.assign(score=1.0)
    half = exact[exact.image_id != "miss"]  # fold 0 loses the miss's box: perfect 1, miss 0
    scores = fold_scores("gwd", table, folds, {"exact": exact, "half": half})
    assert list(scores.index) == [0, 1, "pooled", "score_thr"] and list(scores.n_images) == [2, 2, 4, 4]
    assert scores.exact.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert scores.half.tolist() == [0.5, 1.0, 0.75, 0.0]
    # GWD counts a false positive: each table is read at its best pooled threshold, its folds at that one too
    stray = pd.concat([exact, exact.assign(x1=exact.x1 + 300, x2=exact.x2 + 300, score=0.2)], ignore_index=True)
    cut = fold_scores("gwd", table, folds, {"stray": stray}, thresholds=[0.5])
    assert cut.stray.tolist() == [1.0, 1.0, 1.0, 0.5]
    assert fold_scores("gwd", table, folds, {"stray": stray}).stray.loc["pooled"] < 1.0
    assert "score_thr" not in fold_scores("coco_map", table, folds, {"stray": stray}, [0.5]).index  # AP: every box


# ----------------------------------------------------------------------------------------- the HTML page


VOID = {"meta", "img", "br", "hr", "link", "input", "col", "wbr", "area", "base", "source"}


class _Checker(html.parser.HTMLParser):
    """Tag balance and every <img>: what "valid" means for a page a browser opens from disk."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.images: list[str] = []
        self.errors: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs).get("src", ""))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def check_page(path: Path) -> _Checker:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    checker = _Checker()
    checker.feed(text)
    checker.close()
    assert checker.errors == [] and checker.stack == [], (checker.errors, checker.stack)
    for src in checker.images:
        assert src.startswith("data:image/png;base64,") or (path.parent / src).is_file(), src[:80]
        if src.startswith("data:"):
            Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    return checker


def _jittered(gt: pd.DataFrame, rng: np.random.Generator, name: str, fold_of: pd.Series, tta: str) -> pd.DataFrame:
    keep = gt[rng.uniform(size=len(gt)) < 0.8]
    shift = rng.normal(0, 2, (len(keep), 4))
    spurious = keep.sample(frac=0.3, random_state=int(rng.integers(1 << 30))).assign(x1=lambda d: d.x1 / 2)
    out = pd.concat([keep.assign(**{c: keep[c] + shift[:, i] for i, c in enumerate(["x1", "y1", "x2", "y2"])}),
                     spurious], ignore_index=True)
    out[["x1", "y1", "x2", "y2"]] = out[["x1", "y1", "x2", "y2"]].clip(0, 120)  # the tiny images are 128 px
    out["x2"], out["y2"] = np.maximum(out.x2, out.x1 + 2), np.maximum(out.y2, out.y1 + 2)
    return out.assign(score=rng.uniform(0.05, 1, len(out)), model=name, fold=out.image_id.map(fold_of), tta=tta)


@pytest.fixture(scope="module")
def tiny_ensemble(tmp_path_factory, tiny_data) -> Path:
    """A tiny ensemble's files without training: folds, two members' OOF predictions (2 TTA views), fused OOF."""
    root = write_config_dir(tmp_path_factory.mktemp("report"), tiny_data, {"effdet": EFFDET_TINY, "frcnn": FRCNN_TINY})
    cfg = load_config(root / "ensemble.yaml")
    table = load_dataset(cfg.data, "train")
    ids = sorted(table.images.image_id)
    folds = pd.DataFrame({"image_id": ids, "fold": [i % 2 for i in range(len(ids))]})
    write_folds_file(folds, folds_path(cfg))
    fold_of = folds.set_index("image_id").fold
    rng = np.random.default_rng(0)
    for name in ("effdet", "frcnn"):
        member = cfg.load_sibling(f"{name}.yaml")
        views = [_jittered(table.boxes, rng, name, fold_of, tta) for tta in ("none", "hflip")]
        write_predictions(pd.concat(views, ignore_index=True), predictions_path(member, "oof"))
    write_predictions(_jittered(table.boxes, rng, "tiny-ens", fold_of, "wbf").assign(fold=-1), fused_path(cfg, "oof"))
    return root


@pytest.mark.slow
def test_report_command_writes_a_valid_complete_page(tiny_ensemble):
    cfg = load_config(tiny_ensemble / "ensemble.yaml")
    assert report_main(["--config", str(tiny_ensemble / "ensemble.yaml"), "--no-cam", "--n-worst", "3"]) == 0
    page = check_page(html_report_path(cfg))
    text = " ".join(page.text)
    for heading in ("Precision-recall per class", "Confusion matrix with background", "Recall by object size",
                    "Score threshold vs precision", "Fold-by-fold", "Worst OOF images"):
        assert heading in text, heading
    assert "frcnn" in text and "effdet" in text and "tiny-ens" in text
    assert "heat maps off" in text
    assert len(page.images) == 5 + 3  # PR at 0.5 and 0.75, threshold, confusion, recall; a tile per worst image


def test_report_refuses_what_it_cannot_explain(tiny_ensemble, capsys):
    assert report_main(["--config", str(tiny_ensemble / "frcnn.yaml"), "--no-cam"]) == 1
    assert "ensemble.members is empty" in capsys.readouterr().err
    cfg = load_config(tiny_ensemble / "ensemble.yaml", ["ensemble.name=never-fused"])
    with pytest.raises(ReportError, match="run python -m pipeline.ensemble"):
        write_html_report(cfg, cam=False)


@pytest.mark.slow
def test_html_report_with_heat_maps_from_fold_checkpoints(tiny_ensemble):
    """The worst images get heat maps from the fold model that predicted them (untrained weights here: the
    plumbing is under test, checkpoints to pictures, not what a trained model looks at)."""
    import torch

    from pipeline import checkpoint
    from pipeline.models import create_model

    cfg = load_config(tiny_ensemble / "ensemble.yaml")
    member = cfg.load_sibling("frcnn.yaml")  # effdet (tried first) has no checkpoints: frcnn explains every fold
    for fold in (0, 1):
        torch.manual_seed(fold)
        checkpoint.save({"model": create_model(member.model, 3).state_dict()}, fold_dir(member, fold) / "best.pt")
    page = check_page(write_html_report(cfg, cam=True, n_worst=2))
    text = " ".join(page.text)
    assert "of frcnn fold" in text and ("Grad-CAM" in text or "EigenCAM" in text)
    assert "effdet/fold0/best.pt not found" in text  # said, not hidden

