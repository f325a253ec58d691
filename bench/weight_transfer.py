"""Benchmark: weight transfer time per GB, trainer rank 0 -> a receiver group.

The real transport (:mod:`trieflow.trainer.weight_transfer`): TCPStore rendezvous, a process
group built for the purpose, vLLM 0.32's packed buckets, a deadline on every phase. The
sender holds bf16 tensors shaped like a decoder's weights; receivers run in spawned
processes and drop what they take (what is measured is the transfer, not a model load).

* CPU (what CI machines have): gloo over loopback, receivers on CPU.
* CUDA with >= 2 visible GPUs: nccl, sender on cuda:0, one receiver per other GPU.

Per size: one warm-up round, then ``--repeats`` timed rounds; the median is reported as
seconds, GB/s and seconds per GB (GB = 1e9 bytes), with the phases (announce, broadcast,
finish) of the median round.

    .venv/bin/python bench/weight_transfer.py                      # CPU defaults
    .venv/bin/python bench/weight_transfer.py --sizes-mb 1024,4096  # on a GPU host
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from trieflow.trainer.weight_transfer import (
    ReceiverClosed,
    SenderRendezvous,
    TransferStats,
    WeightReceiver,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "weight_transfer.json"
TENSOR_MB = 32  # one bf16 tensor per 32 MiB: about a 4k x 4k projection


def receiver_main(port: int, rank: int, world: int, device: str, timeout: float) -> None:
    torch.set_num_threads(1)
    receiver = WeightReceiver.connect(
        "127.0.0.1", port, rank, world, timeout=timeout, op_timeout=timeout,
        device=torch.device(device),
    )  # fmt: skip
    while True:
        try:
            receiver.receive(timeout, on_bucket=lambda bucket: None)
        except ReceiverClosed:
            return


def weights(total_bytes: int, device: torch.device) -> list[tuple[str, torch.Tensor]]:
    """bf16 tensors of TENSOR_MB MiB (the last one smaller) summing to ``total_bytes``."""
    out = []
    per = TENSOR_MB << 20
    left, index = total_bytes, 0
    while left > 0:
        size = min(per, left)
        out.append(
            (f"model.layers.{index}.weight", torch.randn(size // 2, device=device).bfloat16())
        )
        left -= size
        index += 1
    return out


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def main() -> None:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    on_gpu = gpus >= 2
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", default="1024,4096" if on_gpu else "16,64,256")
    parser.add_argument("--bucket-mb", type=int, default=512 if on_gpu else 64)
    parser.add_argument("--receivers", type=int, default=gpus - 1 if on_gpu else 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    backend = "nccl" if on_gpu else "gloo"
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)

    ctx = mp.get_context("spawn")
    rdzv = SenderRendezvous("127.0.0.1", 0, args.receivers)
    world = args.receivers + 1
    procs = [
        ctx.Process(
            target=receiver_main,
            args=(rdzv.port, r, world, f"cuda:{r}" if on_gpu else "cpu", args.timeout),
            daemon=True,
        )
        for r in range(1, world)
    ]
    for proc in procs:
        proc.start()
    rows = []
    try:
        started = time.monotonic()
        sender = rdzv.accept(
            init_timeout=args.timeout,
            timeout=args.timeout,
            bucket_bytes=args.bucket_mb << 20,
            device=device,
        )
        init_seconds = time.monotonic() - started  # includes the receivers' start-up
        version = 0
        for size_mb in sizes:
            tensors = weights(size_mb << 20, device)
            runs: list[TransferStats] = []
            for repeat in range(args.repeats + 1):
                version += 1
                stats = sender.send(tensors, version=version)
                if repeat:  # the first round warms up buffers and connections
                    runs.append(stats)
            median = sorted(runs, key=lambda s: s.seconds)[len(runs) // 2]
            row = {
                "size_mb": size_mb,
                "bytes": median.bytes,
                "buckets": median.buckets,
                "seconds": round(median.seconds, 4),
                "gb_per_s": round(median.gb_per_second, 3),
                "s_per_gb": round(median.seconds_per_gb, 4),
                "announce_s": round(median.announce_seconds, 5),
                "broadcast_s": round(median.broadcast_seconds, 4),
                "finish_s": round(median.finish_seconds, 5),
                "runs_s": [round(r.seconds, 4) for r in runs],
                "spread_s": round(statistics.pstdev(r.seconds for r in runs), 4),
            }
            rows.append(row)
            print(
                f"{size_mb:>7} MiB  {median.buckets:>4} buckets  {median.seconds:8.3f} s  "
                f"{median.gb_per_second:7.3f} GB/s  {median.seconds_per_gb:7.3f} s/GB",
                flush=True,
            )
            del tensors
        sender.close()
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    result = {
        "backend": backend,
        "receivers": args.receivers,
        "bucket_mb": args.bucket_mb,
        "init_seconds": round(init_seconds, 3),
        "rows": rows,
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{backend}, {args.receivers} receiver(s), {args.bucket_mb} MiB buckets -> {args.out}")


if __name__ == "__main__":
    main()
