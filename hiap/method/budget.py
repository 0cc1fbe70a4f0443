"""Landing the decided MACs on a target-mode budget: the controller's landing step and the settling guard.

Both act on the gate logits only, never on weights, and are pure functions of the logits, so every DDP rank, a resumed
run and ``hiap extract`` reach the same result.

* :func:`land_on_budget` is the last part of the search (``HiAPConfig.landing``): on its checks it closes the open
  micro gates with the lowest logits (or, below the target, opens the closed ones with the highest) until the decided
  MACs lie within half the tolerance of the target. The search then goes on training with that structure, so the
  network the run fixes is the one it trained.
* :func:`settle_budget` is the guard at the structure fix (and after a run that never fixed it): a no-op when the
  decided MACs are within ``TOLERANCE`` of the target, else a deterministic walk of the micro logits along the
  expected-cost gradient.
"""

from __future__ import annotations

import torch

from hiap.method.convert import HiAPViT
from hiap.method.cost import MacBudget, StackedGates

# How far the decided MACs of a target-mode run may end from its target (a fraction of it).
TOLERANCE = 0.01
# Where landing puts a logit it closes (or opens): just across the decision boundary, so the gate's keep probability
# barely changes; the gates' learning rate is near zero by then.
LANDING_MARGIN = 0.05

__all__ = ["LANDING_MARGIN", "TOLERANCE", "land_on_budget", "resolved_target", "settle_budget"]


def resolved_target(cfg, cost: MacBudget) -> float:
    """The target as a fraction of the dense cost: ``cfg.target``, or ``cfg.target_ms`` over the dense latency."""
    if cfg.target_ms is not None:
        return cfg.target_ms / cost.dense
    return cfg.target


class _Landing:
    """The decided cost of a model's stacked logits (a host copy) under changes of single gates, with the decision's
    counting: a row of micro gates keeps ``max(#open, minimum)``, a layer its open heads or at least its
    ``min_heads`` best, a head its q/k dims only while one of its v dims is kept. ``cost`` prices a layer from its
    kept counts (``MacBudget``, or a latency table's ``LatencyBudget``)."""

    def __init__(self, gated: HiAPViT, cost: MacBudget):
        stacked = StackedGates.of(gated)
        self.layout = layout = stacked.layout
        self.cost = cost
        self.flat = stacked.flat.detach().to("cpu", torch.float64)  # the one device read
        L, H = layout.layers, layout.heads
        self.head, self.qk, self.v, self.block, self.neuron = layout.split(torch.arange(self.flat.numel()))
        # Which layer (and head) every gate belongs to.
        self.owner: dict[int, tuple[str, int, int]] = {}
        for l in range(L):
            for h in range(H):
                self.owner[int(self.head[l, h])] = ("head", l, h)
                self.owner.update({int(p): ("qk", l, h) for p in self.qk[l, h]})
                self.owner.update({int(p): ("v", l, h) for p in self.v[l, h]})
            self.owner[int(self.block[l, 0])] = ("block", l, 0)
            self.owner.update({int(p): ("neuron", l, 0) for p in self.neuron[l]})
        self.attention = [self.attention_cost(l) for l in range(L)]
        self.ffn = [self.ffn_cost(l) for l in range(L)]
        self.total = cost.static + sum(self.attention) + sum(self.ffn)

    def _count(self, index: torch.Tensor, minimum: int) -> int:
        return max(int((self.flat[index] > 0).sum()), min(minimum, index.numel()))

    def heads_kept(self, l: int) -> list[bool]:
        logits = self.flat[self.head[l]]
        rank = torch.argsort(torch.argsort(logits, descending=True, stable=True))
        return ((logits > 0) | (rank < self.layout.min_heads)).tolist()

    def attention_cost(self, l: int) -> float:
        heads = qk_dims = v_dims = 0
        for h, kept in enumerate(self.heads_kept(l)):
            v_count = self._count(self.v[l, h], self.layout.dims_min) if kept else 0
            if v_count:
                heads += 1
                v_dims += v_count * self.layout.head_group
                qk_dims += self._count(self.qk[l, h], self.layout.dims_min) * self.layout.head_group
        return self.cost.attention(heads, qk_dims, v_dims)

    def ffn_cost(self, l: int) -> float:
        if self.flat[self.block[l, 0]] <= 0:
            return self.cost.ffn(0)
        return self.cost.ffn(self._count(self.neuron[l], self.layout.neurons_min) * self.layout.neuron_group)

    def live(self, position: int) -> bool:
        """A macro gate, or a micro gate whose head or FFN block is kept (only those change the MACs)."""
        kind, l, h = self.owner[position]
        if kind in ("qk", "v"):
            return self.heads_kept(l)[h]
        return kind != "neuron" or bool(self.flat[self.block[l, 0]] > 0)

    def change(self, position: int, value: float) -> float:
        """Set one logit; returns the change of the decided MACs."""
        kind, l, _ = self.owner[position]
        self.flat[position] = value
        if kind in ("head", "qk", "v"):
            cost, self.attention[l] = self.attention[l], self.attention_cost(l)
            delta = self.attention[l] - cost
        else:
            cost, self.ffn[l] = self.ffn[l], self.ffn_cost(l)
            delta = self.ffn[l] - cost
        self.total += delta
        return delta

    def trial(self, position: int, value: float) -> float:
        """The change of the decided MACs were one logit set to ``value`` (nothing changes)."""
        old = float(self.flat[position])
        delta = self.change(position, value)
        self.change(position, old)
        return delta

    def moved(self, position: int, close: bool, margin: float) -> float:
        """The logit a gate gets when landing closes (``min(a, -margin)``) or opens (``max(a, margin)``) it."""
        value = float(self.flat[position])
        return min(value, -margin) if close else max(value, margin)


