"""User errors of the command-line tools: one line and exit 1, or a
traceback with --verbosity=1."""

import errno

from absl import logging
import pytest

from nvae_tf import cli


class _LibraryError(ValueError):
    pass


def _failing(err):
    def main(argv):
        del argv
        raise err
    return main


@pytest.fixture
def verbosity():
    """Sets absl's verbosity for one test and restores it."""
    before = logging.get_verbosity()
    yield logging.set_verbosity
    logging.set_verbosity(before)


def test_user_error_is_one_line_and_exit_1(capsys):
    main = cli.report_user_errors(_failing(cli.UserError(
        "--model_dir=a already holds a run;\n  pass a new --model_dir.")))
    assert main(["prog"]) == cli.EXIT_USER_ERROR == 1
    err = capsys.readouterr().err
    assert err == ("Error: --model_dir=a already holds a run; pass a new "
                   "--model_dir.\n")


def test_missing_file_names_the_path(capsys):
    main = cli.report_user_errors(_failing(FileNotFoundError(
        errno.ENOENT, "PyTorch checkpoint not found", "/data/ckpt.pt")))
    assert main(["prog"]) == 1
    assert capsys.readouterr().err == (
        "Error: PyTorch checkpoint not found: /data/ckpt.pt\n")


def test_listed_library_errors_are_user_errors(capsys):
    main = cli.report_user_errors(_failing(_LibraryError("bad weights")),
                                  user_errors=(_LibraryError,))
    assert main(["prog"]) == 1
    assert capsys.readouterr().err == "Error: bad weights\n"


def test_other_errors_keep_their_traceback():
    main = cli.report_user_errors(_failing(_LibraryError("a bug")))
    with pytest.raises(_LibraryError, match="a bug"):
        main(["prog"])


def test_verbosity_1_shows_the_traceback(capsys, verbosity):
    verbosity(logging.DEBUG)
    main = cli.report_user_errors(_failing(cli.UserError("refused")))
    with pytest.raises(cli.UserError, match="refused"):
        main(["prog"])
    assert capsys.readouterr().err == ""


def test_success_passes_the_return_value_through():
    assert cli.report_user_errors(lambda argv: len(argv))(["a", "b"]) == 2


def test_refused_writes_are_user_errors_with_what_to_do(capsys):
    main = cli.report_user_errors(_failing(OSError(
        errno.EROFS, "Read-only file system", "/mnt/run/config.json")))
    assert main(["prog"]) == 1
    assert capsys.readouterr().err == (
        "Error: Read-only file system: /mnt/run/config.json; use a writable "
        "location or fix its permissions.\n")
    main = cli.report_user_errors(_failing(OSError(
        errno.ENOSPC, "No space left on device", "/mnt/run/ckpt-3.index")))
    assert main(["prog"]) == 1
    assert capsys.readouterr().err.endswith(
        "ckpt-3.index; free some space or use another location.\n")


def test_tensorflow_file_errors_are_user_errors(capsys):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    err = tf.errors.ResourceExhaustedError(
        None, None, "{{function_node __wrapped__SaveV2}} /r/ckpt-1.data; "
        "No space left on device [Op:SaveV2]")
    assert cli.report_user_errors(_failing(err))(["prog"]) == 1
    assert capsys.readouterr().err == (
        "Error: /r/ckpt-1.data; No space left on device; free some space or "
        "use another location.\n")
    # Out of memory is not a file-system error: a traceback.
    oom = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating")
    with pytest.raises(tf.errors.ResourceExhaustedError):
        cli.report_user_errors(_failing(oom))(["prog"])


def test_other_os_errors_keep_their_traceback():
    main = cli.report_user_errors(_failing(ConnectionResetError(
        errno.ECONNRESET, "Connection reset by peer")))
    with pytest.raises(ConnectionResetError):
        main(["prog"])
