"""Errors a user can act on. The CLI prints them as one line and exits 2; nothing else is caught."""


class UsageError(Exception):
    """Input the user can fix (bad file, bad option): printed as one line, exit code 2."""


class ConfigError(UsageError, ValueError):
    """A config value of the wrong type or out of range; the message names `section.field` and the value."""


class DataError(UsageError):
    """A competition file that cannot be used as it is. The message names the file, column and ids/rows."""


class SubmissionError(UsageError):
    """A submission file that Kaggle would reject. The message names the file and the first offending rows."""


class ArtifactError(UsageError):
    """A model artifact that is incomplete or disagrees with the code (template version, manifest fields)."""


def one_line(error: BaseException) -> str:
    """The first paragraph of an exception's text on one line: polars appends its query plan after a blank
    line, which would break the CLI's one-line error."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    return " ".join(text.split("\n\n", 1)[0].split())
