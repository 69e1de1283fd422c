"""Shared helpers for scripts/check_parity.py and the parity case runners."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CaseResult:
    name: str
    rel_l2: float
    max_abs: float
    passed: bool
    note: str = ""

    def line(self) -> str:
        status = "ok" if self.passed else "FAIL"
        extra = f" ({self.note})" if self.note else ""
        return f"{self.name} rel_l2={self.rel_l2:.3e} max_abs={self.max_abs:.3e} {status}{extra}"


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def compare(name: str, ours, ref, *, rel_tol: float | None = None, abs_tol: float | None = None,
            note: str = "") -> CaseResult:
    """Compare two arrays; pass when every given tolerance holds (rel-L2 and/or max-abs)."""
    a, b = _np(ours), _np(ref)
    if a.shape != b.shape:
        return CaseResult(name, float("inf"), float("inf"), False, f"shape {a.shape} != {b.shape}")
    diff = a - b
    denom = float(np.linalg.norm(b.ravel()))
    rel = float(np.linalg.norm(diff.ravel())) / denom if denom > 0 else float(np.linalg.norm(diff.ravel()))
    mx = float(np.abs(diff).max()) if diff.size else 0.0
    ok = np.isfinite(a).all()
    if rel_tol is not None:
        ok = ok and rel < rel_tol
    if abs_tol is not None:
        ok = ok and mx < abs_tol
    return CaseResult(name, rel, mx, bool(ok), note)


def exact(name: str, ours, ref, note: str = "") -> CaseResult:
    """Exact equality of integers / lists / scalars."""
    a, b = np.asarray(ours), np.asarray(ref)
    if a.shape != b.shape:
        return CaseResult(name, float("inf"), float("inf"), False, f"shape {a.shape} != {b.shape}")
    same = bool(np.array_equal(a, b))
    mx = 0.0 if same else float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
    return CaseResult(name, 0.0 if same else float("inf"), mx, same, note)
