"""``optimizer.state`` of a fused optimizer: torch's ``defaultdict(dict)``, telling its owner
when anything in it is replaced.

A launch plan holds the addresses of every state tensor it steps. Code that edits the state by
hand (``opt.state[p] = {}``, ``opt.state.clear()``, ``opt.state[p]["exp_avg"] = t``,
``state["step"] = torch.tensor(0.)``, ``del``, ``pop``, ``update``...) must reach the next step,
so every change of an entry drops the owner's plans at once (``on_change``): no plan keeps a
tensor alive, or in use, that ``optimizer.state`` no longer holds, and nothing is checked per
step. Writing back the object an entry already holds (``state[k] = state[k]``) changes nothing.
In-place changes of a tensor's values (``exp_avg.zero_()``) need no new plan and tell nothing;
changes of a tensor's shape or storage in place (``t.data = ...``, ``resize_``, ``set_``) of a
*state* tensor are not seen (of a param they are: the step's key holds its address and element count).

Both classes pickle and deep-copy as the plain ``defaultdict(dict)`` / ``dict`` torch uses,
so a pickled optimizer or state dict holds nothing of ours.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

_MISSING = object()


def _plain_state(entries: dict) -> defaultdict:
    return defaultdict(dict, entries)


class ParamState(dict):
    """One param's state (a dict): any replaced, added or removed entry tells the owner."""

    __slots__ = ("_owner",)

    def __init__(self, owner: OptimizerState, *args, **kwargs):
        self._owner = owner
        super().__init__(*args, **kwargs)

    def __reduce__(self):
        return dict, (dict(self),)

    def __setitem__(self, key, value) -> None:
        if dict.get(self, key, _MISSING) is not value:
            self._owner.changed()
        dict.__setitem__(self, key, value)

    def __delitem__(self, key) -> None:
        dict.__delitem__(self, key)
        self._owner.changed()

    def pop(self, *args):
        self._owner.changed()
        return dict.pop(self, *args)

    def popitem(self):
        self._owner.changed()
        return dict.popitem(self)

    def clear(self) -> None:
        self._owner.changed()
        dict.clear(self)

    def update(self, *args, **kwargs) -> None:
        self._owner.changed()
        dict.update(self, *args, **kwargs)

    def setdefault(self, key, default=None):
        if key not in self:
            self._owner.changed()
        return dict.setdefault(self, key, default)

    def __ior__(self, other):
        self.update(other)
        return self


class OptimizerState(defaultdict):
    """``optimizer.state``: a ``defaultdict`` whose values are :class:`ParamState` (a plain dict
    stored in it is copied into one) and whose every change calls ``on_change``."""

    def __init__(self, on_change: Callable[[], None] | None = None, entries: dict | None = None):
        super().__init__(dict)
        self.on_change = on_change
        for key, value in (entries or {}).items():
            dict.__setitem__(self, key, self._wrap(value))

    def __missing__(self, key) -> ParamState:
        # A new empty entry replaces nothing a plan holds: no notice (its later entries tell).
        value = ParamState(self)
        dict.__setitem__(self, key, value)
        return value

    def _wrap(self, value):
        if isinstance(value, dict) and not (isinstance(value, ParamState) and value._owner is self):
            return ParamState(self, value)
        return value

    def __reduce__(self):
        return _plain_state, ({k: dict(v) if isinstance(v, dict) else v for k, v in self.items()},)

    def __copy__(self):
        return _plain_state(dict(self))

    def changed(self) -> None:
        # A compiled step's own lazy state is traced here: its op keys plans on the tensors it
        # is given, so there is nothing to drop (and a traced notice would hold the optimizer).
        if self.on_change is not None and not torch.compiler.is_compiling():
            self.on_change()

    def __setitem__(self, key, value) -> None:
        wrapped = self._wrap(value)
        if dict.get(self, key, _MISSING) is not value:
            self.changed()
        dict.__setitem__(self, key, wrapped)

    def __delitem__(self, key) -> None:
        dict.__delitem__(self, key)
        self.changed()

    def pop(self, *args):
        self.changed()
        return dict.pop(self, *args)

    def popitem(self):
        self.changed()
        return dict.popitem(self)

    def clear(self) -> None:
        self.changed()
        dict.clear(self)

    def update(self, *args, **kwargs) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return dict.__getitem__(self, key)

    def __ior__(self, other):
        self.update(other)
        return self
