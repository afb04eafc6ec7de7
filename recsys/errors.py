"""User-facing errors.

Every error a user can cause (a bad file, a wrong flag, a model trained on other data) is raised as
a :class:`RecsysError` whose message names the file / field / row that is wrong and what was
expected. The CLI prints the message on one line and exits non-zero; the library lets it propagate.
"""


class RecsysError(Exception):
    """An error caused by input the user controls; the message says what to fix."""


class DataError(RecsysError):
    """A data file or frame does not match its expected schema or content."""


class AssetError(RecsysError):
    """A dataset or model could not be obtained from any of the sources tried."""
