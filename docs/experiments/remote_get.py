"""Where does a remote get's time go? `kvtier bench remote` gives Mooncake gets at 0.80 of the store's own client on
an H100 (d690c54) and 0.55-0.76 on the 2-core CPU machine, whose reads alone take the client's time. This runs the
bench's rounds (a 4096-token prompt offered by one manager, found by another; the client moving the same objects)
for each store and each number of read calls a lookup makes (``READ_CHUNKS``), a store started afresh each time,
and times the parts of kvtier's ``find`` on its calling thread: the headers' checks, the payloads checked in
staging (those copied in part; all of them before 2026-12-06), the copies into the space's blocks (and the digests
of what landed, queued on a GPU), the rest (waiting for reads, allocating, publishing). Run where the stores
are installed: python docs/experiments/remote_get.py [--device cpu|cuda] [--stores mooncake,valkey] [--chunks 1,4]
(on the GPU machine Mooncake's wheel and libraries are carried: shared/notes/remote-stores.md)"""

import argparse
import statistics

import kvtier.remote
from kvtier import remote_intake
from kvtier.bench import remote
from kvtier.bench.stores import START
from kvtier.vmm import resolve_device
from timing import spent, timed

timed(remote_intake.obj, "check_header", "headers")
timed(remote_intake.obj, "payload_matches", "staged checks")
timed(remote_intake.Intake, "_copy", "copies")  # with the digests of what landed, queued after them on a GPU
timed(remote_intake.Intake, "finish", "finish")  # waits for those digests

parser = argparse.ArgumentParser()
parser.add_argument("--device", default="auto")
parser.add_argument("--stores", default="mooncake,valkey")
parser.add_argument("--chunks", default="1,4")
parser.add_argument("--rounds", type=int, default=7)
args = parser.parse_args()
dev = resolve_device(args.device)
tokens = 4096
rows = []
for backend in args.stores.split(","):
    for chunks in [int(c) for c in args.chunks.split(",")]:
        kvtier.remote.READ_CHUNKS = chunks
        size = 16 if dev.type == "cuda" else 4
        store = START[backend](**({"memory": f"{size}GB"} if backend == "mooncake" else {"maxmemory": f"{size}gb"}))
        try:
            spent.clear()
            mine, theirs, nbytes = remote.side_by_side(dev, store, tokens, args.rounds)
            parts = {k: sum(v) / (args.rounds + 1) for k, v in spent.items()}  # the warm-up round included
        finally:
            store.stop()
        gets = [g for _, g in mine]
        get, raw = statistics.median(gets), statistics.median(g for _, g in theirs)
        rows.append((backend, chunks, nbytes, get, raw, parts, gets))

print(f"\n{dev}: a {tokens}-token prompt, medians of {args.rounds} rounds; parts: means per find, warm-up included")
for backend, chunks, nbytes, get, raw, parts, gets in rows:
    rest = get - sum(parts.values())
    print(f"{backend:9s} read calls {chunks}: {nbytes / 2**20:.0f} MiB  find {get * 1e3:6.1f} ms  client "
          f"{raw * 1e3:6.1f} ms  ratio {raw / get:.3f}  | " + "  ".join(f"{k} {v * 1e3:.1f}" for k, v in parts.items())
          + f"  rest ~{rest * 1e3:.1f} ms  | finds {[round(g * 1e3) for g in gets]}")
