"""The one error type of the retrieval layer (its own module so that `retrieval.topk` and
`retrieval.backends` can both raise it without importing each other)."""

from vlcore.errors import InputError


class RetrievalError(InputError):
    """Any bad input to the retrieval backends (one-line message naming the problem)."""
