#!/usr/bin/env python3
"""`mpirun -np 2 moeforge train --device cuda` (one GPU per rank, data-parallel gradients summed
on the GPUs through NCCL) tracks one GPU with gradient accumulation over the same global batch:
100 steps (issue #7 asks for 100) of the tiny dense and MoE models on real text (the license
texts of training_runs.FIXED_CORPUS: the repository's own files change every session, and with
them where a loss spike lands and how far bf16 runs part there; session 13's tree put one at step
22 of tiny-llama).

Both runs compute the same micro-batches in bf16; they differ only in where the two micro-batch
gradients are added (NCCL's all-reduce, or the accumulating backward on one GPU), and, with
parallel.grad_reduce_dtype bf16, in the one rounding of each rank's gradient to bf16. Each dtype runs
twice on two GPUs: summed after the backward (parallel.grad_bucket_mb 0) and in small buckets
overlapped with it (BUCKET_MB: many buckets per step, the last layers' sums running beside the
backward of the first). "sp-ep" is one group of two GPUs sharing each sequence (parallel.expert_parallel
2: Ulysses attention and half the experts each, GpuTransformer::set_expert_parallel_group) over the
same micro-batches; "sp-ep-a2a" is that group with the all-to-all dispatch in its MoE layers
(parallel.ep_dispatch alltoall; MoE model only); "sp-ep-zero1" is the same group with ZeRO-1 (the
group's partial gradients summed on the GPUs, then the optimizer over a data-parallel group of one).
"tp" is one tensor-parallel group of two GPUs (parallel.layout tp, the Megatron-LM baseline:
GpuTransformer::set_tensor_parallel_group, each GPU with half of every head set and FFN's columns
between all-gathers and reduce-scatters along the sequence, its gradients summed over both GPUs)
over the same micro-batches; it saves a checkpoint halfway, and "tp-resumed" resumes from it on
one GPU (a checkpoint of one layout loading under another, issue #7) for the second half, which,
joined to tp's first half, must track one GPU too. "dp-zero1" is ZeRO-1
on the two GPUs (parallel.zero_stage 1: gradients summed onto their shard owners in BUCKET_MB
buckets beside the backward, AdamW on each GPU's half, weights all-gathered); it saves a checkpoint halfway (each rank's moments gathered to rank 0), and
"dp-zero1-resumed" resumes from it (each rank reads its shard back) for the second half, which,
joined to the first half, must track one GPU too.

Every run must track one GPU within NOISE_FACTOR times this run's own noise: the largest
per-step gap between the one-GPU run (bf16) and the CPU reference (fp32). Two more CPU runs are
printed beside it, not checked: two CPU ranks against the CPU run with fp32 sums (only the order
of the additions differs) and with bf16-compressed ones (the compression's own effect on the
reference); on the MoE model a rounding-level difference grows over 100 steps to a few hundredths
of a nat, and these show how far in this run's data. The first step (before any update) must
agree to FIRST_STEP_GAP, and the two-GPU runs must say that they summed through NCCL.

An optional third argument names a JSON file that receives every run's loss and gradient-norm
curves, per model (written before the checks, for a look at a failing run). DATA_PARALLEL_RUNS
(comma-separated names of the checked runs, e.g. dp-zero1,dp-zero1-resumed) runs only those
beside the four reference runs; a resumed run brings the run it resumes from with it.

Exits 77 (skipped) without two GPUs or without MOEFORGE_MPIEXEC (mpirun), unless
MOEFORGE_EXPECT_GPU=1 and there is no GPU at all."""
import json
import os
import shutil
import sys
import tempfile

from training_runs import prepare_fixed_text_data, run

STEPS = 100
NOISE_FACTOR = 2.0
FIRST_STEP_GAP = 1e-3  # nats: the same forward on the same weights, bf16 on both
BUCKET_MB = 0.05  # 13,107 fp32 gradients a bucket: dozens per step on the tiny models
REFERENCE_RUNS = ("cpu", "one-gpu", "cpu-dp-fp32", "cpu-dp-bf16")
CHECKED_RUNS = ("dp-fp32", "dp-bf16", "dp-fp32-buckets", "dp-bf16-buckets", "sp-ep", "sp-ep-a2a",
                "sp-ep-zero1", "tp", "tp-resumed", "dp-zero1", "dp-zero1-resumed")
RESUMED_FROM = {"tp-resumed": "tp", "dp-zero1-resumed": "dp-zero1"}  # second halves of runs