def _walk(state: _Landing, positions: list[int], close: bool, low: float, high: float, margin: float) -> None:
    """Close (or open) the gates of ``positions`` in their order while the MACs are above ``high`` (below ``low``),
    passing over a gate whose change would leave the band on the other side."""
    for position in positions:
        if (state.total <= high) if close else (state.total >= low):
            break
        if (state.flat[position] > 0) != close:
            continue
        value = state.moved(position, close, margin)
        delta = state.trial(position, value)
        if (delta < 0 and state.total + delta >= low) if close else (delta > 0 and state.total + delta <= high):
            state.change(position, value)


def _land(state: _Landing, positions: list[int], goal: float, low: float, high: float, margin: float) -> None:
    """One landing pass over ``positions``: the walk in logit order, and where only coarse units are left, one more
    gate across the band followed by a walk back with the finest, keeping the closer end."""
    close = state.total > high
    if not (close or state.total < low):
        return
    ascending = sorted(positions, key=lambda p: (float(state.flat[p]), p))
    first, back = (ascending, ascending[::-1]) if close else (ascending[::-1], ascending)
    _walk(state, first, close, low, high, margin)
    if not ((state.total > high) if close else (state.total < low)):
        return
    kept = (state.total, state.flat.clone(), list(state.attention), list(state.ffn))
    for position in first:
        if (state.flat[position] > 0) == close and state.trial(position, state.moved(position, close, margin)) != 0:
            state.change(position, state.moved(position, close, margin))
            _walk(state, back, not close, low, high, margin)
            break
    if abs(state.total - goal) >= abs(kept[0] - goal):
        state.total, state.flat, state.attention, state.ffn = kept


@torch.no_grad()
def land_on_budget(gated: HiAPViT, target: float, tolerance: float = TOLERANCE, margin: float = LANDING_MARGIN,
                   cost: MacBudget | None = None) -> dict:
    """Close (or open) gates in logit order until the decided cost lies within ``tolerance / 2`` of ``target`` (a
    fraction of the dense cost: MACs, or with ``cost`` a latency table's milliseconds).

    Above the band, the open q/k, v and neuron groups of kept heads and FFN blocks are closed from the lowest logit up
    (their logit set to ``min(a, -margin)``); a gate whose closing would drop the MACs below the band is passed over
    for the next. Below the band, the closed ones are opened from the highest logit down (to ``max(a, margin)``).
    Gates the hard minimums keep anyway change nothing and are passed over. Where only coarse units are left, the
    next one in logit order crosses the band and the finest are walked back; the closer end is kept. Heads and FFN
    blocks (the macro gates) move only when their micro gates cannot reach the band, in the same order, before one
    more micro pass.

    One device read of the logits and, when anything changes, one write of them. Returns
    ``{"before", "after", "closed", "opened"}``: MAC fractions of dense and how many gates changed side.
    """
    cost = MacBudget(gated) if cost is None else cost
    dense = cost.dense
    state = _Landing(gated, cost)
    goal = target * dense
    low, high = goal * (1 - tolerance / 2), goal * (1 + tolerance / 2)
    before_total, before_flat = state.total, state.flat.clone()
    micro = [p for p, (kind, _, _) in state.owner.items() if kind in ("qk", "v", "neuron")]
    macro = [p for p, (kind, _, _) in state.owner.items() if kind in ("head", "block")]
    _land(state, [p for p in micro if state.live(p)], goal, low, high, margin)
    if not low <= state.total <= high:
        _land(state, macro, goal, low, high, margin)
        _land(state, [p for p in micro if state.live(p)], goal, low, high, margin)
    changed = (state.flat > 0) != (before_flat > 0)
    closed = int((changed & (before_flat > 0)).sum())
    opened = int((changed & (before_flat <= 0)).sum())
    if closed or opened:
        _write_logits(gated, state)
    return {"before": before_total / dense, "after": state.total / dense, "closed": closed, "opened": opened}


