"""Read bandwidth of the group matmul kernel on one input row, against a plain torch sum over 256 MB, in one process.

    python benchmarks/group_kernel_bandwidth.py --threads 2

Streams --layers copies of an (--out x --in) layer (Qwen2.5-Coder-1.5B's FFN shape by default: more bytes in all than
a CPU's caches hold) through `Int4Linear` and `Int8GroupLinear` one row at a time, --rounds rounds, and prints the
median GB/s of each (bytes of codes, scales and minimums read per second) next to the sum's.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from leapdecode.runtime.quantized import GroupLinear, Int4Linear, Int8GroupLinear


def layer_bytes(module: GroupLinear) -> int:
    return sum(t.numel() * t.element_size()
               for t in (module.codes, module.scale, module.minimum, module.scale_unit, module.minimum_unit))


def gb_per_s(step, total_bytes: int, repeats: int = 5) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return total_bytes * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=int, default=8960)
    ap.add_argument("--in", dest="inputs", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    weight = torch.randn(args.out, args.inputs, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, args.inputs)
    stacks = {"int4": [Int4Linear.from_float(weight, refine=0) for _ in range(args.layers)],
              "int8": [Int8GroupLinear.from_float(weight) for _ in range(args.layers // 2)]}
    big = torch.randn(256 * 1024 * 1024 // 4)
    results: dict[str, list[float]] = {"torch sum": [], **{name: [] for name in stacks}}
    for _ in range(args.rounds):  # interleaved, so drift in the machine's speed hits every entry alike
        results["torch sum"].append(gb_per_s(big.sum, big.numel() * 4))
        for name, layers in stacks.items():
            results[name].append(gb_per_s(lambda layers=layers: [m(x) for m in layers],
                                          sum(layer_bytes(m) for m in layers)))
    for name, values in results.items():
        print(f"{name:>10}: median {statistics.median(values):5.1f} GB/s  "
              f"({', '.join(f'{v:.1f}' for v in sorted(values))})")


if __name__ == "__main__":
    main()
