"""Which cells a round sends to reviewers: the study's selection rules (issue 6).

Nakamura et al. (Sci Rep 12:16736, 2022), Methods:

* **Pool sample.** Each round draws 5,000 cells uniformly at random from the
  unlabelled pool, so that CST and AL do not each flood the reviewers.
* **CST** (confirmed self-training): a cell whose top-1 probability is at least the
  threshold (0.9 here; the paper also used 0.99) is shown with its predicted class;
  the reviewer confirms or corrects it.
* **AL** (active learning, margin sampling): a cell whose margin
  ``p(top-1) - p(top-2)`` is below 0.2 is labelled by the reviewer.
* **CST+AL**: both sets from the same predictions; a cell is never asked twice.
* **ST** (plain self-training, the paper's discarded baseline): confident cells get
  their pseudo-label without review.

Inputs are probability matrices ``P`` of shape ``(n, C)`` whose rows sum to 1.
Every rule returns row indices into ``P`` in ascending order: a selection is a set,
and the order a reviewer sees is the queue's business, not this module's.

Boundaries, decided once here so that the selector service, experiments and tests
agree:

* CST is **inclusive**: ``p1 >= threshold`` (the paper's "0.99 or more").
* AL is **strict**: ``p1 - p2 < margin`` (the paper's "less than the threshold").
* Comparisons happen in ``P``'s own floating dtype, so a float32 softmax output of
  ``0.9`` meets a threshold of ``0.9`` (in float64 that value is 0.8999999762 and
  would not). The margin is the floating difference :func:`margin` returns; where
  ``p1 - p2`` is not exactly representable (0.6 - 0.4 is 0.19999999999999996) the
  rounded value decides.
* Ties in the top two classes go to the lower class index.

Precedence in CST+AL: a row can satisfy both rules only when the threshold is
below ``0.5 + margin / 2``. (Given ``p1``, the largest possible ``p2`` is
``min(p1, 1 - p1)``, so the smallest margin is ``max(0, 2 p1 - 1)``; every
``p1 >= t`` has margin at least ``2t - 1``, which is ``>= m`` exactly when
``t >= (1 + m) / 2``.) With the study's 0.9 / 0.2 the sets are disjoint. When they
overlap the row goes to **AL**: its margin says the model is torn between two
classes, so the reviewer should label it rather than be shown one class to confirm
(a suggestion anchors the answer, which is what CST's confirmation step trades on
for cells the model is sure of, and what the study's AL avoids).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STRATEGIES: tuple[str, ...] = ("cst", "al", "cst+al", "st", "random", "least_confidence", "entropy")

_ROW_SUM_TOLERANCE = 1e-3  # float32 softmax rows sum to 1 within ~1e-6; this only catches misuse


def _as_probabilities(P: np.ndarray) -> np.ndarray:
    P = np.asarray(P)
    if not np.issubdtype(P.dtype, np.floating):
        P = P.astype(np.float64)
    if P.ndim != 2 or P.shape[1] < 2:
        raise ValueError(f"P must be an (n, C) array with C >= 2 classes, got shape {P.shape}")
    if not np.all(np.isfinite(P)) or np.any(P < 0):
        raise ValueError("P must hold finite, non-negative probabilities")
    sums = P.sum(axis=1, dtype=np.float64)
    bad = np.flatnonzero(np.abs(sums - 1.0) > _ROW_SUM_TOLERANCE)
    if bad.size:
        raise ValueError(f"rows of P must sum to 1; row {bad[0]} sums to {sums[bad[0]]}")
    return P


def _rows(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask).astype(np.int64)


def sample_pool(cell_ids: np.ndarray, sample_size: int, seed: int) -> np.ndarray:
    """Draw the round's pool sample: ``sample_size`` ids uniformly without replacement.

    The ids are sorted before drawing, so the same set of ids and the same seed give
    the same sample whatever order the database returned them in. The generator is
    ``numpy.random.Generator(PCG64(seed))``. A sample size at or above the pool size
    returns the whole pool. The result is sorted.
    """
    if sample_size < 0:
        raise ValueError(f"sample_size must be >= 0, got {sample_size}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    ids = np.sort(np.asarray(cell_ids).ravel())
    if ids.size > 1 and np.any(ids[1:] == ids[:-1]):
        raise ValueError("cell_ids repeats an id; the pool must list each cell once")
    if sample_size >= ids.size:
        return ids
    rng = np.random.Generator(np.random.PCG64(seed))
    return np.sort(rng.choice(ids, size=sample_size, replace=False))


def top2(P: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row: top-1 class index, its probability, top-2 class index, its probability.

    Ties go to the lower class index (a stable sort of ``-P``).
    """
    P = _as_probabilities(P)
    order = np.argsort(-P, axis=1, kind="stable")[:, :2]
    rows = np.arange(P.shape[0])
    top1_idx, top2_idx = order[:, 0], order[:, 1]
    return top1_idx, P[rows, top1_idx], top2_idx, P[rows, top2_idx]


