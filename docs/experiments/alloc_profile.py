"""Where does an alloc + free of a few blocks go? The space of ``bench peers`` (a Llama-3-8B shape, 4 x 8192 tokens),
alloc + free of 1 / 16 / 64 blocks timed (the least and the median of seven rounds of 500 pairs), then 2000 pairs of
``sys.argv[2]`` blocks (default 1) under cProfile, sorted by ``sys.argv[1]`` (default ``tottime``).
Run on a GPU machine (or the CPU backend anywhere):
python docs/experiments/alloc_profile.py [tottime|cumulative] [blocks]"""

import cProfile
import io
import pstats
import sys

from timing import pair_rounds, peers_space

BLOCKS = int(sys.argv[2]) if len(sys.argv) > 2 else 1

with peers_space() as space:
    for k in (1, 16, 64):
        pair_rounds(space, k, 1, 300)  # warm
        rounds = pair_rounds(space, k, 7, 500)
        print(f"k={k}: min {min(rounds):.1f} median {sorted(rounds)[3]:.1f} us per pair")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(2000):
        space.allocate("k", 16 * BLOCKS)
        space.free("k")
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats(sys.argv[1] if len(sys.argv) > 1 else "tottime").print_stats(40)
    print(out.getvalue())
    print(space.stats())
