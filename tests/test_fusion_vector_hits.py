"""pipeline.fusion.vector_hits: soft-NMS's eight-slot IoUs and hits, NMS's eight-slot marks (against the scalar IoU),
soft-NMS's eight-lane decays (against the scalar loop)."""
from __future__ import annotations

import os
import subprocess
import sys

import numba
import numpy as np
import pytest

from pipeline.fusion.suppression_kernel import _slot_iou
from pipeline.fusion.vector_exp import exp_vectorisable
from pipeline.fusion.vector_hits import LANES, decay8, gaussian_decay8, iou_hits8, suppress8


@numba.njit
def _run(slots, position, lo, hi, box, above, out_position, out_iou):
    """The kernel's loop over one run of slots ``lo .. hi - 1``."""
    k = 0
    for s in range(lo, hi, LANES):
        k = iou_hits8(slots[0], slots[1], slots[2], slots[3], position, s, hi, box[0], box[1], box[2], box[3], above,
                      out_position, out_iou, k)
    return k


@numba.njit
def _scalar_ious(slots, box):
    area_b = (box[2] - box[0]) * (box[3] - box[1])
    out = np.empty(slots.shape[1])
    for s in range(slots.shape[1]):
        out[s] = _slot_iou(box[0], box[1], box[2], box[3], area_b, slots[0, s], slots[1, s], slots[2, s], slots[3, s])
    return out


