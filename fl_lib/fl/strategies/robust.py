"""Byzantine-robust aggregation: rules that bound what a few lying clients can do to a round.

Unlike FedAvg and DGA, these rules need every update of the round at once: each client's
Δ_k (what training changes: its parameters and BatchNorm statistics) is kept as one float32
row of d entries, so server memory grows with K: K·d·4 bytes (plus K/s rows of bucket
means with bucketing), checked against `strategy.memory_limit_mb` before training. The
rules never stack the rows into a second K×d matrix: they work on column blocks of
CHUNK coordinates (sorts, distances) and on weighted sums of rows, so their working
memory beyond the rows is O(K·CHUNK + d). Each rule returns one vector, which the server
optimizer steps on as it does on FedAvg's mean (hierarchical optimization).

Rows are ordered by client id before the rule runs, so the result does not depend on the
order results arrive in, nor on how torchrun ranks split the clients. The weight reported
for a client is its share of the aggregate: for the coordinate-wise rules, the share of
coordinates at which its value is kept; for Krum, 1/m if selected; for the geometric
median, its final Weiszfeld weight; for the clipping rules, its clip factor, normalized.

- median: coordinate-wise median (mean of the two middle values for even K);
- trimmed_mean: per coordinate, drop the ⌊βK⌋ largest and smallest values, average the rest
  (Yin et al., 2018);
- krum: Multi-Krum (Blanchard et al., 2017): score_i = Σ of the squared distances from
  row i to its K − f − 2 nearest rows; average the m rows of lowest score;
- geometric_median: RFA (Pillutla et al., 2022), smoothed Weiszfeld iterations
  z ← Σ_i w_i x_i / Σ_i w_i, w_i = 1 / max(ν, ‖x_i − z‖), from the mean, until the step is
  below `tolerance`·‖z‖ or `max_iterations`;
- centered_clipping (Karimireddy et al., 2021): from v (the previous round's aggregate),
  `clip_iterations` times v ← v + mean_i clip_τ(x_i − v), clip_τ(y) = y·min(1, τ/‖y‖);
- norm_bounding: each Δ_k scaled to at most the round's median norm, then averaged (Sun et
  al., 2019, bound by a fixed norm; the median adapts it to the round).

`bucket_size` s > 1 first averages random buckets of s clients (Karimireddy et al., 2022:
bucketing makes non-IID honest clients look alike to the rule); the bucket's share is
split evenly among its clients.
"""
from __future__ import annotations

import logging
import math
from abc import abstractmethod
from typing import Dict, List, Optional, Tuple

import torch

from .base import Aggregate, ClientResult, State, Strategy
from ..sampling import derive_seed

logger = logging.getLogger(__name__)
SMOOTHING = 1e-6  # RFA's ν: a row at the current estimate does not get an infinite weight
CHUNK = 1 << 16  # coordinates per column block


