"""Running the `fmforge` command in-process and checking its one-line errors (RELIABILITY.md)."""

from __future__ import annotations

from fmforge.cli import main


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run `fmforge ARGS` in-process; return (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """Exit 2, exactly one `fmforge: error` line holding every needle, and no traceback."""
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("fmforge: error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
