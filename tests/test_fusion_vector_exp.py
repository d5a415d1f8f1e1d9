"""pipeline.fusion.vector_exp: within 1 ulp of math.exp (glibc) over its whole range, exact at 0, monotone,
vectorised, and the range check the soft-NMS kernel relies on."""
from __future__ import annotations

import math
import platform
import re

import numba
import numpy as np
import pytest

from pipeline.fusion.vector_exp import LOWEST_ARGUMENT, covers_gaussian_weights, exp_vectorisable


@numba.njit
def exp_all(x: np.ndarray, out: np.ndarray) -> None:
    for i in range(len(x)):
        out[i] = exp_vectorisable(x[i])


def evaluate(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    exp_all(x, out)
    return out


def ulps_from_glibc(x: np.ndarray) -> np.ndarray:
    ref = np.array([math.exp(v) for v in x])
    return np.abs(evaluate(x) - ref) / np.spacing(ref)


def test_within_one_ulp_of_glibc_over_the_range():
    rng = np.random.default_rng(0)
    near_zero = -rng.uniform(0.0, 1.0, 100_000) ** 6  # the small IoUs of neighbours: arguments near 0
    gaussian = -(rng.uniform(0.0, 1.0, 100_000) ** 2) / 0.5
    whole = rng.uniform(LOWEST_ARGUMENT, 0.0, 100_000)
    # the ends of the range reduction: halfway between multiples of ln 2, where the rounding picks k
    halfway = -(np.arange(1, 1000) + 0.5) * math.log(2.0)
    edges = np.r_[halfway, np.nextafter(halfway, 0.0), np.nextafter(halfway, -np.inf), LOWEST_ARGUMENT, -1e-300]
    for x in (near_zero, gaussian, whole, edges[edges >= LOWEST_ARGUMENT]):
        assert ulps_from_glibc(x).max() <= 1.0


def test_exact_at_zero_and_at_powers_of_two():
    x = np.array([0.0, -0.0, -math.log(2.0), -10 * math.log(2.0)])
    got = evaluate(x)
    assert got[0] == 1.0 and got[1] == 1.0  # a box that does not overlap keeps its score bit for bit
    assert got[2] == math.exp(-math.log(2.0)) and got[3] == math.exp(-10 * math.log(2.0))


def test_never_increases_as_the_argument_decreases():
    """A larger IoU never gets a larger weight: the selection order of equally scored boxes follows their IoUs."""
    x = np.sort(-np.random.default_rng(1).uniform(0.0, 3.0, 500_000))
    assert np.all(np.diff(evaluate(x)) >= 0.0)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="reads x86 assembly")
def test_the_loop_runs_on_vector_registers():
    """The point of the module: LLVM vectorises a loop calling it (glibc's exp it cannot)."""
    exp_all(np.zeros(16), np.zeros(16))
    asm = exp_all.inspect_asm(exp_all.signatures[0])
    assert re.search(r"\bv?mulpd\b", asm), "no packed double multiply: the loop was not vectorised"


@pytest.mark.parametrize("sigma, covered", [(0.5, True), (1.0 / 708.0, True), (1.0 / 708.5, False), (1e-9, False),
                                            (0.0, False), (-0.5, False), (math.nan, False), (math.inf, True)])
def test_covers_gaussian_weights(sigma, covered):
    assert covers_gaussian_weights(sigma) is covered