def margin(P: np.ndarray) -> np.ndarray:
    """Per row, ``p(top-1) - p(top-2)`` in ``P``'s dtype: the AL criterion."""
    _, p1, _, p2 = top2(P)
    return p1 - p2


def _cst_mask(P: np.ndarray, threshold: float) -> np.ndarray:
    _, p1, _, _ = top2(P)
    return p1 >= p1.dtype.type(threshold)


def _al_mask(P: np.ndarray, margin_: float) -> np.ndarray:
    m = margin(P)
    return m < m.dtype.type(margin_)


def select_cst(P: np.ndarray, threshold: float = 0.9) -> np.ndarray:
    """Rows the model is confident about: ``p1 >= threshold`` (inclusive)."""
    return _rows(_cst_mask(_as_probabilities(P), threshold))


def select_al(P: np.ndarray, margin: float = 0.2) -> np.ndarray:
    """Rows the model is torn on: ``p1 - p2 < margin`` (strict)."""
    return _rows(_al_mask(_as_probabilities(P), margin))


def select_st(P: np.ndarray, threshold: float = 0.99) -> np.ndarray:
    """Plain self-training: rows with ``p1 >= threshold`` take their pseudo-label unreviewed.

    The same rule as CST (0.99 is the paper's ST setting); what differs is that the
    caller adds these labels without a reviewer, which is why the study replaced it.
    """
    return select_cst(P, threshold)


def select_random(n: int, k: int, seed: int) -> np.ndarray:
    """``k`` of ``n`` rows uniformly without replacement (all rows when ``k >= n``)."""
    if n < 0 or k < 0:
        raise ValueError(f"n and k must be >= 0, got n={n}, k={k}")
    return sample_pool(np.arange(n, dtype=np.int64), k, seed)


def _lowest_k(score: np.ndarray, k: int) -> np.ndarray:
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    # Stable sort: equal scores go to the lower row index, so the choice is reproducible.
    return np.sort(np.argsort(score, kind="stable")[:k]).astype(np.int64)


