"""Runs LLM-written code in Pyodide sandboxes: one process per session, no keys, no network."""
