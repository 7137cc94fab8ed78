"""Alloc + free of 1 / 16 / 64 blocks in the space of ``bench peers`` (Llama-3-8B shape, 4 x 8192 tokens): the
least of 27 rounds of 400 pairs (three passes of nine, each after a warm-up), on the CPU backend unless a GPU is
there. Compare commits by running it on each in turns. Run: python docs/experiments/alloc_pairs.py"""

from timing import pair_rounds, peers_space

with peers_space() as space:
    least: dict[int, float] = {}
    for _ in range(3):
        for k in (1, 16, 64):
            pair_rounds(space, k, 1, 200)  # warm
            least[k] = min([least.get(k, float("inf"))] + pair_rounds(space, k, 9, 400))
    print(" ".join(f"{k} block(s): {us:.1f} us" for k, us in least.items()))
