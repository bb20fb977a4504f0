"""The absl command line of `benchmarks.bench` and `benchmarks.memory`.

Both commands read their flags with absl and report a bad value as one line
naming the flag (`nvae_tf.cli`), as the `python -m nvae_tf.*` commands do.
One invocation measures several models, each in fresh processes: `--config`
names them (benchmark presets or trainer flagfiles, by path or packaged
name), repeated or comma-separated. Here `--flagfile=F` is `--config=F`:
absl's own `--flagfile` would merge one file's flags into the command's, so
it could name one model only, and a trainer flagfile's `--batch_size` or
`--remat` would land on the benchmark's flags of that name.
"""

from __future__ import annotations

import dataclasses
import sys

from absl import flags

from nvae_tf import cli
from nvae_tf.training.config import MIXED_PRECISION

_FLAGFILE_FLAGS = ("--flagfile", "-flagfile")


class CommaListParser(flags.ArgumentParser):
    """A comma-separated list; `problem(item)` says what is wrong, or None."""

    syntactic_help = "a comma-separated list"

    def __init__(self, problem):
        super().__init__()
        self._problem = problem

    def parse(self, argument):
        items = list(argument) if isinstance(argument, (list, tuple)) else [
            item for item in argument.split(",") if item]
        for item in items:
            problem = self._problem(item)
            if problem:
                raise ValueError(problem)
        return items

    def flag_type(self):
        return "list"


class CommaListSerializer(flags.ArgumentSerializer):
    """Writes a `CommaListParser` value, or a multi flag's list of them."""

    def serialize(self, value):
        if value and isinstance(value[0], list):
            value = [item for items in value for item in items]
        return ",".join(value)


def config_problem(name: str) -> str | None:
    """What is wrong with a `--config` name, or None."""
    from benchmarks import bench  # imports TensorFlow
    return bench.config_problem(name)


def config_names(value) -> tuple[str, ...]:
    """The names of a `--config` flag's value (one list per occurrence)."""
    return tuple(name for names in value or () for name in names)


def define_shared_flags(flag_values: flags.FlagValues, config_default,
                        config_help: str) -> None:
    """Defines the flags both benchmark commands have, with one meaning."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_multi(
        CommaListParser(config_problem), CommaListSerializer(),
        "config", config_default,
        config_help + "; may be repeated or comma-separated. --flagfile=F "
        "is --config=F", **fv)
    flags.register_validator(
        "config", lambda value: bool(config_names(value)),
        "--config (or --flagfile) is required: a preset (mnist-small, "
        "cifar-small) or a trainer flagfile", **fv)
    flags.DEFINE_integer("batch_size", None,
                         "Override the config's (global) batch size.",
                         lower_bound=1, **fv)
    flags.DEFINE_enum("mixed_precision", "none", list(MIXED_PRECISION),
                      "Keras mixed-precision policy of the model.", **fv)
    flags.DEFINE_bool("json", False, "One JSON object per result and line.",
                      **fv)
    flags.DEFINE_bool("worker", False, "Internal: this process is a worker "
                      "of the command (one config, one run).", **fv)


def flagfile_as_config(args: list[str]) -> list[str]:
    """`args` (no program name) with `--flagfile` renamed `--config` (both
    `--flagfile=F` and `--flagfile F`); arguments after `--` are left alone."""
    args = list(args)
    end = args.index("--") if "--" in args else len(args)
    for i, arg in enumerate(args[:end]):
        name, equals, value = arg.partition("=")
        if name in _FLAGFILE_FLAGS:
            args[i] = f"--config{equals}{value}"
    return args


def options(cls, flag_values: flags.FlagValues, **derived):
    """The dataclass `cls` of a command's flags: each field is the value of
    the flag of its name, except the `derived` ones given."""
    values = {field.name: flag_values[field.name].value
              for field in dataclasses.fields(cls)
              if field.name not in derived}
    return cls(**values, **derived)


def read(options_class, argv: list[str]):
    """`options_class.from_flags(FLAGS)` in an absl `main(argv)`.

    Raises:
      cli.UserError: absl left arguments that are not flags.
    """
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments {' '.join(argv[1:])}: "
                            "every argument is a --flag (--helpshort lists "
                            "them).")
    return options_class.from_flags(flags.FLAGS)


def parse(options_class, define, args, program: str):
    """`args` (no program name) parsed into new FlagValues with `define`,
    as `options_class.from_flags` of them.

    A bad value is one line on stderr and exit `cli.EXIT_USER_ERROR`, as on
    the command line.
    """
    values = flags.FlagValues()
    define(values)
    cli.parse_flags([program] + flagfile_as_config(args), values)
    return options_class.from_flags(values)


def run(main, define, argv: list[str], *help_modules) -> None:
    """Runs absl `main` with `define`'s flags on `argv` (program first).

    Args:
      main: the command's `main(argv)`, reading absl's FLAGS.
      define: defines the command's flags on a FlagValues.
      argv: the command line, program name first.
      *help_modules: modules (names) whose flags `--helpshort` lists besides
        the program's own.
    """
    define(flags.FLAGS)
    for module in (__name__,) + help_modules:
        for flag in flags.FLAGS.get_key_flags_for_module(module):
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    cli.run(main, argv=argv[:1] + flagfile_as_config(argv[1:]))
