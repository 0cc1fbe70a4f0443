"""Token schedules: what each block does to the tokens after its attention (keep, prune, merge or ToMe-merge).

A schedule is one ``LayerStep`` per block. The tokens every layer sees follow from it and the model's token count,
so they are fixed before the first forward: a reduced model has a static shape per layer (it compiles, and a CUDA
graph can capture it), and ``count_macs`` counts every layer at the tokens it actually sees.

Text form (the CLI's ``--tokens``):

    rapid:r=16                 RAPID: prune 16 tokens per block in the first half, merge 16 in the second half
    rapid:r=16,switch=0.33     ... turning from pruning to merging at a third of the depth
    rapid:r=16,weight=1        ... with the class token's attention in the prune score (default 0: redundancy alone)
    rapid:r=16,pool=1          ... merging the 16 least attended tokens (default 1.5: the 16 of the 24 least
                               attended that are closest to a partner)
    rapid:keep=0.6             ... with r chosen so the blocks see ~60 % of the dense token-layer work
    tome:r=8 / tome:keep=0.6   ToMe: bipartite soft matching, r tokens per block
    rapid / tome               the same with keep=0.6, the default amount
    p16,p16,m16,t8,-,...       explicit, one entry per block: p = prune, m = merge, t = ToMe, - = nothing
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

KINDS = ("keep", "prune", "merge", "tome")
# RAPID's merge steps choose among this many times r of the least attended tokens (hiap.tokens.reduce).
DEFAULT_MERGE_POOL = 1.5
# The amount of ``rapid`` and ``tome`` given alone: the blocks see about this share of the dense token-layer work.
DEFAULT_KEEP = 0.6
_LETTERS = {"-": "keep", "p": "prune", "m": "merge", "t": "tome"}


@dataclass(frozen=True)
class LayerStep:
    """What one block does after its attention: ``kind`` in ``KINDS``, removing ``r`` patch tokens (0 for keep)."""

    kind: str
    r: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown token step {self.kind!r}; use one of {', '.join(KINDS)}")
        if not isinstance(self.r, int) or self.r < 0:
            raise ValueError(f"a token step removes r >= 0 tokens, got {self.r!r}")
        if self.kind == "keep" and self.r:
            raise ValueError("a 'keep' step removes no tokens")

    @property
    def removes(self) -> int:
        return 0 if self.kind == "keep" else self.r


@dataclass(frozen=True)
class TokenSchedule:
    """One ``LayerStep`` per block, plus RAPID's knobs (see ``hiap.tokens.reduce``): the prune metric's importance
    weight (0, the default, prunes by redundancy alone) and the merge steps' candidate pool (how many times r of the
    least attended tokens compete to be merged)."""

    steps: tuple[LayerStep, ...]
    importance_weight: float = 0.0
    merge_pool: float = DEFAULT_MERGE_POOL

    def __post_init__(self):
        if not isinstance(self.steps, (list, tuple)) or not all(isinstance(step, LayerStep) for step in self.steps):
            raise TypeError(f"TokenSchedule: steps must be a tuple of LayerStep (one per block; a text form goes "
                            f"through parse_schedule), got {type(self.steps).__name__}")
        object.__setattr__(self, "steps", tuple(self.steps))
        if not math.isfinite(self.importance_weight) or self.importance_weight < 0:
            raise ValueError(f"importance_weight must be finite and >= 0, got {self.importance_weight}")
        if not math.isfinite(self.merge_pool) or self.merge_pool < 1:
            raise ValueError(f"merge_pool must be finite and >= 1, got {self.merge_pool}")

    def reads_class_attention(self, step: LayerStep) -> bool:
        """Whether ``step`` needs the class token's attention: merges always, prunes only with an importance weight."""
        return step.removes > 0 and (step.kind == "merge" or (step.kind == "prune" and self.importance_weight > 0))

    @property
    def removes_nothing(self) -> bool:
        return all(step.removes == 0 for step in self.steps)

    def token_counts(self, patches: int, prefix: int) -> list[tuple[int, int]]:
        """``(tokens in, tokens out)`` of every block for ``patches`` patch tokens after ``prefix`` class/register
        tokens; raises ValueError naming the first block whose step removes more than it can."""
        counts = []
        for index, step in enumerate(self.steps):
            limit = patches // 2 if step.kind == "tome" else patches - 1
            if step.removes > limit:
                what = "half its patch tokens (ToMe's bipartite limit)" if step.kind == "tome" else \
                    "all but one of its patch tokens"
                raise ValueError(f"token schedule: block {index} would {step.kind} {step.removes} tokens but has "
                                 f"{patches} patch tokens; at most {what} can go")
            counts.append((patches + prefix, patches - step.removes + prefix))
            patches -= step.removes
        return counts

    def work_fraction(self, patches: int, prefix: int) -> float:
        """Token-layer work relative to no reduction: the mean over blocks of the tokens attention and FFN see."""
        counts = self.token_counts(patches, prefix)
        dense = patches + prefix
        return sum(n_in + n_out for n_in, n_out in counts) / (2 * dense * len(counts))

    def describe(self) -> str:
        letters = {v: k for k, v in _LETTERS.items()}
        return ",".join("-" if s.kind == "keep" else f"{letters[s.kind]}{s.r}" for s in self.steps)


