"""Could copies down run as kernels instead of on the copy engine? A mapping's set-access waits for device-to-host
copies in flight but not for kernels (map_during_copies.py), so the gate that keeps copies down from starting
while a promotion maps its pages (both directions at once: 1.34x one way with it, H100 at 256a039) would not be
needed for bytes a kernel stores into pinned host memory through its device address. This times 4 GiB going down
in 8 MiB pieces both ways -- the copy engine (cuMemcpyAsync) and a torch copy kernel into a device view of the
pinned memory (one launch per piece, and one per run of 8 pieces as a strided view) -- alone, together with
4 GiB coming up on the copy engine, and how long mapping 128 handles takes meanwhile; then checks the bytes.
Run on a GPU machine: python docs/experiments/kernel_down.py"""

import statistics
import time

import torch

import kvtier
from kvtier.vmm.cuda import device_address
from kvtier.vmm.tensor import tensor_over

MiB = 1 << 20
PIECE, N = 8 * MiB, 512  # 4 GiB
dev = torch.device("cuda", 0)
src = torch.randint(0, 255, (N * PIECE,), dtype=torch.uint8, device=dev)
back = torch.empty(N * PIECE, dtype=torch.uint8, device=dev)
host = torch.empty(N * PIECE, dtype=torch.uint8, pin_memory=True)
host_up = torch.empty(N * PIECE, dtype=torch.uint8, pin_memory=True)
address = device_address(host.data_ptr())
assert address is not None, "no device address for pinned memory"
host_dev = tensor_over(address, N * PIECE, dev)  # the pinned bytes as a CUDA tensor: a kernel's stores cross PCIe
down, up = torch.cuda.Stream(dev), torch.cuda.Stream(dev)


def engine_down() -> None:
    with torch.cuda.stream(down):
        for i in range(N):
            host[i * PIECE:(i + 1) * PIECE].copy_(src[i * PIECE:(i + 1) * PIECE], non_blocking=True)


def kernel_down(run: int = 1) -> None:
    with torch.cuda.stream(down):
        for i in range(0, N, run):
            host_dev[i * PIECE:(i + run) * PIECE].copy_(src[i * PIECE:(i + run) * PIECE])


def engine_up() -> None:
    with torch.cuda.stream(up):
        for i in range(N):
            back[i * PIECE:(i + 1) * PIECE].copy_(host_up[i * PIECE:(i + 1) * PIECE], non_blocking=True)


def timed(*fns) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def median(*fns, rounds: int = 5) -> float:
    return statistics.median(timed(*fns) for _ in range(rounds))


gb = N * PIECE / 1e9
rows = {
    "copy engine down": median(engine_down),
    "kernel down, a launch a piece": median(kernel_down),
    "kernel down, a launch per 8 pieces": median(lambda: kernel_down(8)),
    "copy engine up": median(engine_up),
    "both, copy engines": median(engine_down, engine_up),
    "both, kernel down + copy engine up": median(kernel_down, engine_up),
    "both, kernel down (8) + copy engine up": median(lambda: kernel_down(8), engine_up),
}
one = rows["copy engine down"]
for name, seconds in rows.items():
    print(f"{name:40s} {seconds * 1e3:7.1f} ms  {gb * (2 if name.startswith('both') else 1) / seconds:5.1f} GB/s  "
          f"{one / seconds * (2 if name.startswith('both') else 1):.2f}x one way (copy engine)", flush=True)
host_dev.zero_()
kernel_down(8)
torch.cuda.synchronize()
print("bytes equal after the kernel copy:", torch.equal(host, src.cpu()))
host_dev.zero_()

# mapping 128 handles while 4 GiB goes down each way
with kvtier.TierManager(kvtier.Config(pool_budget=4 << 30, pool_ready=2 << 30, background_demotion=False)) as m:
    be, P = m.backend, m.page_size
    handles = m.pool.take(128)
    base = be.reserve(128 * P, P)
    for name, fn in (("idle", lambda: None), ("copy engine down", engine_down), ("kernel down", lambda: kernel_down(8)),
                     ("idle", lambda: None)):
        torch.cuda.synchronize()
        fn()
        start = time.perf_counter()
        for i, h in enumerate(handles):
            be.map(base + i * P, P, [h])
        mapped = time.perf_counter() - start
        torch.cuda.synchronize()
        be.unmap(base, 128 * P)
        print(f"map 128 handles while {name:18s}: {mapped * 1e3:6.1f} ms ({mapped / 128 * 1e6:.0f} us a handle)")
    be.free_reservation(base, 128 * P)
    m.pool.give(handles)
