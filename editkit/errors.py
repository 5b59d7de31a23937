"""The one exception type for user mistakes.

Library code raises `UserError` for anything the user can fix (a bad file, a missing weight
folder, a bad flag). The CLI prints it as a single line and exits with code 2; anything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input. The message says where (file, line, field) and what to do."""

    exit_code = 2