def _slots(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` slots of small boxes near the centre (many overlap the query), a fifth emptied (the kernel's box that
    overlaps nothing), and ``LANES`` padding slots."""
    xy = rng.uniform(0.3, 0.6, (n, 2))
    wh = rng.uniform(0.01, 0.2, (n, 2))
    slots = np.empty((4, n + LANES))
    slots[:2, :n] = xy.T
    slots[2:, :n] = (xy + wh).T
    emptied = np.r_[rng.random(n) < 0.2, np.ones(LANES, bool)]
    slots[:2, emptied] = np.inf
    slots[2:, emptied] = -np.inf
    return slots


@pytest.mark.parametrize("above", [0.0, 0.5])
def test_the_hits_are_the_scalar_ious_above_the_threshold_in_slot_order_with_their_positions(above) -> None:
    rng = np.random.default_rng(7)
    for trial in range(300):
        n = int(rng.integers(1, 70))
        slots = _slots(rng, n)
        position = rng.permutation(10 * (n + LANES))[:n + LANES].astype(np.int64)
        lo = int(rng.integers(0, n))
        hi = int(rng.integers(lo, n + 1))
        box = np.r_[rng.uniform(0.3, 0.5, 2), 0.0, 0.0]
        box[2:] = box[:2] + rng.uniform(0.02, 0.3, 2)
        out_position = np.full(n + LANES, -1, np.int64)
        out_iou = np.full(n + LANES, np.nan)
        k = _run(slots, position, lo, hi, box, above, out_position, out_iou)
        ious = _scalar_ious(slots, box)
        expected = lo + np.flatnonzero(ious[lo:hi] > above)
        assert k == len(expected), trial
        np.testing.assert_array_equal(out_position[:k], position[expected])
        assert out_iou[:k].tobytes() == ious[expected].tobytes()  # the same bits


def test_slots_past_the_run_and_emptied_slots_are_never_hits() -> None:
    # every slot overlaps the query box exactly, but only the run's own (3 of 8) count; an emptied slot never does
    slots = np.tile(np.array([[0.2], [0.2], [0.4], [0.4]]), (1, 2 * LANES))
    slots[:2, 1], slots[2:, 1] = np.inf, -np.inf
    position = np.arange(100, 100 + 2 * LANES, dtype=np.int64)
    out_position, out_iou = np.full(2 * LANES, -1, np.int64), np.zeros(2 * LANES)
    k = _run(slots, position, 0, 3, np.array([0.2, 0.2, 0.4, 0.4]), 0.0, out_position, out_iou)
    assert k == 2
    assert out_position[:2].tolist() == [100, 102]
    assert out_iou[:2].tolist() == [1.0, 1.0]


def test_compiles_for_a_cpu_llvm_knows_nothing_of(tmp_path) -> None:
    # NUMBA_CPU_NAME=generic (numba's portable caches): LLVM 22 aborted the process expanding a compress of doubles
    # there, so the IoUs are packed as their 64-bit patterns; suppress8's eight-lane test compiles there too
    script = ("import numba, numpy as np\n"
              "from pipeline.fusion.vector_hits import decay8, gaussian_decay8, iou_hits8, suppress8\n"
              "@numba.njit\n"
              "def run(s, p, o, oi):\n"
              "    return iou_hits8(s[0], s[1], s[2], s[3], p, 0, 3, 0.2, 0.2, 0.4, 0.4, 0.0, o, oi, 0)\n"
              "@numba.njit\n"
              "def mark(s, dead):\n"
              "    suppress8(s[0], s[1], s[2], s[3], 0, 0.2, 0.2, 0.4, 0.4, 0.5, dead)\n"
              "s = np.tile(np.array([[0.2], [0.2], [0.4], [0.4]]), (1, 8)); s[:2, 1], s[2:, 1] = np.inf, -np.inf\n"
              "o, oi, dead = np.zeros(8, np.int64), np.zeros(8), np.zeros(8, np.uint8)\n"
              "@numba.njit\n"
              "def decay(score, p, w):\n"
              "    return (decay8(score, p, w, 0, 3, 0.1, False)\n"
              "            + 16 * gaussian_decay8(score, p, w, 3, 4, 0.5, 0.1, False))\n"
              "mark(s, dead)\n"
              "score = np.full(4, 0.5)\n"
              "died = decay(score, np.array([3, 0, 1, 2, 9, 9, 9, 9]), np.array([0.5, 0.1, 1.0, 0, 0, 0, 0, 0]))\n"
              "print(run(s, np.arange(10, 18), o, oi), o[:2].tolist(), oi[:2].tolist(), dead.sum(), died,\n"
              "      score.tolist())\n")
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # gaussian_decay8 on candidate 3 (position 2, IoU 0): its weight is exactly 1
    assert done.stdout.split() == ["2", "[10,", "12]", "[1.0,", "1.0]", "7", "2", "[-inf,", "0.5,", "0.5,", "0.25]"]


@numba.njit
def _suppress(slots, lo, hi, box, thr, dead):
    for s in range(lo, hi, LANES):
        suppress8(slots[0], slots[1], slots[2], slots[3], s, box[0], box[1], box[2], box[3], thr, dead)


@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5])
def test_suppress8_marks_the_slots_whose_scalar_iou_is_above_the_threshold(thr) -> None:
    rng = np.random.default_rng(11)
    for trial in range(200):
        n = int(rng.integers(1, 70))
        slots = _slots(rng, n)
        lo = LANES * int(rng.integers(0, n // LANES + 1))
        box = np.r_[rng.uniform(0.3, 0.5, 2), 0.0, 0.0]
        box[2:] = box[:2] + rng.uniform(0.02, 0.3, 2)
        before = (rng.random(n + LANES) < 0.2).astype(np.uint8)  # marks already made stay
        dead = before.copy()
        _suppress(slots, lo, n + LANES, box, thr, dead)
        expected = before.copy()
        expected[lo:] |= (_scalar_ious(slots, box)[lo:] > thr).astype(np.uint8)
        np.testing.assert_array_equal(dead, expected, err_msg=str(trial))


@numba.njit
def _decays(score, position, weight, nc, thresh, float32_scores):
    """The kernel's loop over a step's candidates; the died lanes' bit masks, one per eight."""
    died = np.zeros((nc + LANES - 1) // LANES, np.int64)
    for t in range(0, nc, LANES):
        died[t // LANES] = decay8(score, position, weight, t, nc, thresh, float32_scores)
    return died


@pytest.mark.parametrize("float32_scores", [False, True])
def test_decay8_multiplies_each_candidate_score_and_kills_those_not_above_thresh(float32_scores) -> None:
    rng = np.random.default_rng(12)
    for trial in range(300):
        n = 100
        nc = int(rng.integers(0, 40))
        position = np.r_[rng.permutation(n)[:nc], rng.integers(0, n, LANES)]  # past nc: anything, never read
        weight = np.r_[rng.random(nc), rng.random(LANES)]
        weight[:nc][rng.random(nc) < 0.1] = 0.0  # products of exactly 0: not above a thresh of 0
        score = rng.uniform(0.0, 1.0, n)
        if float32_scores:
            score = score.astype(np.float32).astype(np.float64)
        thresh = float(rng.choice([0.0, 0.05, 0.3]))
        expected, expected_died = score.copy(), []
        for c in range(nc):  # the library's product, stored in its array's dtype, compared with thresh
            product = weight[c] * expected[position[c]]
            product = float(np.float32(product)) if float32_scores else product
            expected[position[c]] = product if product > thresh else -np.inf
            if not product > thresh:
                expected_died.append(c)
        died = _decays(score, position, weight, nc, thresh, float32_scores)
        np.testing.assert_array_equal(score, expected, err_msg=str(trial))  # other scores untouched
        assert [c for c in range(nc) if died[c // LANES] >> (c % LANES) & 1] == expected_died, trial
        assert all(d >> (nc - LANES * k) == 0 for k, d in enumerate(died) if nc - LANES * k < LANES), trial


@numba.njit
def _gaussian_decays(score, position, iou, nc, sigma, thresh, float32_scores):
    died = np.zeros((nc + LANES - 1) // LANES, np.int64)
    for t in range(0, nc, LANES):
        died[t // LANES] = gaussian_decay8(score, position, iou, t, nc, sigma, thresh, float32_scores)
    return died


@numba.njit
def _gaussian_weights(iou, sigma):
    out = np.empty_like(iou)
    for t in range(len(iou)):
        out[t] = exp_vectorisable(-(iou[t] * iou[t]) / sigma)
    return out


@pytest.mark.parametrize("float32_scores", [False, True])
def test_gaussian_decay8_is_decay8_of_the_vectorisable_exp_weights_bit_for_bit(float32_scores) -> None:
    """The kernel's one-pass gaussian decays equal its two passes (weights by ``exp_vectorisable``, then decay8)."""
    rng = np.random.default_rng(13)
    for trial in range(300):
        n, nc = 100, int(rng.integers(0, 40))
        position = np.r_[rng.permutation(n)[:nc], rng.integers(0, n, LANES)]
        iou = np.r_[rng.random(nc) ** 2, rng.random(LANES)]
        iou[:nc][rng.random(nc) < 0.1] = 0.0  # weight exactly 1
        sigma = float(rng.choice([0.5, 0.1, 2.0, 1.0 / 700.0]))
        score = rng.uniform(0.0, 1.0, n)
        if float32_scores:
            score = score.astype(np.float32).astype(np.float64)
        thresh = float(rng.choice([0.0, 0.001, 0.3]))
        two_pass = score.copy()
        died_two = _decays(two_pass, position, _gaussian_weights(iou, sigma), nc, thresh, float32_scores)
        died_one = _gaussian_decays(score, position, iou, nc, sigma, thresh, float32_scores)
        np.testing.assert_array_equal(score, two_pass, err_msg=str(trial))
        np.testing.assert_array_equal(died_one, died_two, err_msg=str(trial))
