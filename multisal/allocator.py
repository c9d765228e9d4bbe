"""What the process's C allocator does with the large blocks a framework frees.

ms.tune_malloc() (multisal.app.malloc) raises glibc's mmap and trim thresholds and records it
here; a backend whose batches are sized by a memory budget (the torch backend on the CPU) may
then carry larger batches, since freed activations are reused instead of faulted in again.
"""
_tuned = []


def reuses_large_blocks() -> bool:
    """Has this process's allocator been told to keep large freed blocks for reuse?"""
    return bool(_tuned)


def record_tuned() -> None:
    """Called by whatever tuned the allocator (once per process)."""
    if not _tuned:
        _tuned.append(True)
