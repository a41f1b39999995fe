"""The suite's own rules (tests/conftest.py): a test is a unit test or marked integration, and
an integration test whose requirement is missing fails loudly, naming how to install it.

Each case runs an inner pytest session (pytester, in a subprocess: its own `helpers`) with
this suite's conftest and helpers.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

HERE = Path(__file__).resolve().parent


@pytest.fixture
def suite(pytester):
    """An inner test directory with this suite's conftest and helpers, and one requirement
    that is never met."""
    helpers = (HERE / "helpers.py").read_text() + '\nREQUIREMENTS["never"] = (lambda: False, "apt-get install never")\n'
    pytester.makepyfile(helpers=helpers)
    pytester.makeconftest((HERE / "conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    integration: x\n    needs: x\naddopts = --strict-markers -p no:cacheprovider -p no:hypothesispytest -p no:anyio\n")
    return pytester


def test_a_missing_requirement_fails_the_test_with_how_to_install_it(suite):
    suite.makepyfile(test_inner="""
        import pytest

        @pytest.mark.integration
        @pytest.mark.needs("never")
        def test_x():
            raise AssertionError("never reached")
    """)
    result = suite.runpytest_subprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*missing requirement: never (apt-get install never)*"])
    result.stdout.no_fnmatch_line("*never reached*")


def test_needs_without_integration_and_unknown_requirements_are_usage_errors(suite):
    suite.makepyfile(test_inner="""
        import pytest

        @pytest.mark.needs("root")
        def test_x():
            pass
    """)
    result = suite.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_x: needs('root',) but is not marked integration*"])
    suite.makepyfile(test_inner="""
        import pytest

        @pytest.mark.integration
        @pytest.mark.needs("rooot")
        def test_x():
            pass
    """)
    result = suite.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "unknown requirement(s) ['rooot']" in result.stderr.str()


def test_the_etcd_and_cluster_fixtures_make_a_test_integration(suite):
    suite.makepyfile(test_inner="""
        import pytest

        @pytest.fixture(params=["dir", "etcd"])
        def backend(request):
            return request.param

        def test_store(backend):
            pass

        def test_nodes(make_cluster):
            pass

        def test_pure():
            pass
    """)
    result = suite.runpytest_subprocess("-m", "not integration", "-v")
    result.assert_outcomes(passed=2, deselected=2)
    result.stdout.fnmatch_lines(["*test_store?dir? PASSED*", "*test_pure PASSED*"])
    result = suite.runpytest_subprocess("-m", "integration", "--collect-only", "-q")
    result.stdout.fnmatch_lines(["*test_store?etcd?", "*test_nodes", "*2/4 tests collected (2 deselected)*"])
