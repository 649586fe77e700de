"""Which adapters compute, per thread: ``disable_adapters`` and ``use_adapters`` blocks select, never the
modules. A server calls one model from many threads, each with its own selection: every ``with`` block
adds a :class:`Selection` to its thread's stack and removes exactly that one when it ends (in whatever
order blocks end, none leaks), and a layer or bank reads its thread's selection when it runs.

The state is a ``threading.local``: ``torch.compile`` traces a read of it and guards on its value (it
cannot trace a ``ContextVar``), so a compiled model follows the selection too. A selection is per
thread, not per asyncio task."""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["Selection", "selected", "is_disabled", "rows_of", "refuse_while_selected"]


@dataclass(frozen=True, eq=False)
class Selection:
    """One block's choice: the adapter layers and banks (by ``id``) that compute their base layer alone,
    and per bank (by ``id``) the adapter of every batch row (an object the bank understands)."""

    disabled: frozenset[int] = frozenset()
    rows: Mapping[int, object] = field(default_factory=dict)

    @property
    def modules(self) -> frozenset[int]:
        return self.disabled | frozenset(self.rows)


class _ThreadState(threading.local):
    def __init__(self):
        self.stack: tuple[Selection, ...] = ()
        self.disabled: frozenset[int] = frozenset()
        self.rows: dict[int, object] = {}


_state = _ThreadState()
_live: dict[int, Selection] = {}  # every thread's open blocks, to refuse changing a model one of them selects
_live_lock = threading.Lock()


def _set(stack: tuple[Selection, ...]) -> None:
    rows: dict[int, object] = {}
    for selection in stack:  # inner blocks override outer ones
        rows.update(selection.rows)
    _state.stack, _state.rows = stack, rows
    _state.disabled = frozenset().union(*(s.disabled for s in stack))


@contextlib.contextmanager
def selected(selection: Selection):
    """Within the block, this thread's layers and banks follow ``selection`` too (nested blocks compose)."""
    with _live_lock:
        _live[id(selection)] = selection
    _set(_state.stack + (selection,))
    try:
        yield
    finally:
        _set(tuple(s for s in _state.stack if s is not selection))
        with _live_lock:
            del _live[id(selection)]


def is_disabled(module) -> bool:
    """Whether this thread's selection has ``module`` compute its base layer alone."""
    return id(module) in _state.disabled


def rows_of(bank) -> object | None:
    """This thread's per-row adapters for ``bank``, or None outside any ``use_adapters`` block."""
    return _state.rows.get(id(bank))


def refuse_while_selected(modules: Iterable, what: str) -> None:
    """A RuntimeError while any thread's open block selects one of ``modules``: ``what`` changes them in place,
    and a forward in that block would see them half-changed."""
    ids = {id(m) for m in modules}
    with _live_lock:
        selected_now = any(ids & s.modules for s in _live.values())
    if selected_now:
        raise RuntimeError(f"{what}: a disable_adapters or use_adapters block (in some thread) selects this model's "
                           f"adapters; {what} once every such block has ended")
