"""The training curve of a run: its evaluations per epoch as a PNG plot.

    python -m nvae_tf.serving.curve --model_dir=DIR --output=curve.png

One line per evaluated split (validation, test) of the NELBO in bits/dim
against the epoch, read from MODEL_DIR/eval_history.jsonl (the trainer's
record of every evaluation), with the same NELBO in nats on the right axis.
Drawn with matplotlib's object API (no pyplot state), so it runs headless.
"""

from __future__ import annotations

import os

from absl import app, flags

from nvae_tf import cli as cli_lib
from nvae_tf import flagfiles
from nvae_tf.training.log import EVAL_HISTORY_FILE, read_eval_history

FIGURE_INCHES = (6.4, 4.0)
FIGURE_DPI = 100
SPLIT_STYLES = {"validation": dict(marker="o", color="tab:blue"),
                "test": dict(marker="s", color="tab:orange")}


def plot_curve(history: list[dict], path: str, title: str = "") -> str:
    """Writes the NELBO per epoch of `history` (`read_eval_history`) to the
    PNG `path`; returns `path`."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E501 pylint: disable=import-outside-toplevel
        from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise cli_lib.UserError(
            "the training curve needs matplotlib: pip install "
            "'nvae_tf[plots]' (or matplotlib).") from err
    if not history:
        raise cli_lib.UserError("no evaluation to plot: the run has not "
                                "evaluated yet.")
    figure = Figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for split in sorted({r["split"] for r in history}):
        records = [r for r in history if r["split"] == split]
        axes.plot([r["epoch"] for r in records], [r["bpd"] for r in records],
                  label=f"{split} ({records[-1]['num_images']:,} images)",
                  **SPLIT_STYLES.get(split, {}))
    # nats = bits/dim * ln 2 * pixels: the same factor for every record.
    nats_per_bpd = history[-1]["nelbo"] / history[-1]["bpd"]
    axes.secondary_yaxis("right", functions=(
        lambda bpd: bpd * nats_per_bpd, lambda nats: nats / nats_per_bpd)
    ).set_ylabel("NELBO (nats per image)")
    axes.set_xlabel("epoch")
    axes.set_ylabel("NELBO (bits/dim)")
    axes.grid(alpha=0.3)
    axes.legend()
    if title:
        axes.set_title(title)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path)
    return path


def define_flags(flag_values=flags.FLAGS):
    flags.DEFINE_string("model_dir", None, "nvae_tf model directory.",
                        flag_values=flag_values, required=True)
    flags.DEFINE_string("output", None, "PNG to write (default: "
                        "MODEL_DIR/eval/curve.png).", flag_values=flag_values)
    flags.DEFINE_string("title", "", "Title of the plot.",
                        flag_values=flag_values)


def main(argv, flag_values=flags.FLAGS):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    model_dir = flag_values.model_dir
    if not os.path.isdir(model_dir):
        raise cli_lib.UserError(f"--model_dir={model_dir} does not exist.")
    history = read_eval_history(model_dir)
    if not history:
        raise cli_lib.UserError(
            f"{os.path.join(model_dir, EVAL_HISTORY_FILE)} holds no "
            "evaluation: train until the first epoch ends.")
    output = flag_values.output or os.path.join(model_dir, "eval",
                                                "curve.png")
    print(plot_curve(history, output, flag_values.title))


def cli():
    """Entry point of `python -m nvae_tf.serving.curve`."""
    define_flags()
    cli_lib.run(main, argv=flagfiles.command_line(__name__))


if __name__ == "__main__":
    cli()
