"""Capped text streams that stand in for sys.stdout / sys.stderr during an execution."""

from __future__ import annotations

import io


class CappedWriter(io.TextIOBase):
    """Keeps the first `limit` bytes (UTF-8) written to it and counts the rest."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self._limit = limit
        self._parts: list[str] = []
        self._kept = 0
        self.dropped = 0

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        room = self._limit - self._kept
        if room <= 0:
            # Counting characters, not bytes, keeps a flood cheap; the marker says "about".
            self.dropped += len(s)
            return len(s)
        data = s.encode("utf-8", "replace")
        if len(data) <= room:
            self._parts.append(s)
            self._kept += len(data)
        else:
            self._parts.append(data[:room].decode("utf-8", "ignore"))
            self._kept = self._limit
            self.dropped += len(data) - room
        return len(s)

    def getvalue(self) -> str:
        text = "".join(self._parts)
        if self.dropped:
            text += f"\n[output truncated: about {self.dropped} more bytes dropped]\n"
        return text