class Rows:
    """A round's updates as K float32 rows of d entries, and the few operations the rules need."""

    def __init__(self, rows: List[torch.Tensor]) -> None:
        self.rows = rows
        self.k, self.d = len(rows), rows[0].numel()
        self.device = rows[0].device  # the model's (a GPU under --ngpu 1); the small K-vectors stay on the CPU

    def blocks(self):
        """(start, K×c block) over column blocks of CHUNK coordinates: the only K-row temporaries."""
        for j in range(0, self.d, CHUNK):
            yield j, torch.stack([r[j : j + CHUNK] for r in self.rows])

    def combination(self, w: torch.Tensor) -> torch.Tensor:
        """Σ_i w_i x_i."""
        out = torch.zeros(self.d, dtype=torch.float32, device=self.device)
        for wi, r in zip(w.tolist(), self.rows):
            out.add_(r, alpha=wi)
        return out

    def sq_distances(self, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        """‖x_i − z‖² for every row (z = 0: the squared norms), accumulated in float64."""
        out = torch.zeros(self.k, dtype=torch.float64)
        for j, block in self.blocks():
            b = block.double() if z is None else block.double() - z[j : j + CHUNK].double()
            out += b.square().sum(1).cpu()
        return out

    def pairwise_sq_distances(self) -> torch.Tensor:
        out = torch.zeros(self.k, self.k, dtype=torch.float64)
        for _, block in self.blocks():
            # Not the matrix-product form (‖x‖² + ‖y‖² − 2x·y), which loses the distance of two close rows to cancellation.
            out += torch.cdist(block.double(), block.double(), compute_mode="donot_use_mm_for_euclid_dist").square().cpu()
        return out


class RobustRule(Strategy):
    """The rules that see every update of a round (as rows, never stacked into one matrix)."""

    #: strategy.name in the federated config.
    name: str = ""

    def __init__(self, bucket_size: int = 1, memory_limit_mb: float = 4096.0, seed: int = 0) -> None:
        if not (isinstance(bucket_size, int) and bucket_size >= 1):
            raise ValueError(f"bucket_size must be an integer >= 1, got {bucket_size}")
        if memory_limit_mb <= 0:
            raise ValueError(f"memory_limit_mb must be > 0, got {memory_limit_mb}")
        self.bucket_size = bucket_size
        self.memory_limit_mb = float(memory_limit_mb)
        self.seed = seed
        self.rounds_seen = 0  # the bucketing permutation's index
        self.last_metrics: dict = {}

    # -- memory --------------------------------------------------------------
    def memory_bytes(self, k: int, d: int) -> int:
        """Bytes of the round's rows for K clients of d floats: K rows, and K/s bucket means
        beside them while they are made. The O(K·CHUNK + d) working memory is left out, and so
        is, under torchrun, the pickled copy of the other ranks' rows that rank 0 holds while
        it gathers them."""
        rows = k + (math.ceil(k / self.bucket_size) if self.bucket_size > 1 else 0)
        return rows * d * 4

    def check_sampler(self, sampler: str) -> None:
        if sampler == "poisson":
            raise ValueError(f"strategy '{self.name}' budgets its memory for K clients: a Poisson cohort has no upper "
                             "bound. Use sampler uniform or weighted")

    def check_memory(self, clients_per_round: int, num_floats: int) -> None:
        """Refuse, before any training, a K whose rows would exceed memory_limit_mb."""
        need = self.memory_bytes(clients_per_round, num_floats) / 2**20
        if need > self.memory_limit_mb:
            raise ValueError(
                f"strategy '{self.name}' holds every update of a round at once: K={clients_per_round} clients of "
                f"{num_floats:,} floats need {need:,.0f} MB, above strategy.memory_limit_mb={self.memory_limit_mb:g}. "
                "Lower clients_per_round, or raise the limit if the server has the memory."
            )

    # -- the round -----------------------------------------------------------
    def begin_round(self) -> None:
        self._rows: Dict[str, torch.Tensor] = {}
        self._layout: Optional[List[Tuple[str, torch.Size]]] = None

    def score(self, result: ClientResult) -> float:
        raise TypeError(f"strategy '{self.name}' aggregates the round's updates together: a client has no score of its own")

    def add(self, result: ClientResult) -> None:
        keys = [k for k, v in result.delta.items() if v.is_floating_point()]
        layout = [(k, result.delta[k].shape) for k in keys]
        if self._layout is None:
            self._layout = layout
        elif layout != self._layout:
            raise ValueError(f"client {result.client_id}: its update has other entries or shapes than the round's first")
        self._rows[result.client_id] = torch.cat([result.delta[k].detach().reshape(-1).to(torch.float32) for k in keys])

    def all_reduce(self, like: State) -> None:
        """Under torchrun: rank 0 gathers every rank's rows (the rule runs there only)."""
        import torch.distributed as dist

        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(self._rows, gathered, dst=0)
        if gathered is not None:
            self._rows = {cid: row for part in gathered for cid, row in part.items()}
            if self._layout is None:  # rank 0 trained no client itself
                self._layout = [(k, v.shape) for k, v in like.items() if v.is_floating_point()]

    def aggregate(self) -> Optional[Aggregate]:
        if not self._rows:
            return None
        ids = sorted(self._rows)
        rows = [self._rows.pop(c) for c in ids]
        groups = self._buckets(len(ids))
        if groups is not None:
            rows = [torch.stack([rows[i] for i in g]).mean(0) for g in groups]
        vector, shares = self.combine(Rows(rows))
        del rows
        if groups is None:
            weights = dict(zip(ids, shares.tolist()))
        else:
            weights = {ids[i]: float(shares[b]) / len(g) for b, g in enumerate(groups) for i in g}
        self.rounds_seen += 1
        return Aggregate(self._unflatten(vector), weights)

    def _buckets(self, k: int) -> Optional[List[List[int]]]:
        """A random partition of the K rows into buckets of bucket_size (the last may be smaller), seeded by round."""
        if self.bucket_size == 1:
            return None
        g = torch.Generator().manual_seed(derive_seed(self.seed, "buckets", self.rounds_seen))
        perm = torch.randperm(k, generator=g).tolist()
        return [perm[i : i + self.bucket_size] for i in range(0, k, self.bucket_size)]

    def _unflatten(self, vector: torch.Tensor) -> State:
        out, offset = {}, 0
        for k, shape in self._layout:
            n = math.prod(shape)
            out[k] = vector[offset : offset + n].view(shape).clone()
            offset += n
        return out

    @abstractmethod
    def combine(self, x: Rows) -> Tuple[torch.Tensor, torch.Tensor]:
        """The aggregate of the rows, and each row's share of it (K, summing to 1)."""

    def round_metrics(self) -> dict:
        return dict(self.last_metrics)

    def state_dict(self) -> dict:
        return {"rounds_seen": self.rounds_seen}

    def load_state_dict(self, state: dict) -> None:
        self.rounds_seen = state["rounds_seen"]


def _middle_mean(values: torch.Tensor) -> torch.Tensor:
    """The median along dim 0 of values sorted along dim 0: the middle one, or the mean of the two middle ones."""
    k = values.shape[0]
    return (values[(k - 1) // 2] + values[k // 2]) / 2


class _CoordinateWise(RobustRule):
    """Per coordinate: sort the K values, average the kept ranks [lo, hi)."""

    @abstractmethod
    def kept(self, k: int) -> Tuple[int, int]:
        """The sorted ranks [lo, hi) averaged at each coordinate, for K rows."""

    def combine(self, x):
        lo, hi = self.kept(x.k)
        out = torch.empty(x.d, dtype=torch.float32, device=x.device)
        counts = torch.zeros(x.k, dtype=torch.float64)
        for j, block in x.blocks():
            values, rows = block.sort(dim=0)
            out[j : j + block.shape[1]] = values[lo:hi].mean(0)
            counts += torch.bincount(rows[lo:hi].reshape(-1), minlength=x.k).cpu()
        return out, counts / counts.sum()


class Median(_CoordinateWise):
    name = "median"

    def kept(self, k):
        return (k - 1) // 2, k // 2 + 1  # the middle value, or the two middle ones


class TrimmedMean(_CoordinateWise):
    name = "trimmed_mean"

    def __init__(self, trim_fraction: float, **kw) -> None:
        super().__init__(**kw)
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trimmed_mean trim_fraction must be in [0, 0.5), got {trim_fraction}")
        self.trim_fraction = float(trim_fraction)

    def kept(self, k):
        b = int(math.floor(self.trim_fraction * k))
        self.last_metrics = {"trimmed_per_side": b}
        return b, k - b


class MultiKrum(RobustRule):
    name = "krum"

    def __init__(self, num_byzantine: int, num_selected: Optional[int] = None, **kw) -> None:
        super().__init__(**kw)
        if not (isinstance(num_byzantine, int) and num_byzantine >= 0):
            raise ValueError(f"krum num_byzantine (f) must be an integer >= 0, got {num_byzantine}")
        if num_selected is not None and not (isinstance(num_selected, int) and num_selected >= 1):
            raise ValueError(f"krum num_selected (m) must be an integer >= 1, got {num_selected}")
        self.f, self.m = num_byzantine, num_selected

    def min_clients(self) -> int:
        return self.f + 3  # a score needs K − f − 2 >= 1 other rows

    def check_memory(self, clients_per_round: int, num_floats: int) -> None:
        super().check_memory(clients_per_round, num_floats)
        if clients_per_round <= 2 * self.f + 2:
            logger.warning(f"krum: K={clients_per_round} <= 2f + 2 = {2 * self.f + 2}: Blanchard et al.'s guarantee "
                           f"needs K > 2f + 2 (num_byzantine={self.f})")

    def scores(self, x: Rows) -> torch.Tensor:
        """Krum's score of each row: the sum of its squared distances to its K − f − 2 nearest other rows."""
        n = x.k - self.f - 2
        if n < 1:
            raise ValueError(f"krum needs K > f + 2 rows to score (K={x.k}, f={self.f}); lower num_byzantine or bucket_size")
        sq = x.pairwise_sq_distances()
        sq.fill_diagonal_(math.inf)
        return sq.sort(dim=1).values[:, :n].sum(1)

    def combine(self, x):
        m = x.k - self.f if self.m is None else self.m
        if m > x.k:
            raise ValueError(f"krum num_selected={m} is more than the K={x.k} rows of the round")
        chosen = torch.sort(self.scores(x), stable=True).indices[:m]
        shares = torch.zeros(x.k, dtype=torch.float64)
        shares[chosen] = 1.0 / m
        self.last_metrics = {"krum_selected": int(m)}
        return x.combination(shares), shares


class GeometricMedian(RobustRule):
    name = "geometric_median"

    def __init__(self, tolerance: float = 1e-5, max_iterations: int = 100, **kw) -> None:
        super().__init__(**kw)
        if tolerance <= 0 or not (isinstance(max_iterations, int) and max_iterations >= 1):
            raise ValueError(f"geometric_median needs tolerance > 0 and max_iterations >= 1, got {tolerance}, {max_iterations}")
        self.tolerance, self.max_iterations = float(tolerance), max_iterations

    def combine(self, x):
        z = x.combination(torch.full((x.k,), 1.0 / x.k))
        converged = False
        for it in range(1, self.max_iterations + 1):
            w = 1.0 / x.sq_distances(z).sqrt().clamp(min=SMOOTHING)
            new = x.combination(w / w.sum())
            step = float((new.double() - z.double()).norm())
            z = new
            if step <= self.tolerance * max(float(z.norm()), SMOOTHING):
                converged = True
                break
        w = 1.0 / x.sq_distances(z).sqrt().clamp(min=SMOOTHING)
        self.last_metrics = {"weiszfeld_iterations": it, "weiszfeld_converged": converged}
        return z, w / w.sum()


class CenteredClipping(RobustRule):
    name = "centered_clipping"

    def __init__(self, clip_radius: float, clip_iterations: int = 1, **kw) -> None:
        super().__init__(**kw)
        if clip_radius <= 0 or not (isinstance(clip_iterations, int) and clip_iterations >= 1):
            raise ValueError(f"centered_clipping needs clip_radius > 0 and clip_iterations >= 1, got {clip_radius}, {clip_iterations}")
        self.tau, self.iterations = float(clip_radius), clip_iterations
        self.center: Optional[torch.Tensor] = None  # the previous round's aggregate: where clipping is centred

    def combine(self, x):
        v = torch.zeros(x.d, dtype=torch.float32, device=x.device) if self.center is None else self.center.to(x.device).clone()
        factors = torch.zeros(x.k, dtype=torch.float64)
        for _ in range(self.iterations):
            c = (self.tau / x.sq_distances(v).sqrt().clamp(min=1e-30)).clamp(max=1.0)
            # v + mean_i c_i (x_i − v), without forming the x_i − v
            v = v * (1.0 - float(c.sum()) / x.k) + x.combination(c / x.k)
            factors += c
        self.center = v
        self.last_metrics = {"clipped": int((c < 1).sum())}
        return v.clone(), factors / factors.sum()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "center": self.center}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.center = state["center"]


class NormBounding(RobustRule):
    name = "norm_bounding"

    def combine(self, x):
        norms = x.sq_distances().sqrt()
        bound = float(_middle_mean(norms.sort().values))
        c = (bound / norms.clamp(min=1e-30)).clamp(max=1.0)
        self.last_metrics = {"norm_bound": bound, "clipped": int((c < 1).sum())}
        shares = c / c.sum() if c.sum() > 0 else torch.full_like(c, 1.0 / x.k)  # half or more of the Δ are 0: so is the bound
        return x.combination(c / x.k), shares
