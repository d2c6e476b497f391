"""Progress bars that appear with the first step of the work, so that a mistake found before the work starts (a
missing file, an existing output folder) prints as one line, without an empty bar above it."""

from __future__ import annotations


class Progress:
    """A tqdm bar, created on the first `update` or `set_postfix_str`; takes tqdm's keyword arguments."""

    def __init__(self, **options):
        self._options, self._bar, self._opening = options, None, False

    @property
    def bar(self):
        if self._bar is None:
            from tqdm import tqdm

            self._opening = True
            self._bar = tqdm(**self._options)
        return self._bar

    @property
    def n(self) -> int:
        return self._bar.n if self._bar is not None else 0

    @property
    def total(self) -> int | None:
        return self._options.get("total")

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_postfix_str(self, text: str) -> None:
        self.bar.set_postfix_str(text)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._opening:  # interrupted while tqdm drew its first line: end that line for the error after it
            import sys

            sys.stderr.write("\n")
