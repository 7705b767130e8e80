"""The CPU allocator tuning applied by the command-line entry points."""

import ctypes

import pytest

from sparsevl import cli, runtime


def test_tuning_applies_on_glibc_linux():
    assert runtime.tune_cpu_allocator() is True


def test_opt_out_variable_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv(runtime.OPT_OUT_VARIABLE, "1")
    assert runtime.tune_cpu_allocator() is False


def test_a_libc_without_mallopt_is_a_no_op(monkeypatch):
    def no_library(name):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(ctypes, "CDLL", no_library)
    assert runtime.tune_cpu_allocator() is False


def test_the_command_tunes_before_running_a_subcommand(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "tune_cpu_allocator", lambda: calls.append("tuned"))
    monkeypatch.setattr(cli, "run_registered", lambda *args, **kwargs: calls.append("ran") or 0)
    assert cli.main(["data", "--help"]) == 0
    assert calls == ["tuned", "ran"]


@pytest.mark.parametrize("argv", [[], ["--help"]])
def test_usage_does_not_tune(monkeypatch, argv):
    monkeypatch.setattr(cli, "tune_cpu_allocator", lambda: pytest.fail("tuned for --help"))
    assert cli.main(argv) == 0
