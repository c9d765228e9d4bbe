"""Progress bars for long work (tqdm, imported only when a bar is shown)."""
from __future__ import annotations

from .frameworks import lazy_import

tqdm_auto = lazy_import("tqdm.auto")


class _Silent:
    """What progress_bar gives when no bar is shown: iterates, updates and closes as tqdm does."""

    def __init__(self, iterable):
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable if self._iterable is not None else ())

    def update(self, _count=1):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        return False


def progress_bar(iterable=None, total=None, desc=None, enabled=False, unit="it"):
    """A tqdm bar over `iterable` (or counting to `total`) when enabled, else a silent stand-in."""
    if not enabled:
        return _Silent(iterable)
    return tqdm_auto.tqdm(iterable, total=total, desc=desc, unit=unit)
