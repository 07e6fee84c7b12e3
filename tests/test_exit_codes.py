"""The exit codes are a contract with job scripts and sweeps: the numbers README documents."""

from __future__ import annotations

import signal

from so8t.exit_codes import ExitCode, signal_exit_code


def test_exit_codes_are_the_documented_numbers():
    assert {c.name: int(c) for c in ExitCode} == {"OK": 0, "FAILED": 1, "REFUSED": 2, "LOCKED": 3,
                                                  "CHECKPOINTING": 74, "DEADLINE": 75}
    assert signal_exit_code(signal.SIGINT) == 130 and signal_exit_code(signal.SIGTERM) == 143


def test_every_command_refuses_a_bad_argument_with_the_shared_code(tmp_path, capsys):
    from so8t.compare import main as compare_main
    from so8t.export.cli import main as export_main

    assert compare_main([str(tmp_path), "--filter", "no-equals-sign"]) == ExitCode.REFUSED
    assert export_main([str(tmp_path), "--out", str(tmp_path / "o"), "--merge", "--format", "peft"]) == ExitCode.REFUSED
    assert compare_main([str(tmp_path)]) == ExitCode.FAILED  # nothing to compare there
