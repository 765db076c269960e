"""One error type for bad user input: the CLI prints it as one line and exits with code 2."""

from __future__ import annotations


class ImtuneError(Exception):
    """A problem the user can fix (bad file, bad option). Never shown with a traceback."""

    exit_code = 2


class InputError(ImtuneError):
    """A bad record in a data file: carries where (file, line or record) and why."""

    def __init__(self, path: str, reason: str, line: int | None = None, record: int | None = None):
        self.path, self.reason, self.line, self.record = str(path), reason, line, record
        super().__init__(self.format())

    def __reduce__(self):
        # Rebuilt from its fields, not from the formatted message, so it survives pickling (a bad record found in a
        # `datasets` worker process reaches the parent as the same one-line error).
        return type(self), (self.path, self.reason, self.line, self.record)

    @property
    def where(self) -> str:
        if self.line is not None:
            return f"{self.path}:{self.line}"
        if self.record is not None:
            return f"{self.path}: record {self.record}"
        return self.path

    def format(self) -> str:
        return f"{self.where}: {self.reason}"
