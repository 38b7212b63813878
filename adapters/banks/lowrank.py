"""Low-rank additive term ``y += B (A x)`` (LoRA, rsLoRA, DoRA's direction, HRA's WY form).

The method's scale is folded into ``B`` when lowering, so the bank is scale-free.

Gather mode (``N`` tokens over ``U`` distinct active slots, ``r`` = the largest rank among
them, ``L`` = the most tokens any one of them has) has three forms:

- *stacked*: ``H = X A_stack^T`` ``[N, U r]``, masked to each token's own block,
  ``Y = H B_stack^T`` ``[N, out]``. Two large GEMMs, but every token meets every active
  adapter: ``N U r (in + out)`` MACs.
- *segment* (SGMV-like): tokens grouped by slot and padded to ``[U, L, in]``, two ``bmm``
  with one adapter per batch entry: ``U L r (in + out)`` MACs (``= N r (in + out)`` when
  the slots share the batch evenly), plus a gather of ``X`` and a select of ``Y``. Where
  the padded layout is a block of the batch (each active slot one run of ``L`` tokens, in
  slot order: the engine's decode step with rows shared evenly), it reads ``X`` and writes
  ``h + Y`` as views instead (``baddbmm``): 97-182 vs 110-205 us per module for 8 x 4 and
  32 x 1 tokens of hidden 1024 projections, best of 200, 2 threads. (The bank's segment
  *mode*, ``gather_budget`` exceeded, loops over slots in Python instead.)
- *per-token* (BGMV-like): gather each token's ``A``, ``B`` (``N r (in + out)`` elements
  copied) and run two ``bmm`` of matrix-vector products. Needs no stacked factors.

Stacked and segment read the active factors from a :class:`~.cache.DerivedCache`: ``A_stack``
``[U, r, in]`` and ``B_stack^T`` ``[U, r, out]``, contiguous, built (index_select + one
transpose copy) the first time a set of active slots is seen and reused while the set is
unchanged, which is every decode step between joins and leaves. A write or eviction of a
slot drops every set holding it (:meth:`LowRankBank.slot_changed`, called by the bank's
only writers, ``Bank.write`` / ``Bank.clear``); at most ``STACK_ENTRIES`` sets and the
bank's own element count are kept (worst case the bank's memory doubles). Ranks are
padded to the largest active rank: adapters of lower rank waste the difference (zero
rows), accepted.

Rule (:func:`choose_form`): the cheapest by estimated cost, in units of one stacked row
(``r (in + out)`` MACs of the large GEMMs): stacked ``N U``; segment ``(1.4 L + 8) U``
(a padded row costs ~1.4 stacked rows in ``bmm``; each slot adds a batch entry, dominant
when ``L`` is 1); per-token ``20 N`` (the gather writes ``N r (in + out)`` elements into
fresh memory). Fitted to ``python -m bench.decode_step --forms --counts 1,2,4,16,64
--reps 20``: hidden 1024 Llama-like, batch 64, r 16, fp32, 2 threads on a 2-core AMD EPYC
*shared with other jobs while measured*; best-of-20 microseconds per module, q_proj
``[1024 -> 1024]`` / gate_proj ``[1024 -> 2730]`` (their base GEMMs ~1000 / ~2700)::

    U   L  pick       stacked    (uncached)     segment    per-token
    1  64  stacked    152 /  225  182 /  255  140 /  202  2865 /  941
    2  32  segment    179 /  292  233 /  337  113 /  186  2794 /  918
    4  16  segment    218 /  415  269 /  488  109 /  171  2861 /  932
    16  4  segment    556 / 1159  745 / 1568  144 /  275  2890 / 1037
    64  1  segment   2099 / 4074 6518 / 6397  378 /  689  3016 / 1413
    9  56  stacked    329 /  758  444 /  923  394 /  749   305 /  879  (1 slot 56 tokens,
    32 33  per-token 1105 / 2134 1448 / 3113 1436 / 1971  2538 /  937   the others 1 each)

Per-token's time is bimodal on CPU (305 or ~2900 us on q_proj: whether glibc hands its
4 MB gathers fresh, page-faulting memory); so its weight is round and the form is picked
only at the extreme (``U > 20`` and ``U L >> N``). The whole decode step (4 layers, every
projection, best of 5, vs base) with each form forced agrees with the picks: 16 even
1.35 / 1.11 / 1.39 (stacked / segment / per-token), 64 even 2.36 / 1.26 / 1.49, 9 skewed
1.25 / 1.31 / 1.36, 32 skewed 1.68 / 1.62 / 1.44. ``--sweep --reps 10`` (1 / 4 / 16 / 64
adapters round-robin), run back to back: before (``2 U <= N``: uncached stacked, else
per-token) 1.06 / 1.15 / 1.53 / 2.06, after 1.09 / 1.10 / 1.13 / 1.21 (one adapter never
reaches gather mode: ``apply_slot`` either way, the difference is noise). One slot alone
never takes gather mode either, so the ``U = 1`` row is for reference.

Split (:meth:`LowRankBank.solo`, :func:`split_pays`): in a skewed batch every form over
all active slots pays for the large one (stacked multiplies every token by every adapter,
segment pads every slot to the longest). Slots holding one run of at least ``MIN_RUN``
tokens (the engine packs each slot's rows together) then run alone on their run as views
(``SOLO_ROW`` per token, ``SEGMENT_SLOT`` each) and the others share one form over their
own tokens (plus ``GATHER_ROW`` per token for gathering them), where that is estimated
cheaper; even runs in slot order keep the segment form's one batched GEMM pair. Paired in
one process (model forward through the pool, hidden 1024 x 8 layers, LoRA r16 on every
projection, split on vs off, 2026-12-01): 24 decode tokens of one slot beside 7 strays
0.952 / 0.956x, 16 beside 16 strays 0.98-0.99x, prefill runs of 256 / 512 / 128 tokens
0.976x; even runs (4 x 8, 2 x 16, 8 x 256) unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch

from tessera.adapters import ops
from tessera.adapters.banks.cache import StackedBank
from tessera.adapters.errors import PoolError
from tessera.adapters.method import Limits
from tessera.adapters.plan import MIN_RUN, Groups, Routing
from tessera.adapters.targets import TargetInfo

Form = Literal["stacked", "segment", "per-token"]

# Relative cost per row of r (in + out) MACs (see the module docstring for the fit).
STACKED_ROW = 1.0  # per (token, active slot) pair: two large GEMMs
SEGMENT_ROW = 1.4  # per padded (slot, position) row: bmm over U small matrices
SEGMENT_SLOT = 8.0  # per active slot: one bmm batch entry (dominant when L is 1)
PER_TOKEN_ROW = 20.0  # per token: copying its A and B (fresh memory), matrix-vector bmm
SOLO_ROW = 1.0  # per token of a slot run alone on its run of the batch (views, two GEMMs)
GATHER_ROW = 0.2  # per token of the other slots gathered beside it (x, h in; h out)


def form_costs(num_tokens: int, num_active: int, length: int) -> dict[Form, float]:
    """Estimated cost of each gather-mode form for ``num_tokens`` tokens over
    ``num_active`` slots whose largest group has ``length`` tokens."""
    return {"stacked": STACKED_ROW * num_tokens * num_active,
            "segment": (SEGMENT_ROW * length + SEGMENT_SLOT) * num_active,
            "per-token": PER_TOKEN_ROW * num_tokens}


def choose_form(num_tokens: int, num_active: int, length: int) -> Form:
    """The cheapest gather-mode form (ties: stacked, then segment)."""
    costs = form_costs(num_tokens, num_active, length)
    return min(costs, key=costs.__getitem__)


def split_pays(counts: list[int], solo: list[int]) -> bool:
    """Whether running the slots of token counts ``solo`` alone (each on its one run of
    the batch) and gathering the others (``counts``) beside them is estimated cheaper than
    one gather-mode form over all of them: a skewed batch (one tenant on 24 of 32 decode
    rows: every form over all 8 slots multiplies or pads to the large slot)."""
    every = [*counts, *solo]
    whole = min(form_costs(sum(every), len(every), max(every)).values())
    split = sum(SOLO_ROW * n + SEGMENT_SLOT for n in solo)
    if counts:
        split += (min(form_costs(sum(counts), len(counts), max(counts)).values())
                  + GATHER_ROW * sum(counts))
    return split < whole


class LowRankBank(StackedBank):
    kind = "lowrank"
    stage = "delta"
    fills = {"A": 0.0, "B": 0.0}
    rank_tensor = ("A", 0)
    factors_names = ("A", "B")

    @classmethod
    def shapes(cls, target: TargetInfo, limits: Limits) -> dict[str, tuple[int, ...]]:
        return {"A": (limits.max_rank, target.in_features),   # [r_max, in]
                "B": (target.out_features, limits.max_rank)}  # [out, r_max]

    # --- forms ----------------------------------------------------------------------------
    def factors(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``A`` ``[r, in]`` and ``B`` ``[out, r]`` of one slot, at its own rank (views)."""
        r = self.slot_rank[slot]
        return self.t["A"][slot, :r], self.t["B"][slot, :, :r]

    def apply_slot(self, slot: int, h: torch.Tensor, x: torch.Tensor,
                   weight: torch.Tensor) -> torch.Tensor:
        a, b = self.factors(slot)  # [r, in], [out, r]
        return torch.addmm(h, x @ a.t(), b.t())  # [n, out]

    def apply_span(self, slot: int, h: torch.Tensor, x: torch.Tensor,
                   weight: torch.Tensor) -> None:
        a, b = self.factors(slot)  # [r, in], [out, r]
        h.addmm_(x @ a.t(), b.t())  # [n, out], in place

    def solo(self, routing: Routing, active: list[int]) -> list[int]:
        """Slots holding one run of at least ``MIN_RUN`` tokens, where running them alone
        (views) and gathering the others pays (:func:`split_pays`); none on the Triton
        kernels (they take any layout in one launch)."""
        if self.backend == "triton":
            return []
        big = [s for s in active
               if len(routing.spans[s]) == 1 and routing.counts[s] >= MIN_RUN]
        rest = [routing.counts[s] for s in active if s not in big]
        if not rest and routing.block(active, routing.segment_length(active)) is not None:
            return []  # even runs in slot order: the segment form's one batched GEMM pair
        if big and split_pays(rest, [routing.counts[s] for s in big]):
            return big
        return []

    def gather_elements(self, routing: Routing, active: list[int]) -> int:
        """The Triton kernels gather nothing (they read the factors in place by slot id)."""
        return 0 if self.backend == "triton" else super().gather_elements(routing, active)

    def apply_tokens(self, routing: Routing, active: list[int], h: torch.Tensor,
                     x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Triton: one shrink and one expand kernel, factors in place; they have no backward,
        # so where autograd needs one through x or h the torch forms run instead
        if self.backend == "triton" and not (torch.is_grad_enabled()
                                             and (x.requires_grad or h.requires_grad)):
            return ops.lora("triton")(h, x, self.t["A"], self.t["B"], routing.groups(active),
                                      self.max_rank(active))
        form = choose_form(routing.num_tokens, len(active), routing.segment_length(active))
        if form == "stacked":
            return self.apply_stacked(routing, active, h, x)
        if form == "segment":
            return self.apply_segment(routing, active, h, x)
        return self.apply_per_token(routing, active, h, x)

    def apply_stacked(self, routing: Routing, active: list[int], h: torch.Tensor,
                      x: torch.Tensor, cached: bool = True) -> torch.Tensor:
        stack = self.stack(active, cached)
        u, r = stack.a.shape[0], stack.a.shape[1]
        _, onehot = routing.membership(active)  # [N, U]
        low = (x @ stack.a.view(u * r, -1).t()).view(-1, u, r)  # [N, U, r]: every token
        # against every active A. Keep each token's own slot block; masked_fill, not a
        # multiply: an overflow in another tenant's block (inf * 0 = NaN) must not reach
        # this token
        low = low.masked_fill(~onehot.unsqueeze(-1), 0.0)
        return torch.addmm(h, low.view(-1, u * r), stack.bt.view(u * r, -1))  # [N, out]

    def apply_segment(self, routing: Routing, active: list[int], h: torch.Tensor,
                      x: torch.Tensor, cached: bool = True) -> torch.Tensor:
        stack = self.stack(active, cached)
        seg = routing.segments(active)
        u = len(active)
        if seg.block is not None:  # the padded layout is tokens [start, stop): views
            start, stop = seg.block
            low = torch.bmm(x[start:stop].reshape(u, seg.length, -1),  # [U, L, r]
                            stack.a.transpose(1, 2))
            y = torch.baddbmm(h[start:stop].reshape(u, seg.length, -1), low,
                              stack.bt).view(stop - start, -1)  # [U L, out]: h + delta
            if stop - start == routing.num_tokens:
                return y  # [N, out]
            return torch.cat([h[:start], y, h[stop:]])  # [N, out]
        xp = x.index_select(0, seg.src).view(u, seg.length, -1)  # [U, L, in]
        low = torch.bmm(xp, stack.a.transpose(1, 2))  # [U, L, r]
        yp = torch.bmm(low, stack.bt).view(u * seg.length, -1)  # [U L, out]
        # only the real rows come back: a padding row (or another slot's) never reaches h
        delta = yp.index_select(0, seg.rows)  # [M, out]
        if seg.tokens is None:
            return h + delta  # [N, out]
        return h.index_add(0, seg.tokens, delta)  # [N, out]

    def apply_static(self, h: torch.Tensor, x: torch.Tensor, groups: Groups) -> torch.Tensor:
        """``h + B_s (A_s x)`` over ``groups`` of every slot, at the bank's padded rank:
        the Triton kernels, whose launch depends on the token count alone (a step a CUDA
        graph replays; :meth:`~tessera.adapters.plan.StepMeta.begin_static`)."""
        if self.backend != "triton":
            raise PoolError("a static step runs the Triton kernels (kernels='triton')")
        return ops.lora("triton")(h, x, self.t["A"], self.t["B"], groups,
                                  int(self.t["A"].shape[1]))

    def apply_per_token(self, routing: Routing, active: list[int], h: torch.Tensor,
                        x: torch.Tensor) -> torch.Tensor:
        return ops.lora("torch")(h, x, self.t["A"], self.t["B"], routing.groups(active),
                                 self.max_rank(active))

    def reference(self, routing: Routing, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Plain-torch reference of every form: one token at a time, ``h + B (A x)``."""
        out = h.clone()  # [N, out]
        for i, slot in enumerate(routing.slots.tolist()):
            if slot in self.occupied:
                r = self.slot_rank[slot]
                a = self.t["A"][slot, :r]  # [r, in]
                b = self.t["B"][slot, :, :r]  # [out, r]
                out[i] += b @ (a @ x[i])
        return out