def _write_logits(gated: HiAPViT, state: _Landing) -> None:
    """Copy the landed logits back into every layer's parameters."""
    landed = state.layout.split(state.flat)
    for index, (attn, ffn) in enumerate(zip(gated.attention_layers(), gated.ffn_layers())):
        for logit, kind in zip((attn.gates.head, attn.gates.qk, attn.gates.v, ffn.gates.block, ffn.gates.neuron),
                               landed):
            logit.copy_(kind[index].to(device=logit.device, dtype=logit.dtype))


def settle_budget(gated: HiAPViT, tolerance: float = TOLERANCE, step_size: float = 0.01, max_steps: int = 5000,
                  patience: int = 500, cost: MacBudget | None = None) -> dict | None:
    """Move the decided cost of a target-mode run (MACs, or with ``cost`` a latency table's milliseconds) within
    ``tolerance`` of the target; a no-op when it is.

    The guard after the search: the landing phase normally leaves nothing to do. This deterministic walk moves only
    the micro logits (q/k dims, v dims, neurons) along the expected-cost gradient, scaled so the fastest moves
    ``step_size`` per step, in the direction that closes the gap, until the decided MACs are within half the
    tolerance, or within the tolerance once they have crossed the target (single units can be too coarse for the
    half). The units that move the most are those closest to zero in the costliest positions, i.e. the least decided
    ones; the weights are left as trained. Where no step reaches the tolerance (it gives up after ``patience`` steps
    without getting closer), the logits closest to the target are kept.

    Returns ``{"steps", "before", "after"}`` (MAC fractions of dense), or None outside target mode.
    """
    cfg = gated.cfg
    if not cfg.lands_on_target:
        return None
    cost = MacBudget(gated) if cost is None else cost
    target = resolved_target(cfg, cost)
    before = cost.fraction(gated)
    fraction, steps = before, 0

    def error(value: float) -> float:
        return abs(value / target - 1)

    if error(fraction) <= tolerance:
        return {"steps": 0, "before": before, "after": fraction}
    micro = gated.micro_gate_logits()
    best = (error(fraction), [logit.detach().clone() for logit in micro], fraction, steps)
    first_side = fraction > target
    while error(fraction) > tolerance / 2 and steps < max_steps and steps - best[3] < patience:
        if (fraction > target) != first_side and error(fraction) <= tolerance:
            break
        grads = torch.autograd.grad(cost.expected(gated, StackedGates.of(gated)).total, micro)
        scale = max(float(g.abs().max()) for g in grads)
        if scale == 0.0:
            break
        direction = 1.0 if fraction > target else -1.0
        with torch.no_grad():
            for logit, grad in zip(micro, grads):
                logit.sub_(direction * step_size * grad.to(logit.dtype) / scale)
        steps += 1
        fraction = cost.fraction(gated)
        if error(fraction) < best[0]:
            best = (error(fraction), [logit.detach().clone() for logit in micro], fraction, steps)
    if error(fraction) > tolerance and best[0] <= error(fraction):  # the closest point, the start if nothing helped
        with torch.no_grad():
            for logit, kept in zip(micro, best[1]):
                logit.copy_(kept)
        fraction, steps = best[2], best[3]
    return {"steps": steps, "before": before, "after": fraction}
