"""Memory of one NVAE training step, before renting the GPUs for a run.

    python -m benchmarks.memory --config=configs/cifar10.cfg --batch_size=1
        [--remat=none,cells] [--mixed_precision=float16] [--steps=3] [--json]

(`--flagfile=F` is `--config=F`; `python -m benchmarks.bench --memory ...`
runs this.) For every config and `--remat` mode a fresh process builds the
model and its Adamax state as the trainer does, runs the training step of
the benchmark (`benchmarks.bench.build_functions`: forward, the full
objective, backward, update) `--steps` times on a synthetic batch, and reads
TensorFlow's own allocator statistics (`TF_CPU_ALLOCATOR_USE_BFC=true`,
`tf.config.experimental.get_memory_info`):

  * `state_bytes`: tensors alive between steps: weights, optimizer slots,
    batch-norm and power-iteration state, the input batch;
  * `step_bytes`: the peak of one step above that (activations kept for the
    backward pass, gradients, temporaries), from the last step (the first
    one also runs the power iteration's 40 warm-up steps);
  * `peak_bytes`, their sum, and `step_bytes_per_image` (`step_bytes` / batch;
    it includes one set of gradients, which does not grow with the batch).

`peak_bytes` is what a GPU of the same TensorFlow allocator would need for
the step: an estimate from the allocator's bytes, not a GPU measurement (CUDA
kernels need workspace of their own, cuDNN more). The worker's peak RSS
(`peak_rss_mb`) and the median wall and process CPU time of the steps after
the first (`step_s`, `step_cpu_s`; CPU time is the steadier figure on a
shared machine) are reported too. One JSON line
per run with `--json`, else a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MB = 2 ** 20
ALLOCATOR_ENV = {"TF_CPU_ALLOCATOR_USE_BFC": "true"}


def measure(config_name: str, batch_size: int | None, remat: str,
            mixed_precision: str, steps: int) -> dict:
    """One run in this process (TensorFlow not yet imported)."""
    os.environ.update(ALLOCATOR_ENV)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    from benchmarks import bench
    if mixed_precision != "none":
        import keras
        keras.mixed_precision.set_global_policy(f"mixed_{mixed_precision}")
    config, batch, objective = bench.resolve_config(config_name, batch_size)
    tf.random.set_seed(bench.SEED)
    bench.set_grappler_options(bench.GRAPPLER["lean"])
    device = "CPU:0"
    model, optimizer, train_step, _, _ = bench.build_functions(
        config, batch, objective, constant_weights=False, remat=remat)
    x = tf.constant(bench._synthetic_batch(config, batch, bench.SEED))
    state = tf.config.experimental.get_memory_info(device)["current"]
    params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    variable_bytes = sum(
        int(np.prod(v.shape)) * tf.as_dtype(v.dtype).size
        for v in model.variables + optimizer.variables)
    times, cpu_times, step_peaks = [], [], []
    for _ in range(steps):
        tf.config.experimental.reset_memory_stats(device)
        before = tf.config.experimental.get_memory_info(device)["current"]
        start, start_cpu = time.perf_counter(), time.process_time()
        train_step(x).numpy()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - start_cpu)
        step_peaks.append(
            tf.config.experimental.get_memory_info(device)["peak"] - before)
    step = step_peaks[-1]
    return {
        "config": config_name, "batch_size": batch, "remat": remat,
        "mixed_precision": mixed_precision, "params": params,
        "variable_bytes": variable_bytes, "state_bytes": state,
        "step_bytes": step, "peak_bytes": state + step,
        "step_bytes_per_image": step // batch,
        "first_step_s": round(times[0], 2),
        "step_s": round(statistics.median(times[1:]), 4)
        if steps > 1 else None,
        "step_cpu_s": round(statistics.median(cpu_times[1:]), 4)
        if steps > 1 else None,
        "steps": steps, "peak_rss_mb": round(bench._peak_rss_mb(), 1),
        "tf_version": tf.__version__,
    }


def _worker_command(args, config_name: str, remat: str) -> list:
    cmd = [sys.executable, "-m", "benchmarks.memory", "--worker",
           f"--config={config_name}", f"--remat={remat}",
           f"--mixed_precision={args.mixed_precision}",
           f"--steps={args.steps}"]
    if args.batch_size:
        cmd.append(f"--batch_size={args.batch_size}")
    return cmd


def run(args, config_name: str, remat: str) -> dict:
    """`measure` in a fresh process (the allocator is chosen at start)."""
    proc = subprocess.run(_worker_command(args, config_name, remat),
                          capture_output=True, text=True, check=False,
                          env={**os.environ, **ALLOCATOR_ENV})
    if proc.returncode != 0 or not proc.stdout.strip():
        raise RuntimeError(f"memory worker for {config_name} (remat={remat})"
                           f" failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(results: list):
    header = (f"{'config':28s} {'batch':>5s} {'remat':>6s} {'params':>9s} "
              f"{'state MB':>9s} {'step MB':>9s} {'MB/image':>9s} "
              f"{'peak MB':>9s} {'RSS MB':>8s} {'step s':>8s}")
    print(header)
    for r in results:
        step_s = r["step_s"] if r["step_s"] is not None else \
            f"{r['first_step_s']}*"
        print(f"{os.path.basename(r['config']):28s} {r['batch_size']:>5d} "
              f"{r['remat']:>6s} {r['params'] / 1e6:>8.2f}M "
              f"{r['state_bytes'] / MB:>9.0f} {r['step_bytes'] / MB:>9.0f} "
              f"{r['step_bytes_per_image'] / MB:>9.1f} "
              f"{r['peak_bytes'] / MB:>9.0f} {r['peak_rss_mb']:>8.0f} "
              f"{step_s:>8}")
    print("state: weights, optimizer slots, input; step: activations, "
          "gradients, temporaries of one step (TensorFlow's allocator; a "
          "GPU estimate, not a GPU measurement). * first step, with "
          "tracing.")


def parse_args(argv=None):
    from nvae_tf.layers.remat import REMAT_MODES
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.memory",
        description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config", "--flagfile", action="append", dest="config",
        help="preset (mnist-small, cifar-small) or trainer flagfile; may be "
             "repeated or comma-separated")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="override the config's (global) batch size")
    parser.add_argument(
        "--remat", default="none",
        help="recomputation mode(s) of the step, comma-separated, from "
             f"{', '.join(REMAT_MODES)}")
    parser.add_argument("--mixed_precision", default="none",
                        choices=("none", "bfloat16", "float16"),
                        help="Keras mixed-precision policy of the model")
    parser.add_argument(
        "--steps", type=int, default=3,
        help="training steps per run: the last one is measured, the later "
             "ones timed (1: only the first step, for the largest models)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per run and line")
    parser.add_argument("--worker", action="store_true",
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.config:
        parser.error("--config (or --flagfile) is required: a preset "
                     "(mnist-small, cifar-small) or a trainer flagfile")
    args.configs = [n for item in args.config for n in item.split(",") if n]
    args.remats = [m for m in args.remat.split(",") if m]
    for mode in args.remats:
        if mode not in REMAT_MODES:
            parser.error(f"--remat={mode!r}: expected one of "
                         f"{', '.join(REMAT_MODES)}")
    if args.steps < 1:
        parser.error(f"--steps={args.steps}: expected >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch_size={args.batch_size}: expected >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.configs[0], args.batch_size,
                                 args.remats[0], args.mixed_precision,
                                 args.steps)), flush=True)
        return
    results = []
    for name in args.configs:
        for mode in args.remats:
            results.append(run(args, name, mode))
            if args.json:
                print(json.dumps(results[-1]), flush=True)
    if not args.json:
        print_table(results)


if __name__ == "__main__":
    main()
