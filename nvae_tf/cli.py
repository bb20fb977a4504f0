"""How the `python -m nvae_tf.*` commands report a problem the user can fix.

A missing file, a refused action, an input that does not fit, a bad flag
value or a file system that refuses a write (read-only, full, no
permission) is reported as one line on stderr, naming the problem and what
to do, with exit status `EXIT_USER_ERROR`; a traceback there would only
bury the line. The traceback comes back with absl's `--verbosity=1` (debug)
or `--pdb_post_mortem`, for bug reports. Any other exception is a bug and
keeps its traceback.

    def main(argv):
        ...
        raise cli.UserError("--model_dir=runs/a already holds a run; ...")

    if __name__ == "__main__":
        cli.run(main, user_errors=(SomeLibraryError,))
"""

from __future__ import annotations

import errno
import functools
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging

EXIT_USER_ERROR = 1
# File-system errors that mean a wrong path or a missing permission.
FILE_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError,
               NotADirectoryError, PermissionError)
# Other OSError numbers of a file system that refuses a write, with what to
# do. TensorFlow's file errors (tf.errors.OpError) carry only the text of
# the number, so both are matched.
# TensorFlow's op context around an error message.
_OP_CONTEXT = re.compile(r"\{\{function_node [^}]*\}\}|\[Op:\w+\]")
_NO_WRITE = "use a writable location or fix its permissions"
_NO_SPACE = "free some space or use another location"
FILE_SYSTEM_ERRNOS = {errno.EROFS: _NO_WRITE, errno.EACCES: _NO_WRITE,
                      errno.EPERM: _NO_WRITE, errno.ENOSPC: _NO_SPACE,
                      errno.EDQUOT: _NO_SPACE, errno.EFBIG: _NO_SPACE}


class UserError(Exception):
    """A problem with the user's request or input, not with nvae_tf."""


def _file_system_hint(err: BaseException) -> str | None:
    """What to do about a refused write, or None if `err` is not one."""
    if isinstance(err, OSError):
        return FILE_SYSTEM_ERRNOS.get(err.errno)
    tf = sys.modules.get("tensorflow")  # imported by the caller if used
    if tf is not None and isinstance(err, tf.errors.OpError):
        for number, hint in FILE_SYSTEM_ERRNOS.items():
            if os.strerror(number) in err.message:
                return hint
    return None


def one_line(err: BaseException) -> str:
    """The message of `err` on one line (an OSError names its path)."""
    if isinstance(err, OSError) and err.filename is not None:
        text = f"{err.strerror}: {err.filename}"
    elif hasattr(err, "message") and isinstance(err.message, str):
        text = _OP_CONTEXT.sub("", err.message)  # a tf.errors.OpError
    else:
        text = str(err) or type(err).__name__
    hint = _file_system_hint(err)
    if hint is not None and hint not in text:
        text = f"{text.strip().rstrip('.')}; {hint}."
    return " ".join(text.split())


def is_user_error(err: BaseException, user_errors=()) -> bool:
    """Whether `err` is the user's to fix (see the module docstring)."""
    return (isinstance(err, (UserError,) + FILE_ERRORS + tuple(user_errors))
            or _file_system_hint(err) is not None)


def _wants_traceback() -> bool:
    if logging.get_verbosity() >= logging.DEBUG:
        return True
    return flags.FLAGS.is_parsed() and flags.FLAGS["pdb_post_mortem"].value


def report_user_errors(main, user_errors=()):
    """Wraps an absl `main(argv)`: user errors become one line and exit 1.

    Args:
      main: the command's `main(argv)`.
      user_errors: exception types, besides `UserError` and `FILE_ERRORS`,
        that mean a problem with the user's input (e.g. a checkpoint that
        does not fit the model).

    Returns:
      A `main(argv)` for `absl.app.run`.
    """
    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except Exception as err:  # pylint: disable=broad-except
            if not is_user_error(err, user_errors) or _wants_traceback():
                raise
            sys.stderr.write(f"Error: {one_line(err)}\n")
            return EXIT_USER_ERROR

    return wrapped


def parse_flags(argv, flag_values=None):
    """absl's flag parsing with a bad value reported as one line and exit 1
    (absl's own parser adds a second line; `--helpshort` still works).
    Parses into `flag_values`, absl's FLAGS by default."""
    try:
        return (flags.FLAGS if flag_values is None else flag_values)(argv)
    except flags.Error as err:
        sys.stderr.write(f"Error: {one_line(err)} (--helpshort lists the "
                         "flags).\n")
        sys.exit(EXIT_USER_ERROR)


def run(main, user_errors=(), argv=None):
    """`absl.app.run(main, argv)` with `report_user_errors` and
    `parse_flags`."""
    app.run(report_user_errors(main, user_errors), argv=argv,
            flags_parser=parse_flags)
