"""How the `python -m nvae_tf.*` commands report a problem the user can fix.

A missing file, a refused action or an input that does not fit is reported
as one line on stderr, naming the problem and what to do, with exit status
`EXIT_USER_ERROR`; a traceback there would only bury the line. The traceback
comes back with absl's `--verbosity=1` (debug) or `--pdb_post_mortem`, for
bug reports. Any other exception is a bug and keeps its traceback.

    def main(argv):
        ...
        raise cli.UserError("--model_dir=runs/a already holds a run; ...")

    if __name__ == "__main__":
        cli.run(main, user_errors=(SomeLibraryError,))
"""

from __future__ import annotations

import functools
import sys

from absl import app
from absl import flags
from absl import logging

EXIT_USER_ERROR = 1
# File-system errors that mean a wrong path or a missing permission.
FILE_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError,
               NotADirectoryError, PermissionError)


class UserError(Exception):
    """A problem with the user's request or input, not with nvae_tf."""


def one_line(err: BaseException) -> str:
    """The message of `err` on one line (an OSError names its path)."""
    if isinstance(err, OSError) and err.filename is not None:
        text = f"{err.strerror}: {err.filename}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


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
    caught = (UserError,) + FILE_ERRORS + tuple(user_errors)

    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except caught as err:
            if _wants_traceback():
                raise
            sys.stderr.write(f"Error: {one_line(err)}\n")
            return EXIT_USER_ERROR

    return wrapped


def run(main, user_errors=()):
    """`absl.app.run(main)` with `report_user_errors`."""
    app.run(report_user_errors(main, user_errors))
