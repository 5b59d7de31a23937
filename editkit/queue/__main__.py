"""`python -m editkit.queue ARGS` = `editkit queue ARGS`, without loading the other areas."""

import sys

from editkit.errors import UserError
from editkit.queue.commands import queue_app


def main(argv: list[str] | None = None) -> None:
    try:
        queue_app(args=argv, prog_name="editkit queue")
    except UserError as err:
        print(f"editkit: error: {err}", file=sys.stderr)
        sys.exit(UserError.exit_code)


main()
