"""The project's one base class for bad input a user can fix.

A config, a path, a checkpoint, a dataset or a file that cannot be used raises a subclass of
`InputError` whose message names what was wrong; every command prints it as one `error:` line
and exits with status 2 (a traceback is for bugs).
"""


class InputError(ValueError):
    """Bad input a user can fix; the message names the file, field or value and what was expected."""
