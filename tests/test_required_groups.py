"""skip_or_fail (tests/required_groups.py): a skip on a developer's machine, a failure
under CI=true, so CI cannot pass with whole groups of tests never run."""

from __future__ import annotations

from pathlib import Path

import pytest
from required_groups import in_ci, skip_or_fail


@pytest.mark.parametrize("value", ["true", "TRUE", "1"])
def test_under_ci_a_missing_requirement_fails(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    assert in_ci()
    with pytest.raises(pytest.fail.Exception, match="required under CI=true, but no nft here"):
        skip_or_fail("no nft here")


@pytest.mark.parametrize("value", [None, "", "false", "0"])
def test_elsewhere_a_missing_requirement_skips(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception, match=r"^no nft here$"):
        skip_or_fail("no nft here")


def test_a_failure_under_ci_makes_the_run_fail(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The point of it all: the exit code. A session fixture that cannot have what it
    needs, as tests/netns_fixtures.py's, turns the run red under CI=true, not elsewhere."""
    pytester.syspathinsert(Path(__file__).parent)  # for required_groups
    pytester.makepyfile(
        test_group="""
            import pytest
            from required_groups import skip_or_fail

            @pytest.fixture(scope="session")
            def group_ready():
                skip_or_fail("the group's tool is not installed")

            def test_one(group_ready): pass
            def test_two(group_ready): pass
        """,
    )
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    monkeypatch.delenv("CI")
    result = pytester.runpytest("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(skipped=2)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*the group's tool is not installed*"])
