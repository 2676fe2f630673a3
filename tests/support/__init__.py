"""Test helpers: real servers on loopback (uvicorn in a thread, or a subprocess)."""
