"""The one error type of the retrieval layer (its own module so that `retrieval.topk` and
`retrieval.backends` can both raise it without importing each other)."""


class RetrievalError(ValueError):
    """Any bad input to the retrieval backends (one-line message naming the problem)."""
