"""The one error type of the analysis: a message the user can act on, printed as one line."""


class AnalysisError(Exception):
    """Raised for problems with the input (store, experiment, runs); the CLI exits 2 with the message."""
