"""The one error-exit path of the command-line entry points (zsbir/errors.py)."""
from __future__ import annotations

import logging

import pytest

from zsbir.engine.preemption import EXIT_PREEMPTED, PreemptedError
from zsbir.errors import ConfigError, exit_on_user_error, run_cli

log = logging.getLogger("zsbir.test_cli")


def fail(error: Exception):
    raise error


def test_run_cli_logs_a_user_error_as_one_line_and_returns_its_exit_code(caplog):
    with caplog.at_level(logging.ERROR, logger="zsbir.test_cli"):
        assert run_cli(lambda: fail(ConfigError("data.root is null: set data.root=/path")), log) == 1
    assert caplog.messages == ["ConfigError: data.root is null: set data.root=/path"]
    assert caplog.records[0].exc_info is None  # no traceback: the message names the fix
    assert run_cli(lambda: fail(PreemptedError("stopped by SIGTERM")), log) == EXIT_PREEMPTED
    assert run_cli(lambda: None, log) == 0


def test_run_cli_lets_bugs_through_with_their_traceback():
    with pytest.raises(ZeroDivisionError):
        run_cli(lambda: 1 / 0, log)


def test_exit_on_user_error_returns_the_result_or_exits_with_the_errors_status(caplog):
    assert exit_on_user_error(lambda: 0.5, log) == 0.5
    with caplog.at_level(logging.ERROR, logger="zsbir.test_cli"), pytest.raises(SystemExit) as exited:
        exit_on_user_error(lambda: fail(ConfigError("eval.protocols contains 'x'")), log)
    assert exited.value.code == 1 and caplog.messages == ["ConfigError: eval.protocols contains 'x'"]
