"""Per-kind checkers for the golden reference cases.

Each module exposes CHECKS = {kind: check(case_dir, case, io)}; `io` is the
case's io.npz loaded as a dict of numpy arrays (empty when the case has none).
A checker raises AssertionError with a message naming the output that differs.
"""

import numpy as np


def assert_close(name: str, got, expected, case: dict) -> None:
    """Float outputs within the case's tolerance; exact for integer outputs and exact_outputs."""
    got = np.asarray(got)
    expected = np.asarray(expected)
    assert got.shape == expected.shape, f"{name}: shape {got.shape}, expected {expected.shape}"
    exact = name in case.get("exact_outputs", []) or np.issubdtype(expected.dtype, np.integer)
    if exact or (case.get("atol", 0) == 0 and case.get("rtol", 0) == 0):
        bad = np.argwhere(got != expected)
        assert bad.size == 0, (
            f"{name}: {len(bad)} of {expected.size} values differ (must be exact); first at {tuple(bad[0])}: "
            f"got {got[tuple(bad[0])]}, expected {expected[tuple(bad[0])]}"
        )
        return
    atol, rtol = float(case["atol"]), float(case["rtol"])
    err = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    limit = atol + rtol * np.abs(expected.astype(np.float64))
    worst = np.unravel_index(np.argmax(err - limit), err.shape)
    assert np.all(err <= limit), (
        f"{name}: {(err > limit).sum()} of {expected.size} values outside atol={atol} rtol={rtol}; "
        f"max abs error {err.max():.3g} at {worst} (got {got[worst]}, expected {expected[worst]})"
    )
