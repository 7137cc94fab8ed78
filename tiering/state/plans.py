"""Demotion plans: which pages go down, where, and with which room below -- worked out with no side effect.

A plan is made against the books under the manager's lock and committed in the same critical section
(``Tiering.start_demotion``), so the books it counted on cannot change in between. A plan that cannot be
carried out whole is cut short or refused before anything moves: the caller sees ``gpu_handles`` and decides.

Room below a GPU page counts a tier's free slots by size (``FreePieces``: a page takes one slot per region, as
large as its live bytes need) plus the slots of kept copies (``PageTable.copies``) of pages outside the plan, which
may be dropped to make room (a copy is a cache). A page of the plan that keeps a copy in the tier it goes to moves
*clean*: its copy becomes its home and nothing is copied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from kvtier.policies import Candidate, PageRef
from kvtier.tiering.interfaces import TieredSpace
from kvtier.tiering.state.slots import FreePieces
from kvtier.tiering.state.tier import LowerTier, Tier, TierStack


@dataclass(frozen=True)
class PlannedMove:
    space: TieredSpace
    page: int
    src: int  # Tier.GPU or a lower tier's id
    dst: int
    clean: bool  # the page's kept copy in ``dst`` becomes its home: nothing to copy
    nbytes: int = 0  # bytes per region the page holds: what each of its slots below must hold


@dataclass
class DemotionPlan:
    moves: list[PlannedMove] = field(default_factory=list)

    @property
    def gpu_handles(self) -> int:
        """GPU handles the plan gives back to the pool once its moves commit."""
        return sum(m.space.num_regions for m in self.moves if m.src == Tier.GPU)

    def cut(self, handles_needed: int) -> "DemotionPlan":
        """The shortest prefix that frees ``handles_needed`` GPU handles (all of it if it cannot). Room below is
        counted in order, so any prefix is a valid plan."""
        moves, freed = [], 0
        for m in self.moves:
            if freed >= handles_needed:
                break
            moves.append(m)
            freed += m.space.num_regions if m.src == Tier.GPU else 0
        return DemotionPlan(moves)

    def by_space(self) -> dict[str, tuple[TieredSpace, list[PlannedMove]]]:
        out: dict[str, tuple[TieredSpace, list[PlannedMove]]] = {}
        for m in self.moves:
            out.setdefault(m.space.name, (m.space, []))[1].append(m)
        return out


def slot_size(tier: LowerTier, nbytes: int) -> int:
    """The size (units) of the slots of ``tier`` that hold ``nbytes`` of a region each."""
    return tier.books.units_for(nbytes, tier.slot_size)


def room_below(spaces: Iterable[TieredSpace], free: Mapping[int, FreePieces], exclude: set[tuple[str, int]],
               stack: TierStack) -> dict[int, FreePieces]:
    """Slots each lower tier can give: free ones plus kept copies of pages not in ``exclude``."""
    room = {t: f.copy() for t, f in free.items()}
    for s in spaces:
        for p, (tier, slots) in s.pages.copies.items():
            if (s.name, p) not in exclude:  # slot by slot: a restored page's may differ
                books = stack[tier].books
                for slot in slots:
                    room[tier].give(books.size(slot))
    return room


def plan_demotion(picks: list[tuple[TieredSpace, int]], dst: int | None, policy: Any,
                  spaces: Iterable[TieredSpace], free: Mapping[int, FreePieces], stack: TierStack,
                  nbytes: Callable[[TieredSpace, int], int],
                  reachable: Callable[[int, int], bool] = lambda src, dst: True) -> DemotionPlan:
    """Plan moving each ``(space, page)`` of ``picks`` down, in order. With ``dst``: there, or -- for a GPU page
    when ``dst`` has no room or no route -- the nearest tier below it that has (a page already below ``dst``'s
    level, or at it, stays). Without: where ``policy.place`` says among the tiers below the page that
    ``reachable`` (a route exists) -- each candidate with its room -- or nowhere (it stays). Pages that find no
    room stay. ``nbytes(space, page)``: the bytes per region a page holds. No side effects."""
    planned = {(s.name, p) for s, p in picks}
    room = room_below(spaces, free, planned, stack)
    plan = DemotionPlan()
    for space, p in picks:
        R, table = space.num_regions, space.pages
        src, copy = table.tier_of(p), table.copies.get(p)
        below = [t for t in stack.below(src) if reachable(src, t)]
        held = nbytes(space, p)
        size = {t: slot_size(stack[t], held) for t in below}

        def fits(t: int) -> bool:
            return room[t].can_take(R, size[t]) or (copy is not None and copy[0] == t)
        if dst is None:
            name = policy.place(PageRef(space.name, p), stack.label(src),
                                [Candidate(stack[t].name, room[t].fits(size[t]) // R, fits(t)) for t in below])
            want = stack.named(name) if name is not None else None
        elif src == Tier.GPU:  # there, or the nearest tier below it with room (a tier with no route has none)
            spill = [t for t in below if t >= dst and fits(t)]
            want = spill[0] if spill else dst if dst in below else None
        else:
            want = dst if dst in below else None
        if want is None or want == src or want not in below:
            continue
        if copy is not None and copy[0] == want:
            plan.moves.append(PlannedMove(space, p, src, want, clean=True, nbytes=held))
            continue
        if copy is not None:  # going elsewhere: its copy is dropped, and its slots are room
            for slot in copy[1]:
                room[copy[0]].give(stack[copy[0]].books.size(slot))
        if not room[want].can_take(R, size[want]):
            continue  # no room below: the page stays
        room[want].take(R, size[want])
        plan.moves.append(PlannedMove(space, p, src, want, clean=False, nbytes=held))
    return plan
