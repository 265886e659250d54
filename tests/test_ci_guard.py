"""tests/ci_guard.py: with ZSBIR_CI set, a skip fails unless no CI machine can meet its reason."""
from __future__ import annotations

import pytest

SKIPPING = '''
import pytest

def test_needs_a_browser():
    pytest.skip("no Chromium found")

@pytest.mark.skipif(True, reason="needs a CUDA device")
def test_needs_a_gpu():
    pass

def test_runs():
    assert True
'''


@pytest.mark.parametrize("ci", [False, True])
def test_a_skip_fails_in_ci_unless_its_reason_is_allowed(pytester, monkeypatch, ci):
    if ci:
        monkeypatch.setenv("ZSBIR_CI", "1")
    else:
        monkeypatch.delenv("ZSBIR_CI", raising=False)
    pytester.makepyfile(test_skipping=SKIPPING)
    result = pytester.runpytest("-p", "ci_guard", "-p", "no:cacheprovider", "-rA")
    if ci:
        result.assert_outcomes(passed=1, failed=1, skipped=1)
        result.stdout.fnmatch_lines(["*may not be skipped in CI*no Chromium found*"])
    else:
        result.assert_outcomes(passed=1, skipped=2)


def test_a_module_skipped_at_collection_fails_in_ci(pytester, monkeypatch):
    monkeypatch.setenv("ZSBIR_CI", "1")
    pytester.makepyfile(test_imports='import pytest\npytest.importorskip("no_such_module_zsbir")\n'
                                     'def test_x():\n    pass\n')
    result = pytester.runpytest("-p", "ci_guard", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*may not be skipped in CI*no_such_module_zsbir*"])
    assert result.ret != 0
