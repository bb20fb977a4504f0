"""Memory of one NVAE training step, before renting the GPUs for a run.

    python -m benchmarks.memory --config=configs/cifar10.cfg --batch_size=1
        [--remat=none,cells] [--mixed_precision=float16] [--steps=3] [--json]
        [--run_eagerly]

(`--flagfile=F` is `--config=F`, a trainer flagfile by path or packaged
name, see `benchmarks.command_line`; `python -m benchmarks.bench --memory
...` runs this; the flags are absl's, `--helpshort` lists them.) For every config and `--remat` mode a fresh process builds the
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

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

from absl import flags

from benchmarks import command_line
from nvae_tf.layers.remat import REMAT_MODES

MB = 2 ** 20
ALLOCATOR_ENV = {"TF_CPU_ALLOCATOR_USE_BFC": "true"}


def measure(config_name: str, batch_size: int | None, remat: str,
            mixed_precision: str, steps: int,
            run_eagerly: bool = False) -> dict:
    """One run in this process (the allocator chosen by `ALLOCATOR_ENV` in
    the environment before TensorFlow is imported, as `run` does)."""
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
        config, batch, objective, constant_weights=False, remat=remat,
        run_eagerly=run_eagerly)
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
        "run_eagerly": run_eagerly,
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
    if args.run_eagerly:
        cmd.append("--run_eagerly")
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


def _remat_problem(mode: str) -> str | None:
    if mode in REMAT_MODES:
        return None
    return f"{mode!r} is not one of {', '.join(REMAT_MODES)}"


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the memory report's flags on `flag_values` (absl's FLAGS)."""
    fv = dict(flag_values=flag_values)
    command_line.define_shared_flags(
        flag_values, None,
        "Preset (mnist-small, cifar-small) or trainer flagfile (required)")
    flags.DEFINE(command_line.CommaListParser(_remat_problem), "remat",
                 "none", "Recomputation mode(s) of the step, "
                 f"comma-separated, from {', '.join(REMAT_MODES)}.",
                 serializer=command_line.CommaListSerializer(), **fv)
    flags.DEFINE_integer("steps", 3, "Training steps per run: the last one "
                         "is measured, the later ones timed (1: only the "
                         "first step, for the largest models).",
                         lower_bound=1, **fv)
    flags.DEFINE_bool("run_eagerly", False, "Run the trainer's step op by "
                      "op (its --run_eagerly) instead of traced: no graph "
                      "in memory, for the largest models.", **fv)


@dataclasses.dataclass(frozen=True)
class Options:
    """The memory report's flags (`define_flags`), read by `from_flags`."""

    configs: tuple[str, ...]
    remats: tuple[str, ...]
    batch_size: int | None
    mixed_precision: str
    steps: int
    run_eagerly: bool
    json: bool
    worker: bool

    @classmethod
    def from_flags(cls, flag_values: flags.FlagValues) -> Options:
        return command_line.options(
            cls, flag_values,
            configs=command_line.config_names(flag_values.config),
            remats=tuple(flag_values.remat))


def parse_args(argv=()) -> Options:
    """As `benchmarks.bench.parse_args`, for this command's flags."""
    return command_line.parse(Options, define_flags, argv, __name__)


def main(argv):
    """absl main: the memory report with absl's FLAGS (`define_flags`)."""
    args = command_line.read(Options, argv)
    if args.worker:
        print(json.dumps(measure(args.configs[0], args.batch_size,
                                 args.remats[0], args.mixed_precision,
                                 args.steps, args.run_eagerly)), flush=True)
        return
    results = []
    for name in args.configs:
        for mode in args.remats:
            results.append(run(args, name, mode))
            if args.json:
                print(json.dumps(results[-1]), flush=True)
    if not args.json:
        print_table(results)


def cli(argv=None):
    """Entry point of `python -m benchmarks.memory` (and of
    `python -m benchmarks.bench --memory`)."""
    command_line.run(main, define_flags,
                     list(sys.argv if argv is None else argv), __name__)


if __name__ == "__main__":
    cli()
