"""Run `editkit ...` in the test process (far faster than a subprocess: no start-up)."""


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """`editkit ARGS` in this process: (exit code, stdout, stderr)."""
    from editkit.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
