"""nanochat.tasks.sandbox: model-written code runs in a separate process that cannot run forever, take all the
memory, reach the network or start processes, and its outcome is reported as passed / failed / timeout."""

import time

import pytest

from nanochat.tasks.sandbox import run_python


def test_clean_exit_passes_and_errors_fail():
    assert run_python("assert sorted([3, 1, 2]) == [1, 2, 3]").status == "passed"
    failed = run_python("def f():\n    return 1\nassert f() == 2, 'wrong answer'")
    assert failed.status == "failed" and failed.returncode == 1 and "AssertionError: wrong answer" in failed.output


@pytest.mark.parametrize("code", ["while True:\n    pass", "import time\ntime.sleep(60)"])
def test_endless_programs_are_stopped(code):
    started = time.monotonic()
    result = run_python(code, timeout_s=1.0)
    assert result.status == "timeout" and not result.passed
    assert time.monotonic() - started < 10


def test_memory_is_capped():
    result = run_python("x = bytearray(2 * 1024**3)\nprint('allocated')", memory_mb=256)
    assert result.status == "failed" and "MemoryError" in result.output and "allocated" not in result.output
    assert run_python("x = bytearray(16 * 1024**2)", memory_mb=256).passed  # ordinary amounts are fine


@pytest.mark.parametrize("code", [
    "import socket\nsocket.socket().connect(('127.0.0.1', 9))",
    "import socket\nsocket.create_connection(('127.0.0.1', 9))",
    "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9')",
    "import os\nos.system('true')",
    "import subprocess\nsubprocess.run(['true'])",
    "import os\nos.fork()",
])
def test_no_network_and_no_processes(code):
    result = run_python(code)
    assert result.status == "failed" and "the sandbox allows no network access and no new processes" in result.output


def test_limits_cannot_be_raised_and_nothing_leaks_in():
    raised = run_python("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))")
    assert raised.status == "failed" and "not allowed to raise maximum limit" in raised.output
    # an empty environment, an empty working directory (only the program), no site-packages on the path
    assert run_python("import os, sys\nassert os.listdir('.') == ['program.py']\nassert 'PATH' not in os.environ\n"
                      "assert not any('site-packages' in p for p in sys.path)").passed


def test_bad_limits_are_refused():
    with pytest.raises(ValueError, match="timeout_s > 0"):
        run_python("pass", timeout_s=0)