def selected_runs():
    """The checked runs that DATA_PARALLEL_RUNS names (all when it is unset or empty)."""
    names = [n for n in os.environ.get("DATA_PARALLEL_RUNS", "").split(",") if n]
    if not names:
        return set(CHECKED_RUNS)
    unknown = [n for n in names if n not in CHECKED_RUNS]
    if unknown:
        sys.exit(f"DATA_PARALLEL_RUNS: unknown run(s) {unknown}; known: {', '.join(CHECKED_RUNS)}")
    wanted = set(names)
    for resumed, first in RESUMED_FROM.items():
        if resumed in wanted:
            wanted.add(first)  # it resumes from that run's checkpoint
    return wanted


def step_records(metrics_file, key):
    """The value of key in every per-step record of a metrics file, in step order."""
    out = []
    with open(metrics_file) as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record and "step" in record:
                out.append(record[key])
    return out


def main():
    moeforge, source_dir = sys.argv[1], sys.argv[2]
    curves_file = sys.argv[3] if len(sys.argv) > 3 else None
    all_curves = {}
    failures = []  # every run of both models is checked before the test fails
    devices = run([moeforge, "devices"]).stdout
    num_gpus = sum(1 for line in devices.splitlines() if line.startswith("cuda:"))
    mpiexec = os.environ.get("MOEFORGE_MPIEXEC")
    if num_gpus == 0 and os.environ.get("MOEFORGE_EXPECT_GPU") == "1":
        sys.exit(f"no GPU: {devices}")
    if num_gpus < 2 or not mpiexec:
        print(f"skipped: {num_gpus} GPU(s), mpirun {mpiexec or 'not built'} (needs 2 GPUs and MPI)")
        sys.exit(77)
    wanted = selected_runs()
    tmp = tempfile.mkdtemp(prefix="moeforge-dp-")
    try:
        data = prepare_fixed_text_data(moeforge, os.path.join(tmp, "data"))
        config = os.path.join(source_dir, "configs/train/demo.json")
        mpirun = [mpiexec, "-np", "2", "--oversubscribe", "--allow-run-as-root"]
        for model in ("tiny-llama", "tiny-moe"):
            common = ["--set", f"model.model_config={source_dir}/configs/models/{model}.json",
                      "--set", f"data.dataset={data}", "--set", f"schedule.max_steps={STEPS}",
                      "--set", "schedule.warmup_steps=5", "--set", "log.every_steps=1",
                      "--set", "eval.every_steps=0", "--set", "checkpoint.every_steps=0",
                      "--set", "data.micro_batch_size=8", "--no-progress"]
            curves, grad_norms = {}, {}
            for name, launch, device, extra in [
                    ("cpu", [], "cpu", ["--set", "data.grad_accum_steps=2"]),
                    ("one-gpu", [], "cuda", ["--set", "data.grad_accum_steps=2"]),
                    ("cpu-dp-fp32", mpirun, "cpu", []),
                    ("cpu-dp-bf16", mpirun, "cpu", ["--set", "parallel.grad_reduce_dtype=bf16"]),
                    ("dp-fp32", mpirun, "cuda", ["--set", "parallel.grad_bucket_mb=0"]),
                    ("dp-bf16", mpirun, "cuda", ["--set", "parallel.grad_reduce_dtype=bf16",
                                                 "--set", "parallel.grad_bucket_mb=0"]),
                    ("dp-fp32-buckets", mpirun, "cuda",
                     ["--set", f"parallel.grad_bucket_mb={BUCKET_MB}"]),
                    ("dp-bf16-buckets", mpirun, "cuda",
                     ["--set", "parallel.grad_reduce_dtype=bf16",
                      "--set", f"parallel.grad_bucket_mb={BUCKET_MB}"]),
                    ("sp-ep", mpirun, "cuda",
                     ["--set", "parallel.expert_parallel=2",
                      "--set", "data.grad_accum_steps=2"]),
                    ("sp-ep-a2a", mpirun, "cuda",
                     ["--set", "parallel.expert_parallel=2", "--set", "parallel.ep_dispatch=alltoall",
                      "--set", "data.grad_accum_steps=2"]),
                    ("sp-ep-zero1", mpirun, "cuda",
                     ["--set", "parallel.expert_parallel=2", "--set", "parallel.zero_stage=1",
                      "--set", "data.grad_accum_steps=2"]),
                    ("tp", mpirun, "cuda",
                     ["--set", "parallel.expert_parallel=2", "--set", "parallel.layout=tp",
                      "--set", "data.grad_accum_steps=2",
                      "--set", f"checkpoint.every_steps={STEPS // 2}"]),
                    ("tp-resumed", [], "cuda",
                     ["--set", "data.grad_accum_steps=2", "--resume",
                      os.path.join(tmp, f"{model}-tp", "checkpoints", f"step-{STEPS // 2:08d}")]),
                    ("dp-zero1", mpirun, "cuda",
                     ["--set", "parallel.zero_stage=1",
                      "--set", f"parallel.grad_bucket_mb={BUCKET_MB}",
                      "--set", f"checkpoint.every_steps={STEPS // 2}"]),
                    ("dp-zero1-resumed", mpirun, "cuda",
                     ["--set", "parallel.zero_stage=1",
                      "--set", f"parallel.grad_bucket_mb={BUCKET_MB}", "--resume",
                      os.path.join(tmp, f"{model}-dp-zero1", "checkpoints",
                                   f"step-{STEPS // 2:08d}")])]:
                if name not in REFERENCE_RUNS and name not in wanted:
                    continue
                if name == "sp-ep-a2a" and model == "tiny-llama":
                    continue  # no MoE layers: the same run as sp-ep
                run_dir = os.path.join(tmp, f"{model}-{name}")
                proc = run(launch + [moeforge, "train", "--config", config, "--device", device,
                                     "--set", f"checkpoint.dir={run_dir}"] + common + extra)
                if name == "sp-ep-a2a":
                    assert "expert dispatch: alltoall" in proc.stderr, proc.stderr
                if name == "tp":
                    assert '2 tensor-parallel (parallel.layout "tp")' in proc.stderr, proc.stderr
                if name.startswith("dp-zero1"):
                    assert "ZeRO-1 over 2 data-parallel ranks on the GPUs through NCCL" in \
                        proc.stderr, proc.stderr
                elif launch and device == "cuda" and not name.startswith("sp-ep"):
                    assert "gradient sums over 2 ranks: on the GPUs through NCCL" in proc.stderr, \
                        proc.stderr
                metrics = os.path.join(run_dir, "metrics.jsonl")
                curves[name] = step_records(metrics, "loss")
                grad_norms[name] = step_records(metrics, "grad_norm")
                want_steps = STEPS - STEPS // 2 if name in RESUMED_FROM else STEPS
                assert len(curves[name]) == want_steps, (model, name, len(curves[name]))
            for resumed, first in RESUMED_FROM.items():
                if resumed in curves:
                    for series in (curves, grad_norms):
                        series[resumed] = series[first][:STEPS // 2] + series[resumed]
            all_curves[model] = {"loss": curves, "grad_norm": grad_norms}
            if curves_file:
                with open(curves_file, "w") as f:
                    json.dump(all_curves, f)
            samples = {name: max(abs(a - b) for a, b in zip(curves[name], curves[ref]))
                       for name, ref in (("one-gpu", "cpu"), ("cpu-dp-fp32", "cpu"),
                                         ("cpu-dp-bf16", "cpu"))}
            noise = samples["one-gpu"]
            bound = NOISE_FACTOR * noise
            print(f"{model}: noise (one-gpu vs cpu) {noise:.3g} nats; for comparison " + ", ".join(
                f"{name} vs cpu {gap:.3g}" for name, gap in samples.items() if name != "one-gpu"))
            for name in (n for n in CHECKED_RUNS if n in curves):
                diffs = [b - a for a, b in zip(curves["one-gpu"], curves[name])]
                gaps = [abs(d) for d in diffs]
                late = sum(diffs[-25:]) / 25
                print(f"{model} {name}: largest gap to one GPU {max(gaps):.3g} nats (first step "
                      f"{gaps[0]:.3g}, mean difference over the last 25 steps {late:+.3g}); "
                      f"bound {bound:.3g}")
                if gaps[0] >= FIRST_STEP_GAP:
                    failures.append(f"{model} {name}: first step gap {gaps[0]:.3g}")
                if max(gaps) >= bound:
                    failures.append(f"{model} {name}: largest gap {max(gaps):.3g} >= {bound:.3g} "
                                    f"(step {gaps.index(max(gaps)) + 1})")
            if curves["one-gpu"][-1] >= curves["one-gpu"][0] - 0.5:
                failures.append(f"{model} one-gpu did not learn: {curves['one-gpu']}")
        assert not failures, "\n".join(failures)
        print("ok")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
