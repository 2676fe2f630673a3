"""Hibernation: the user namespace to bytes and back.

What is kept: every variable pickle can carry (by value: data, and instances of classes defined
in cells, which pickle finds in `__main__`), the source of the functions and classes defined
at the top level of cells (re-run on restore, before the data is unpickled), and imported
modules (re-imported by name). What is dropped, by name (reported back): values pickle cannot
carry, such as JS proxies, lambdas, generators, open files, nested functions.

Contexts: a dump without contexts (the stateless path, whose contexts live in the runtime's
cache) leaves out `context` and `context_<n>` while they are the very objects loaded at that
index; a name the code rebound to something else is kept like any variable. The blob records
which names it left out, and `bind_context(..., rebind=True)` fills exactly those again.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

import rlm_repl

from .session import Session

FORMAT_VERSION = 1


def _is_cell_definition(value: object) -> bool:
    if isinstance(value, types.FunctionType):
        return value.__code__.co_filename.startswith((rlm_repl.CELL_PREFIX, "<restored-"))
    return isinstance(value, type) and value.__module__ == "__main__"


def context_names(index: int) -> tuple[str, ...]:
    """The names the context of `index` is bound to (`rlm_repl.Repl.load_context`)."""
    return (f"context_{index}", "context") if index == 0 else (f"context_{index}",)


def bind_context(session: Session, value: Any, index: int, *, rebind: bool = False) -> None:
    """Load `value` as the context of `index`. With `rebind` (just after `load` of a blob
    dumped without contexts) bind it only where the blob left it out: a name the code had
    rebound keeps the code's value, and an index the blob already holds is left alone."""
    if rebind and index in session.context_holes:
        for name in session.context_holes.pop(index):
            session.ns[name] = value
    elif not (rebind and index in session.contexts):
        session.repl.load_context(value, index)
    session.contexts[index] = value


def _loaded_names(session: Session) -> dict[int, list[str]]:
    """Index -> the names still bound to the very context object loaded at that index."""
    return {
        index: [name for name in context_names(index) if session.ns.get(name) is loaded]
        for index, loaded in session.contexts.items()
    }


def dump(session: Session, *, contexts: bool = True) -> tuple[bytes, list[str]]:
    """Pickle the user namespace; returns the bytes and the names that had to be dropped.

    `contexts=False` leaves out the loaded contexts (see the module's docstring)."""
    import pickle  # here, as in `load`: only a session hibernated imports it, not the snapshot

    loaded = _loaded_names(session)
    left_out = set() if contexts else {name for names in loaded.values() for name in names}
    modules: dict[str, str] = {}
    definitions: list[tuple[str, str]] = []
    candidates: dict[str, Any] = {}
    for name, value in list(session.ns.items()):
        if not rlm_repl.is_user_name(name) or name in left_out:
            continue
        if isinstance(value, types.ModuleType):
            modules[name] = value.__name__
        elif name in session.definitions and _is_cell_definition(value):
            definitions.append((name, session.definitions[name]))
        else:
            candidates[name] = value
    definitions.sort(key=lambda item: list(session.definitions).index(item[0]))
    data, skipped = _pickle_tolerantly(candidates)
    blob = pickle.dumps(
        {
            "version": FORMAT_VERSION,
            "modules": modules,
            "definitions": definitions,
            "data": data,
            "skipped": skipped,
            "cells": session.repl.cells,
            "contexts": loaded,
            "contexts_kept": contexts,
        },
        protocol=pickle.HIGHEST_PROTOCOL,
    )
    return blob, skipped


def _pickle_tolerantly(values: dict[str, Any]) -> tuple[bytes, list[str]]:
    """Pickle the dict in one go (keeping shared references) after dropping what fails alone."""
    import pickle

    try:
        return pickle.dumps(values, protocol=pickle.HIGHEST_PROTOCOL), []
    except Exception:  # noqa: BLE001, S110 -- any user object may fail; found one by one below
        pass
    good: dict[str, Any] = {}
    skipped: list[str] = []
    for name, value in values.items():
        try:
            pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001 -- unpicklable values are dropped and reported
            skipped.append(name)
        else:
            good[name] = value
    return pickle.dumps(good, protocol=pickle.HIGHEST_PROTOCOL), skipped


def load(session: Session, blob: bytes) -> list[str]:
    """Rebuild the namespace from `dump`'s bytes; returns the names that could not be restored."""
    import pickle

    outer = pickle.loads(blob)  # noqa: S301 -- unpickled inside the sandbox, never in the supervisor
    if not isinstance(outer, dict) or outer.get("version") != FORMAT_VERSION:
        raise ValueError("not a namespace snapshot of this format version")
    session.repl.reset()
    session.definitions.clear()
    session.contexts.clear()
    session.context_holes.clear()
    session.repl.cells = int(outer.get("cells", 0))
    failed: list[str] = list(outer.get("skipped", []))
    for name, module_name in outer["modules"].items():
        try:
            session.ns[name] = importlib.import_module(module_name)
        except ImportError:
            failed.append(name)
    pending = _define(session, outer["definitions"])
    session.ns.update(pickle.loads(outer["data"]))  # noqa: S301 -- see above
    # Definitions whose bodies needed restored data (e.g. a class attribute) get a second try.
    failed.extend(name for name, _ in _define(session, pending))
    session.repl.bind_functions()
    session.repl.snapshot_state()  # the restored `state` is the last valid one from now on
    _restore_contexts(session, outer.get("contexts", {}), bool(outer.get("contexts_kept", True)))
    return failed


def _restore_contexts(session: Session, loaded: dict[int, list[str]], kept: bool) -> None:
    """Which objects are the loaded contexts again (kept in the blob), or which names wait
    for them (left out: `bind_context(..., rebind=True)` fills them)."""
    for index, names in loaded.items():
        if not kept:
            session.context_holes[index] = list(names)
        elif names:
            session.contexts[index] = session.ns.get(names[0])
        else:
            # Loaded once, rebound since by the code: nothing is it any more.
            session.contexts[index] = object()


def _define(session: Session, definitions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    pending: list[tuple[str, str]] = []
    for name, source in definitions:
        filename = f"<restored-{name}>"
        rlm_repl.remember_source(filename, source)
        try:
            exec(compile(source, filename, "exec"), session.ns)  # noqa: S102 -- the user's own code
        except Exception:  # noqa: BLE001 -- retried after the data is back, then reported
            pending.append((name, source))
        else:
            session.definitions[name] = source
    return pending
