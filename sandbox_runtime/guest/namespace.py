"""Hibernation: the user namespace to bytes and back.

What is kept: every variable pickle can carry (by value: data, and instances of classes defined
in cells, which pickle finds in `__main__`), the source of the functions and classes defined
at the top level of cells (re-run on restore, before the data is unpickled), and imported
modules (re-imported by name). What is dropped, by name (reported back): values pickle cannot
carry, such as JS proxies, lambdas, generators, open files, nested functions.
"""

from __future__ import annotations

import importlib
import pickle
import types
from typing import Any

import rlm_repl

from .session import Session

FORMAT_VERSION = 1


def _is_cell_definition(value: object) -> bool:
    if isinstance(value, types.FunctionType):
        return value.__code__.co_filename.startswith((rlm_repl.CELL_PREFIX, "<restored-"))
    return isinstance(value, type) and value.__module__ == "__main__"


def dump(session: Session) -> tuple[bytes, list[str]]:
    """Pickle the user namespace; returns the bytes and the names that had to be dropped."""
    modules: dict[str, str] = {}
    definitions: list[tuple[str, str]] = []
    candidates: dict[str, Any] = {}
    for name, value in list(session.ns.items()):
        if not rlm_repl.is_user_name(name):
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
        },
        protocol=pickle.HIGHEST_PROTOCOL,
    )
    return blob, skipped


def _pickle_tolerantly(values: dict[str, Any]) -> tuple[bytes, list[str]]:
    """Pickle the dict in one go (keeping shared references) after dropping what fails alone."""
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
    outer = pickle.loads(blob)  # noqa: S301 -- unpickled inside the sandbox, never in the supervisor
    if not isinstance(outer, dict) or outer.get("version") != FORMAT_VERSION:
        raise ValueError("not a namespace snapshot of this format version")
    session.repl.reset()
    session.definitions.clear()
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
    return failed


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