def rapid_schedule(depth: int, r: int, switch: float = 0.5, importance_weight: float = 0.0,
                   merge_pool: float = DEFAULT_MERGE_POOL) -> TokenSchedule:
    """RAPID: prune ``r`` tokens in each block before ``switch * depth``, merge ``r`` in each block from there on."""
    if not 0.0 <= switch <= 1.0:
        raise ValueError(f"switch must lie in [0, 1], got {switch}")
    first_merge = round(switch * depth)
    steps = tuple(LayerStep("prune" if index < first_merge else "merge", r) if r else LayerStep("keep")
                  for index in range(depth))
    return TokenSchedule(steps, importance_weight, merge_pool)


def tome_schedule(depth: int, r: int) -> TokenSchedule:
    """ToMe: ``r`` tokens merged by bipartite soft matching in every block."""
    return TokenSchedule(tuple(LayerStep("tome", r) if r else LayerStep("keep") for _ in range(depth)))


def _r_for_work(build, depth: int, patches: int, prefix: int, keep: float) -> int:
    """The smallest r whose schedule keeps at most ``keep`` of the token-layer work (r = 0 when keep >= 1)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must lie in (0, 1], got {keep}")
    for r in range(patches):
        schedule = build(r)
        try:
            if schedule.work_fraction(patches, prefix) <= keep + 1e-9:
                return r
        except ValueError:
            break
    raise ValueError(f"no schedule of this kind keeps only {keep:.2f} of the token work with {patches} patches "
                     f"and depth {depth}")


def parse_schedule(spec: str, depth: int, patches: int, prefix: int) -> TokenSchedule:
    """A ``TokenSchedule`` from its text form (module docstring) for a model of ``depth`` blocks; raises ValueError
    with a one-line message for anything malformed or impossible for this model."""
    spec = spec.strip()
    if not spec:
        raise ValueError("empty token schedule")
    head, _, rest = spec.partition(":")
    if head in ("rapid", "tome"):
        options: dict[str, str] = {}
        for item in filter(None, rest.split(",")):
            key, equals, value = item.partition("=")
            if not equals:
                raise ValueError(f"token schedule {spec!r}: expected key=value, got {item!r}")
            options[key.strip()] = value.strip()
        allowed = {"r", "keep", "switch", "weight", "pool"} if head == "rapid" else {"r", "keep"}
        unknown = set(options) - allowed
        if unknown:
            raise ValueError(f"token schedule {spec!r}: unknown option(s) {sorted(unknown)}; {head} takes "
                             f"{', '.join(sorted(allowed))}")
        if "r" in options and "keep" in options:
            raise ValueError(f"token schedule {spec!r}: give one of r= and keep=, not both")
        if "r" not in options and "keep" not in options:
            options["keep"] = str(DEFAULT_KEEP)
        try:
            switch = float(options.get("switch", 0.5))
            weight = float(options.get("weight", 0.0))
            pool = float(options.get("pool", DEFAULT_MERGE_POOL))
            r_value = int(options["r"]) if "r" in options else None
            keep = float(options["keep"]) if "keep" in options else None
        except ValueError as error:
            raise ValueError(f"token schedule {spec!r}: {error}") from None
        if head == "rapid":
            def build(r):
                return rapid_schedule(depth, r, switch, weight, pool)
        else:
            def build(r):
                return tome_schedule(depth, r)
        if r_value is None:
            r_value = _r_for_work(build, depth, patches, prefix, keep)
        if r_value < 0:
            raise ValueError(f"token schedule {spec!r}: r must be >= 0")
        schedule = build(r_value)
    else:
        entries = [entry.strip() for entry in spec.split(",")]
        if len(entries) != depth:
            raise ValueError(f"token schedule {spec!r} has {len(entries)} entries but the model has {depth} blocks")
        steps = []
        for entry in entries:
            if entry in ("-", "0"):
                steps.append(LayerStep("keep"))
                continue
            kind = _LETTERS.get(entry[:1])
            if kind is None or kind == "keep" or not entry[1:].isdigit():
                raise ValueError(f"token schedule entry {entry!r}: use p<r>, m<r>, t<r> or -")
            steps.append(LayerStep(kind, int(entry[1:])) if int(entry[1:]) else LayerStep("keep"))
        schedule = TokenSchedule(tuple(steps))
    schedule.token_counts(patches, prefix)  # refuses impossible removals now, in one line
    return schedule


def as_schedule(schedule: TokenSchedule | Sequence[LayerStep] | str, depth: int, patches: int,
                prefix: int) -> TokenSchedule:
    """Accept a schedule, a list of steps or a text form; check it against the model's depth and tokens."""
    if isinstance(schedule, str):
        return parse_schedule(schedule, depth, patches, prefix)
    if not isinstance(schedule, TokenSchedule):
        if not isinstance(schedule, (list, tuple)) or not all(isinstance(step, LayerStep) for step in schedule):
            raise TypeError(f"schedule must be a TokenSchedule, a list of LayerStep or a text form such as "
                            f"'rapid:r=8', got {type(schedule).__name__}")
        schedule = TokenSchedule(tuple(schedule))
    if len(schedule.steps) != depth:
        raise ValueError(f"token schedule has {len(schedule.steps)} steps but the model has {depth} blocks")
    schedule.token_counts(patches, prefix)
    return schedule
