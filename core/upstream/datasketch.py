"""datasketch's choice of LSH banding for a Jaccard threshold.

Private API: `datasketch.lsh._optimal_param(threshold, num_perm, fp_weight, fn_weight)`, the
(bands, rows per band) that minimise the weighted false positive and false negative
probabilities at the threshold.

Why: MinHashLSH computes these on construction but offers no function for them, and its index
(one Python dict per band) is what near-duplicate removal replaces with numpy arrays over a
million rows; the banding must stay the one datasketch would pick for the same threshold.
Supported datasketch versions: core.upstream.SUPPORTED["datasketch"].
"""

from __future__ import annotations


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) for MinHash LSH at the threshold, false positives and negatives
    weighted equally (MinHashLSH's default)."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 0.5, 0.5)
