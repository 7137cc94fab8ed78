"""Exceptions raised by kvtier.

Every exception an engine may act on derives from :class:`KVTierError`. Input errors also derive from the
matching built-in (``ValueError``, ``KeyError``) so generic handlers keep working. When one of these is raised
the manager's state is unchanged: nothing was allocated, mapped or freed by the failed call.
"""

from __future__ import annotations


class KVTierError(Exception):
    """Base class of every kvtier exception."""


class ConfigError(KVTierError, ValueError):
    """A configuration value is invalid; the message names the field and what to use instead. ``problems``:
    (setting, message) pairs, one per bad setting (the setting is empty where the message names it)."""

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None) -> None:
        self.problems = list(problems) if problems is not None else [("", message)]
        super().__init__(message)


class InvalidArgumentError(KVTierError, ValueError):
    """An argument to a public call is invalid (negative count, layer out of range, unsupported dtype...)."""


class DeviceError(KVTierError):
    """The requested device does not exist or cannot host a kvtier backend."""


class CudaError(KVTierError):
    """A CUDA driver call failed. ``call`` is the driver function, ``code`` the CUDA error name."""

    def __init__(self, call: str, code: str, detail: str = "") -> None:
        self.call, self.code = call, code
        super().__init__(f"{call} failed with {code}" + (f": {detail}" if detail else ""))


class OutOfPagesError(KVTierError):
    """No physical page can be had: the pool's budget is exhausted. The engine can preempt, free or retry."""


class PagesInFlight(OutOfPagesError):
    """Internal: a plan cannot be carried out yet, and nothing was changed. ``handles``: the transfers on pages
    it needs (wait for them); none: the pool is short, but pages on their way down will free enough. The
    manager waits (releasing its lock so that the transfers can commit) and plans again; an engine never sees
    this one. ``again``: the books changed under the plan (cached blocks gave way): plan again at once."""

    def __init__(self, message: str, handles: list | None = None, again: bool = False) -> None:
        self.handles = list(handles or [])
        self.again = again
        super().__init__(message)


class QuotaExceededError(OutOfPagesError):
    """The space would exceed its ``quota_bytes``."""


class SpaceFullError(OutOfPagesError):
    """The space has no free virtual block left: its ``max_tokens`` reservation is used up."""


class TierFullError(KVTierError):
    """A lower tier (host or NVMe) has no free slot left."""


class TransferError(KVTierError):
    """A transfer between tiers failed. The data stayed valid where it was, or the sequences named in
    ``lost`` lost it: free and recompute them."""

    def __init__(self, message: str, lost: list | None = None) -> None:
        self.lost = list(lost or [])
        super().__init__(message)


class UnknownSequenceError(KVTierError, KeyError):
    """The sequence id is not known to this space."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class NotResidentError(KVTierError):
    """A block handed to a step is not backed by a mapped page (raised by the debug residency check)."""


class LedgerError(KVTierError):
    """The device's ledger (``ledger_dir``) could not be locked, read or written; the message says which and what to
    do. The call that raised it changed nothing; a page given back is always given back (the books catch up at
    the next change that can be written)."""


class LedgerBusyError(LedgerError):
    """Another process has held the ledger's lock past the deadline (stopped, or in a debugger); the message names
    it. ``pid``: that process, when known."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        self.pid = pid
        super().__init__(message)


class ClosedError(KVTierError):
    """The manager or space was closed; create a new one."""
