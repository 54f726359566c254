"""The online latency estimate's rows, kept consistent with the running fit's idle decay time constant.

The candidates' rows (:func:`~wattprint.profiler.attribution.latency.latency_rows`) hold the idle decay
time constant τ they were built with: where power rises after a quiet spell, the decay's energy and the
latency's shift land in the same rows. Sums of rows built while the running fit's τ moved (it starts
near the prior's 2 s and settles over the first minute) do not fit any one τ, and their profile
likelihood is biased: on the twin at 0.2 requests/s a board with a 3.1 ms latency read 0 (the same rows
at one τ: 3.2 ms). Dropping the sums when τ moved (as before) lost the first rises, and a 100 s trace
never had enough rows left.

So the blocks that inform the latency (a busy stretch starts in them: a few per minute at low arrival
rates, none on a busy server; and, once there were rises, the small blocks between them, whose rows fit
each candidate's coefficients) are kept, bounded by their steps, and when τ has moved by more than
``REBUILD_TAU`` since the sums were built, the sums are built again from them with the current τ, with
the same forgetting.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from wattprint.profiler.attribution.coefficients import Coefficients
from wattprint.profiler.attribution.columns import StepColumns
from wattprint.profiler.attribution.latency import Candidates, latency_rows

#: the sums are built again when the running fit's τ has moved by more than this (log ratio) since
REBUILD_TAU = 0.05
#: at most this many steps of blocks with rises are kept (the oldest go first; ~60 µs a step to rebuild)
MAX_STEPS = 20_000
#: blocks without a rise still inform each candidate's coefficients (the rows without falling edges:
#: fitted on the rising blocks alone, the estimates ran ~0.5 ms late on the twin): kept up to this long
#: after a rise, if they are this small (a quiet device; a busy one has no rises to explain), and at most
#: this many steps of them. A device between the two pays at most ~120 ms of rows a 2 s block
STEADY_AFTER_RISE_S = 300.0
STEADY_BLOCK_STEPS = 2_000
MAX_STEADY_STEPS = 20_000


@dataclass(frozen=True, eq=False)
class RiseBlock:
    """One block's inputs to :func:`latency_rows` (``b_t``: publish times, no latency applied), the
    forgetting applied to the sums before its rows were added, and whether a busy stretch starts in it."""

    cols: StepColumns
    b_t: np.ndarray
    b_e: np.ndarray
    prev_end: float
    first: bool
    new_after: float | None
    decay: float
    rises: bool = True

    def rows(self, coef: Coefficients) -> Candidates:
        return latency_rows(self.cols, coef, self.b_t, self.b_e, self.prev_end, self.first, self.new_after)


class RiseHistory:
    """The candidates' running sums and the blocks they came from."""

    def __init__(self, max_steps: int = MAX_STEPS, max_steady_steps: int = MAX_STEADY_STEPS):
        self.limits = {True: max_steps, False: max_steady_steps}
        self.blocks: deque[RiseBlock] = deque()
        self.steps = {True: 0, False: 0}  # kept, by whether the block has rises
        self.tau_s: float | None = None  # the idle decay time constant the sums' rows were built with
        self.sums = Candidates()
        self.rebuilds = 0
        self.last_rise_s: float | None = None  # where the last block with a rise ended

    def wants(self, n_steps: int, rises: bool, t_s: float) -> bool:
        """Whether a block of ``n_steps`` ending at ``t_s`` informs the sums: any with a rise; one without,
        only soon after a rise and if small (see ``STEADY_BLOCK_STEPS``)."""
        return rises or (self.last_rise_s is not None and t_s - self.last_rise_s <= STEADY_AFTER_RISE_S
                         and n_steps <= STEADY_BLOCK_STEPS)

    def add(self, block: RiseBlock, coef: Coefficients) -> Candidates:
        """Add a block's rows (``coef``: the running fit's τ and capped steps); return the sums."""
        self.blocks.append(block)
        self.steps[block.rises] += len(block.cols.t_start)
        if block.rises:
            self.last_rise_s = float(block.b_t[-1])
        for kind in (True, False):
            while self.steps[kind] > self.limits[kind] and sum(b.rises == kind for b in self.blocks) > 1:
                i = next(i for i, b in enumerate(self.blocks) if b.rises == kind)
                self.steps[kind] -= len(self.blocks[i].cols.t_start)
                del self.blocks[i]
        if self.tau_s is not None and abs(np.log(coef.tau_s / self.tau_s)) <= REBUILD_TAU:
            self.sums.add_from(block.rows(coef), block.decay)
            return self.sums
        self.sums, self.tau_s = Candidates(), coef.tau_s
        for b in self.blocks:
            self.sums.add_from(b.rows(coef), b.decay)
        self.rebuilds += len(self.blocks) > 1
        return self.sums
