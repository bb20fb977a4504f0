"""Flagfiles shipped with the package, usable by name from any directory.

    nvae-train --flagfile=quickstart        # or quickstart.cfg
    nvae-train --flagfile=configs/cifar10.cfg --data_dir=TFDS_DIR

`--flagfile=NAME` reads NAME from the working directory when it exists there
(absl's own rule); otherwise a bare preset name (`quickstart`,
`quickstart.cfg` or `configs/quickstart.cfg`, the path the repository's
README uses) is the flagfile packaged in `nvae_tf/configs/`. Every command's
`cli()` passes its argv through `resolve_flagfile_args` before absl parses
it, and names the modules whose flags `--help` lists (and, for the trainer's
flags, the groups they are listed in).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

FLAGFILE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            "configs")
FLAGFILE_SUFFIX = ".cfg"
# The repository's folder of presets (a link to FLAGFILE_DIR), so that
# `--flagfile=configs/X.cfg` works outside a checkout too.
REPOSITORY_FOLDER = "configs"
_FLAGFILE_FLAGS = ("--flagfile", "-flagfile")


class FlagfileError(ValueError):
    """A `--flagfile` that is neither a file nor a packaged preset."""


def available() -> list[str]:
    """The names of the packaged flagfiles, sorted (without `.cfg`)."""
    return sorted(name[:-len(FLAGFILE_SUFFIX)]
                  for name in os.listdir(FLAGFILE_DIR)
                  if name.endswith(FLAGFILE_SUFFIX))


def resolve(value: str) -> str:
    """The path a `--flagfile` value names.

    Args:
      value: the flag's value, a path or a preset name.

    Returns:
      `value` when it is an existing file, else the packaged preset's path.

    Raises:
      FlagfileError: `value` is neither.
    """
    if os.path.exists(value):
        return value
    folder, name = os.path.split(value)
    if folder in ("", REPOSITORY_FOLDER):
        if name.endswith(FLAGFILE_SUFFIX):
            name = name[:-len(FLAGFILE_SUFFIX)]
        path = os.path.join(FLAGFILE_DIR, name + FLAGFILE_SUFFIX)
        if name and os.path.isfile(path):
            return path
    raise FlagfileError(
        f"--flagfile={value}: no such file, nor a packaged flagfile; give a "
        f"path or one of: {', '.join(available())}.")


def resolve_flagfile_args(argv: list[str]) -> list[str]:
    """`argv` with each `--flagfile` value resolved by `resolve`.

    Handles `--flagfile=X` and `--flagfile X`; arguments after `--` are left
    alone, as absl leaves them.

    Raises:
      FlagfileError: a value is neither a file nor a packaged preset.
    """
    resolved = list(argv[:1])
    args = iter(argv[1:])
    for arg in args:
        if arg == "--":
            resolved.append(arg)
            resolved.extend(args)
            break
        name, equals, value = arg.partition("=")
        if name in _FLAGFILE_FLAGS and equals:
            arg = f"{name}={resolve(value)}"
        elif arg in _FLAGFILE_FLAGS:
            resolved.append(arg)
            value = next(args, None)
            if value is None:
                break
            arg = resolve(value)
        resolved.append(arg)
    return resolved


def flags_help(help_groups=(), flag_values: flags.FlagValues = flags.FLAGS
               ) -> str:
    """The flag listing of `--help`: the program's key flags, then each
    group's key flags under the group's name as a heading."""
    sections = [flag_values.main_module_help()]
    sections += [flag_values.module_help(group) for group in help_groups]
    return "\n".join(section for section in sections if section)


def _grouped_help_flag(absl_help_flag, help_groups):
    """absl's `--help` (or `--helpshort`) listing `flags_help(help_groups)`.

    absl's own lists the main module's key flags under one heading; this one
    overrides it (absl still defines and documents the flag).
    """

    class GroupedHelpFlag(absl_help_flag):

        def parse(self, arg):
            if self._parse(arg):
                doc = (sys.modules["__main__"].__doc__ or
                       f"\nUSAGE: {sys.argv[0]} [flags]\n")
                sys.stdout.write(f"{doc}\nflags:\n{flags_help(help_groups)}"
                                 "\n\nTry --helpfull to get a list of all "
                                 "flags.\n")
                sys.exit(1)  # absl's --help status.

    flag = GroupedHelpFlag()
    flag.allow_override = True
    return flag


def command_line(*help_modules, help_groups=()) -> list[str]:
    """`sys.argv` with its flagfiles resolved, for `absl.app.run(argv=...)`.

    Exits with a one-line error when a flagfile does not exist.

    Args:
      *help_modules: modules (or names) whose flags `--help` lists. absl's
        `--help` lists the flags of the program's main module, which for a
        console script or a `python -m` shim defines none.
      help_groups: names of flag groups (absl key-flag "modules", e.g. the
        trainer's `flags.HELP_GROUPS`) that `--help` and `--helpshort` list
        after those flags, each under its name as a heading, in this order.
    """
    for module in help_modules:
        for flag in flags.FLAGS.get_key_flags_for_module(module):
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    if help_groups:
        app.define_help_flags()  # absl's first: it would override ours.
        for absl_help_flag in (app.HelpFlag, app.HelpshortFlag):
            flags.DEFINE_flag(_grouped_help_flag(absl_help_flag, help_groups),
                              module_name=app.__name__)
    try:
        return resolve_flagfile_args(sys.argv)
    except FlagfileError as err:
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {err}")
