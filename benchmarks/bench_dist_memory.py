"""Peak memory per process of remove-ln training: one process, two DDP processes, two FSDP2 processes.

Each configuration runs in fresh processes (``torchrun`` for two) on the same random Llama (seeded config, no
bundle needed), as the pipeline holds it: the original model (the teacher and the evaluation reference) plus
the student being trained, AdamW, the same global batch (``--grad-accum 2``). Per rank it reports ``ru_maxrss``
after importing torch and transformers (the floor every process pays), after building the two models, before
the first checkpoint (the training peak) and at the end (with the final checkpoint, which under FSDP gathers the
full weights and AdamW state onto rank 0's host memory). Each is given above the import floor and as a ratio to
the one-process run measured in the same invocation. On CPU processes use gloo; on a
machine with GPUs run it with ``--device cuda`` to read ``torch.cuda.max_memory_allocated`` instead.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_dist_memory.py            # ~40M parameters, 3 steps
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_dist_memory.py --layers 4 --d-model 256   # quicker
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def _mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(args: argparse.Namespace) -> None:
    floor = _mib()  # torch is imported
    import transformers

    from normscope.core.sites import find_layout, find_norm_sites
    from normscope.core.text import sample_from_ids
    from normscope.removal.train import TrainOptions, train

    floor = max(floor, _mib())
    torch.set_num_threads(1)
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.d_model,
                                   intermediate_size=4 * args.d_model, num_hidden_layers=args.layers,
                                   num_attention_heads=max(args.d_model // 64, 1), max_position_embeddings=256)
    torch.manual_seed(0)
    original = transformers.LlamaForCausalLM(cfg).to(device).eval()
    for p in original.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(original)
    layout = find_layout(student)
    sites = find_norm_sites(student, layout)
    built = _mib()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, args.vocab, (32, args.seq_len), generator=g).tolist()
    sample = sample_from_ids(ids, ["x"] * 32, batch_size=args.batch_size)
    opts = TrainOptions(steps=args.steps, lr=1e-4, grad_accum=2, save_every=0, log_sites=False,
                        fsdp=args.mode == "fsdp")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # the training peak is read before the first checkpoint: writing one gathers the full weights and AdamW
    # state of a sharded model onto rank 0's host memory, which is a peak of its own
    from normscope.removal import dist as D

    T = sys.modules["normscope.removal.train"]  # the package's ``train`` attribute is the function

    before: dict[str, float] = {}

    def first(fn):  # type: ignore[no-untyped-def]
        def inner(*a, **k):  # type: ignore[no-untyped-def]
            before.setdefault("train_peak_mib", _mib())
            if device.type == "cuda":
                before.setdefault("cuda_train_peak_mib", torch.cuda.max_memory_allocated(device) / 2**20)
            return fn(*a, **k)
        return inner

    D.Parallel.full_model_state = first(D.Parallel.full_model_state)  # type: ignore[method-assign]
    D.Parallel.barrier = first(D.Parallel.barrier)  # type: ignore[method-assign]  # ranks > 0 under DDP
    T.save_checkpoint = first(T.save_checkpoint)
    # control=True: the wrappers and the loop of the LN-free run, without a schedule to fit into few steps
    res = train(student, layout, sites, sample.batches, opts, Path(args.run_dir), control=True)
    rec = {"mode": args.mode, "rank": int(os.environ.get("RANK", "0")), "floor_mib": floor, "built_mib": built,
           "peak_mib": _mib(), **before, "n_params": sum(p.numel() for p in original.parameters()),
           "loss": [h.loss for h in res.history]}
    if device.type == "cuda":
        rec["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print("RESULT " + json.dumps(rec), flush=True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--worker", choices=("none", "ddp", "fsdp"))
    ap.add_argument("--run-dir")
    args = ap.parse_args()
    if args.worker:
        args.mode = args.worker
        worker(args)
        return
    root = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="dist-mem-"))
    torchrun = Path(sys.executable).with_name("torchrun")
    common = [f"--layers={args.layers}", f"--d-model={args.d_model}", f"--vocab={args.vocab}",
              f"--seq-len={args.seq_len}", f"--batch-size={args.batch_size}", f"--steps={args.steps}",
              f"--device={args.device}"]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    rows = []
    for mode, n in (("none", 1), ("ddp", 2), ("fsdp", 2)):
        me = [str(Path(__file__).resolve()), f"--worker={mode}", f"--run-dir={tmp / mode}", *common]
        cmd = [sys.executable, *me] if n == 1 else [str(torchrun), "--nproc-per-node", str(n), "--master-port",
                                                      "29517", *me]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        got = [json.loads(ln.split("RESULT ", 1)[1]) for ln in out.stdout.splitlines() if "RESULT " in ln]
        if out.returncode or len(got) != n:
            sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
        rows += got
    shutil.rmtree(tmp, ignore_errors=True)
    base = next(r for r in rows if r["mode"] == "none")
    key = "cuda_peak_mib" if "cuda_peak_mib" in base else None
    print(f"{base['n_params'] / 1e6:.1f}M parameters, fp32; per rank, peak RSS above the import floor (ratio to one "
          "process)" + ("; CUDA peak allocated" if key else ""))
    for r in rows:
        tr, above = r["train_peak_mib"] - r["floor_mib"], r["peak_mib"] - r["floor_mib"]
        line = (f"{r['mode']:>5} rank {r['rank']}: floor {r['floor_mib']:.0f} MiB; above it: models built "
                f"{r['built_mib'] - r['floor_mib']:.0f}, training peak {tr:.0f} "
                f"({tr / (base['train_peak_mib'] - base['floor_mib']):.2f}x), with the final checkpoint {above:.0f} "
                f"({above / (base['peak_mib'] - base['floor_mib']):.2f}x) MiB; "
                f"losses {[round(x, 4) for x in r['loss']]}")
        if key:
            line += (f"; CUDA training peak {r['cuda_train_peak_mib']:.0f} MiB "
                     f"({r['cuda_train_peak_mib'] / base['cuda_train_peak_mib']:.2f}x), overall {r[key]:.0f}")
        print(line)


if __name__ == "__main__":
    main()