def select_least_confidence(P: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` rows with the lowest top-1 probability (ties to the lower row index)."""
    _, p1, _, _ = top2(P)
    return _lowest_k(p1, k)


def entropy(P: np.ndarray) -> np.ndarray:
    """Per row Shannon entropy in nats, with ``0 log 0 = 0``."""
    P = _as_probabilities(P).astype(np.float64)
    logs = np.log(np.where(P > 0, P, 1.0))
    return -(P * logs).sum(axis=1)


def select_entropy(P: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` rows with the highest entropy (ties to the lower row index)."""
    return _lowest_k(-entropy(P), k)


def cap_per_class(
    indices: np.ndarray,
    predicted_class: np.ndarray,
    cap: int | None,
    priority: np.ndarray,
) -> np.ndarray:
    """Keep at most ``cap`` of ``indices`` per predicted class, highest priority first.

    ``predicted_class`` and ``priority`` are per row of ``P`` (length ``n``), indexed
    by ``indices``. Higher priority is kept: pass ``p1`` for CST (most confident
    first) and ``-margin`` for AL (smallest margin first). Equal priorities go to the
    lower row index. ``cap=None`` returns ``indices`` unchanged (the study has no cap).
    """
    indices = np.asarray(indices, dtype=np.int64)
    if cap is None:
        return indices
    if cap < 1:
        raise ValueError(f"cap must be None or >= 1, got {cap}")
    cls = np.asarray(predicted_class)[indices]
    pri = np.asarray(priority)[indices]
    # lexsort sorts by the last key first: class, then priority descending, then row.
    order = np.lexsort((indices, -pri, cls))
    cls_sorted = cls[order]
    starts = np.r_[0, np.flatnonzero(cls_sorted[1:] != cls_sorted[:-1]) + 1]
    group_start = np.repeat(starts, np.diff(np.r_[starts, cls_sorted.size]))
    rank_in_class = np.arange(cls_sorted.size) - group_start
    return np.sort(indices[order][rank_in_class < cap])


@dataclass(frozen=True)
class SelectionParams:
    """A round's selection settings, validated on construction.

    ``budget`` sizes the uncertainty baselines (random, least confidence, entropy);
    ``None`` gives them as many tasks as CST+AL would on the same predictions, so
    strategies are compared at equal reviewer effort.
    """

    threshold: float = 0.9
    margin: float = 0.2
    st_threshold: float = 0.99
    cap: int | None = None
    budget: int | None = None

    def __post_init__(self) -> None:
        for name in ("threshold", "margin", "st_threshold"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.cap is not None and self.cap < 1:
            raise ValueError(f"cap must be None or >= 1, got {self.cap}")
        if self.budget is not None and self.budget < 0:
            raise ValueError(f"budget must be None or >= 0, got {self.budget}")


@dataclass(frozen=True)
class Selection:
    """The outcome of one strategy on one prediction matrix.

    ``cst``: rows shown with their predicted class for the reviewer to confirm or
    correct. ``al``: rows the reviewer labels (margin sampling, and the baselines
    random / least confidence / entropy, which also ask a human). ``st``: rows whose
    pseudo-label is accepted without review. The three are disjoint.
    ``top_classes`` and ``top_probs`` are ``(n, 2)`` per row of ``P``: top-1 and top-2.
    """

    strategy: str
    cst: np.ndarray
    al: np.ndarray
    st: np.ndarray
    top_classes: np.ndarray
    top_probs: np.ndarray

    @property
    def suggested_class(self) -> np.ndarray:
        """Per row of ``P``, the class the model proposes (its top-1)."""
        return self.top_classes[:, 0]

    @property
    def rows(self) -> np.ndarray:
        """Every selected row, ascending."""
        return np.sort(np.concatenate([self.cst, self.al, self.st]))

    def counts_by_kind(self) -> dict[str, int]:
        return {"cst": int(self.cst.size), "al": int(self.al.size), "st": int(self.st.size)}

    def counts_by_class(self, codes: list[str]) -> dict[str, dict[str, int]]:
        """Per kind, how many selected rows the model assigns to each class code."""
        if len(codes) <= int(self.top_classes[:, 0].max(initial=-1)):
            raise ValueError(f"{len(codes)} class codes cannot name predicted class indices")
        out: dict[str, dict[str, int]] = {}
        for kind, rows in (("cst", self.cst), ("al", self.al), ("st", self.st)):
            counts = np.bincount(self.suggested_class[rows], minlength=len(codes))
            out[kind] = {code: int(c) for code, c in zip(codes, counts, strict=True)}
        return out


def _selection(
    strategy: str, P: np.ndarray, cst: np.ndarray, al: np.ndarray, st: np.ndarray
) -> Selection:
    top1_idx, p1, top2_idx, p2 = top2(P)
    return Selection(
        strategy=strategy,
        cst=cst,
        al=al,
        st=st,
        top_classes=np.stack([top1_idx, top2_idx], axis=1),
        top_probs=np.stack([p1, p2], axis=1),
    )


def select_cst_al(P: np.ndarray, threshold: float = 0.9, margin: float = 0.2) -> Selection:
    """CST and AL rows from the same predictions; a row that meets both goes to AL.

    See the module docstring for when the two can overlap and why AL wins. No cap.
    """
    P = _as_probabilities(P)
    al_mask = _al_mask(P, margin)
    cst_mask = _cst_mask(P, threshold) & ~al_mask
    empty = np.empty(0, dtype=np.int64)
    return _selection("cst+al", P, _rows(cst_mask), _rows(al_mask), empty)


def select(strategy: str, P: np.ndarray, params: SelectionParams, seed: int) -> Selection:
    """Apply one named strategy; the single entry point the selector and experiments use.

    ``seed`` only matters for ``random``. The per-class cap (``params.cap``) applies
    to CST (most confident kept), AL (smallest margin kept) and ST (most confident).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {list(STRATEGIES)}")
    P = _as_probabilities(P)
    top1_idx, p1, _, p2 = top2(P)
    neg_margin = -(p1 - p2)
    empty = np.empty(0, dtype=np.int64)

    def cst_al() -> tuple[np.ndarray, np.ndarray]:
        both = select_cst_al(P, params.threshold, params.margin)
        return (
            cap_per_class(both.cst, top1_idx, params.cap, p1),
            cap_per_class(both.al, top1_idx, params.cap, neg_margin),
        )

    cst = al = st = empty
    if strategy == "cst":
        cst = cap_per_class(select_cst(P, params.threshold), top1_idx, params.cap, p1)
    elif strategy == "al":
        al = cap_per_class(select_al(P, params.margin), top1_idx, params.cap, neg_margin)
    elif strategy == "cst+al":
        cst, al = cst_al()
    elif strategy == "st":
        st = cap_per_class(select_st(P, params.st_threshold), top1_idx, params.cap, p1)
    else:
        # Baselines default to CST+AL's task count: equal reviewer effort.
        k = params.budget if params.budget is not None else sum(r.size for r in cst_al())
        if strategy == "random":
            al = select_random(P.shape[0], k, seed)
        elif strategy == "least_confidence":
            al = select_least_confidence(P, k)
        else:
            al = select_entropy(P, k)
    return _selection(strategy, P, cst, al, st)


# --- label-efficiency strategies (issue 18) ------------------------------------------
#
# Selectable per round beside the study's three, which the code above keeps unchanged.
# ``cst-balanced`` / ``al-balanced``: the rule's candidates, cut to a budget spread as
# evenly as the candidates allow over the predicted classes (water-filling,
# :func:`balanced_budget`). ``al-diverse``: margin candidates thinned by k-center
# greedy (:func:`k_center_greedy`) on the network's penultimate embedding.
# ``cst+al+``: CST balanced plus AL balanced and diverse, from the same (calibrated)
# predictions. The classifier's probabilities are calibrated when the version carries
# a temperature (``bmcell.calibration``); that is what "calibrated" adds.

EFFICIENCY_STRATEGIES: tuple[str, ...] = (
    "cst-balanced",
    "al-balanced",
    "al-diverse",
    "cst+al+",
)

# What a round can run today: the study's rules and the two balanced budgets.
# ``al-diverse`` and ``cst+al+`` need the penultimate embedding from Triton, which the
# classifier does not return yet, so rounds do not accept them.
ROUND_STRATEGIES: tuple[str, ...] = (*STRATEGIES, "cst-balanced", "al-balanced")


def balanced_budget(
    indices: np.ndarray, predicted_class: np.ndarray, k: int, priority: np.ndarray
) -> np.ndarray:
    """At most ``k`` of ``indices``, spread over predicted classes by water-filling.

    Every class gets the same quota, a class with fewer candidates gives its unused
    quota to the others (redistributed), until ``min(k, len(indices))`` rows are
    chosen. Within a class the highest ``priority`` is taken first (ties to the lower
    row). Invariant: a class holds more than one row more than another only when the
    other has no candidate left. Hence with a per-class share ``s``: whenever
    ``sum_c min(available_c, ceil(s k)) >= k``, no class gets more than ``ceil(s k)``.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    k = min(k, indices.size)
    if k == 0:
        return np.empty(0, dtype=np.int64)
    cls = np.asarray(predicted_class)[indices]
    pri = np.asarray(priority)[indices]
    order = np.lexsort((indices, -pri, cls))
    cls_sorted = cls[order]
    starts = np.r_[0, np.flatnonzero(cls_sorted[1:] != cls_sorted[:-1]) + 1]
    sizes = np.diff(np.r_[starts, cls_sorted.size])
    # Smallest level L with sum(min(size, L)) >= k; classes take min(size, L - 1), then
    # the remainder goes one each to classes that still have candidates, lower class first.
    lo, hi = 0, int(sizes.max())
    while lo < hi:
        mid = (lo + hi) // 2
        if np.minimum(sizes, mid).sum() >= k:
            hi = mid
        else:
            lo = mid + 1
    level = lo
    take = np.minimum(sizes, level - 1)
    rest = k - int(take.sum())
    for g in np.flatnonzero(sizes >= level)[:rest]:
        take[g] += 1
    group_start = np.repeat(starts, sizes)
    rank = np.arange(cls_sorted.size) - group_start
    keep = rank < np.repeat(take, sizes)
    return np.sort(indices[order][keep])


def k_center_greedy(
    embedding: np.ndarray, k: int, labelled: np.ndarray | None = None, first: int = 0
) -> np.ndarray:
    """Core-set selection (Sener & Savarese, ICLR 2018): ``k`` rows of ``embedding``
    chosen one at a time, each the row farthest (Euclidean) from all chosen so far and
    from the ``labelled`` points (an ``(m, d)`` array, may be empty). With no labelled
    points the first pick is row ``first`` (pass the best-priority candidate). Ties go
    to the lower row. Returns the chosen rows in the order picked."""
    X = np.asarray(embedding, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"embedding must be (n, d), got shape {X.shape}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    n = X.shape[0]
    k = min(k, n)
    if k == 0:
        return np.empty(0, dtype=np.int64)
    chosen: list[int] = []
    if labelled is not None and len(labelled):
        L = np.asarray(labelled, dtype=np.float64)
        dist = np.min(((X[:, None, :] - L[None, :, :]) ** 2).sum(-1), axis=1)
    else:
        if not 0 <= first < n:
            raise ValueError(f"first must be a row of embedding, got {first}")
        chosen.append(first)
        dist = ((X - X[first]) ** 2).sum(1)
    while len(chosen) < k:
        dist[chosen] = -1.0
        nxt = int(np.argmax(dist))  # first maximum: ties to the lower row
        chosen.append(nxt)
        dist = np.minimum(dist, ((X - X[nxt]) ** 2).sum(1))
    return np.asarray(chosen, dtype=np.int64)


def select_efficient(
    strategy: str,
    P: np.ndarray,
    params: SelectionParams,
    embedding: np.ndarray | None = None,
    budget: int | None = None,
) -> Selection:
    """Apply one of :data:`EFFICIENCY_STRATEGIES`.

    ``budget`` (default ``params.budget``, else half the rule's candidates, at least 1)
    is per kind: CST and AL each get up to it. ``al-diverse`` and ``cst+al+`` need
    ``embedding`` (``(n, d)``, the penultimate layer per row of ``P``): margin
    candidates are ranked smallest margin first and thinned by k-center greedy
    starting from the smallest-margin row; for ``cst+al+`` the AL budget is first
    balanced over classes with a pool twice its size, then thinned to the budget.
    """
    if strategy not in EFFICIENCY_STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {EFFICIENCY_STRATEGIES}")
    P = _as_probabilities(P)
    top1_idx, p1, _, p2 = top2(P)
    neg_margin = -(p1 - p2)
    empty = np.empty(0, dtype=np.int64)
    if strategy in ("al-diverse", "cst+al+"):
        if embedding is None:
            raise ValueError(f"{strategy} needs the network's embedding (Triton's second output)")
        embedding = np.asarray(embedding)
        if embedding.ndim != 2 or embedding.shape[0] != P.shape[0]:
            raise ValueError(f"embedding must be ({P.shape[0]}, d), got {embedding.shape}")
    both = select_cst_al(P, params.threshold, params.margin)

    def k_of(candidates: np.ndarray) -> int:
        b = budget if budget is not None else params.budget
        return b if b is not None else max(1, (candidates.size + 1) // 2) if candidates.size else 0

    def diverse(candidates: np.ndarray, k: int) -> np.ndarray:
        if candidates.size == 0 or k == 0:
            return empty
        ranked = candidates[np.lexsort((candidates, -neg_margin[candidates]))]
        picks = k_center_greedy(embedding[ranked], k, first=0)
        return np.sort(ranked[picks])

    cst = al = empty
    if strategy == "cst-balanced":
        c = select_cst(P, params.threshold)
        cst = balanced_budget(c, top1_idx, k_of(c), p1)
    elif strategy == "al-balanced":
        a = select_al(P, params.margin)
        al = balanced_budget(a, top1_idx, k_of(a), neg_margin)
    elif strategy == "al-diverse":
        a = select_al(P, params.margin)
        al = diverse(a, k_of(a))
    else:
        cst = balanced_budget(both.cst, top1_idx, k_of(both.cst), p1)
        k = k_of(both.al)
        al = diverse(balanced_budget(both.al, top1_idx, 2 * k, neg_margin), k)
    return _selection(strategy, P, cst, al, empty)
