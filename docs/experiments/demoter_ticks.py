"""What the demoter's look every ``Demoter.PERIOD`` (20 ms) costs back-to-back allocations. Alloc + free of 1 / 16 / 64
blocks in the space of ``bench peers``, the least and the median of 15 rounds of 400 pairs, with the demoter as it is
and with one that looks only when poked (``PERIOD`` of 100 s; no pair pokes it), each in a process of its own, in
turns. Run: python docs/experiments/demoter_ticks.py [passes]"""

import subprocess
import sys

ONE = """
import sys
from timing import pair_rounds, peers_space
from kvtier.tiering.engine.background import Demoter
if sys.argv[1] == "poked only":
    Demoter.PERIOD = 100.0
with peers_space() as space:
    out = []
    for k in (1, 16, 64):
        pair_rounds(space, k, 1, 300)  # warm
        rounds = sorted(pair_rounds(space, k, 15, 400))
        out.append(f"{k}: {rounds[0]:.1f} / {rounds[7]:.1f}")
    print(f"{sys.argv[1]:>11}  least / median us, blocks " + "  ".join(out))
"""

for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 2):
    for mode in ("as it is", "poked only"):
        subprocess.run([sys.executable, "-c", ONE, mode], check=True, cwd=sys.path[0])
