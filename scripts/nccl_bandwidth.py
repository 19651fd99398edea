#!/usr/bin/env python3
"""NCCL bandwidth of the expert-parallel exchanges' collectives, measured through PyTorch's NCCL
(an independent reference for `bench train`'s <phase>_exchange times): all-gather, reduce-scatter
and all-to-all of a full tensor of SIZE MiB (the gathered output, the reduce-scatter's input, the
all-to-all's buffer), one GPU per rank, bf16 and fp32. One JSON line per case: ms per call (median
of --repeats after --warmup, CUDA events) and GB/s of the data each rank receives from the others
((ranks - 1) / ranks of the tensor).

Run: torchrun --nproc_per_node 2 scripts/nccl_bandwidth.py [--sizes-mib 128,256] [--repeats 20]
"""
import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist


def time_ms(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", default="128,256", help="full tensor sizes in MiB")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl")
    ranks = dist.get_world_size()
    for mib in (int(s) for s in args.sizes_mib.split(",")):
        for dtype in (torch.bfloat16, torch.float32):
            count = mib * 2**20 * 8 // torch.finfo(dtype).bits  # elements of the full tensor
            piece = count // ranks
            mine = torch.randn(piece, device="cuda", dtype=dtype)
            gathered = torch.empty(piece * ranks, device="cuda", dtype=dtype)
            full = torch.randn(count, device="cuda", dtype=dtype)
            part = torch.empty(piece, device="cuda", dtype=dtype)
            swapped = torch.empty(count, device="cuda", dtype=dtype)
            cases = {
                "all_gather": (lambda: dist.all_gather_into_tensor(gathered, mine),
                               piece * (ranks - 1)),
                "reduce_scatter": (lambda: dist.reduce_scatter_tensor(part, full),
                                   piece * (ranks - 1)),
                "all_to_all": (lambda: dist.all_to_all_single(swapped, full), piece * (ranks - 1)),
            }
            for name, (fn, received) in cases.items():
                ms = time_ms(fn, args.warmup, args.repeats)
                gb = received * full.element_size() / 1e9
                if dist.get_rank() == 0:
                    print(json.dumps({"op": name, "dtype": str(dtype).replace("torch.", ""),
                                      "ranks": ranks, "tensor_mib": mib,
                                      "received_mb_per_rank": round(gb * 1e3, 1),
                                      "ms": round(ms, 4), "gb_per_s": round(gb / (ms / 1e3), 1),
                                      "nccl": ".".join(map(str, torch.cuda.nccl.version()))}),
                          flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
