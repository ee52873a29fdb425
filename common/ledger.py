"""A hash-chained JSON-lines file: each line holds the SHA-256 of the line before it and of itself.

Line `n` (1-based) is one JSON object with sorted keys and two fields added here: `prev`, the SHA-256 of line
`n-1`'s exact text (line 1: `GENESIS`), and `entry`, the SHA-256 of the object without `entry`. Editing a byte
of a line breaks its `entry` or the next line's `prev`; deleting or inserting a line breaks the `prev` of the line
after the gap. Appends are serialized by an exclusive lock on the file. Removing the last lines, or rewriting the
whole file, is seen only against a copy kept elsewhere (the optional syslog mirror).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import logging.handlers
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64  # the `prev` of a ledger's first line
PREV, ENTRY = "prev", "entry"


def sha256_text(text: str) -> str:
    """Hex SHA-256 of a line's UTF-8 text (without its newline)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _entry_hash(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != ENTRY}
    return sha256_text(json.dumps(body, sort_keys=True))


@dataclass(frozen=True)
class ChainBreak:
    """Where and why a ledger's chain does not verify (`line` is 1-based)."""

    path: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


def syslog_handler(address: str) -> logging.Handler:
    """A syslog handler for `address`: a Unix socket path (`/dev/log`) or `host:port` (UDP)."""
    if address.startswith("/"):
        return logging.handlers.SysLogHandler(address=address)
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"ledger syslog address {address!r}: expected a socket path (/dev/log) or host:port")
    return logging.handlers.SysLogHandler(address=(host, int(port)), socktype=socket.SOCK_DGRAM)


class HashChain:
    """Append-only hash-chained JSON lines at `path`, optionally mirrored line by line to syslog (`syslog`: an
    address for `syslog_handler`)."""

    def __init__(self, path: Path | str, syslog: str | None = None):
        self.path = Path(path)
        self.syslog = syslog or None

    def append(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Chain `entry` to the last line, write it and return it with `prev` and `entry` set."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                handle.seek(0)
                lines = [line for line in handle.read().splitlines() if line.strip()]
                chained = {**entry, PREV: sha256_text(lines[-1]) if lines else GENESIS}
                chained[ENTRY] = _entry_hash(chained)
                text = json.dumps(chained, sort_keys=True)
                handle.seek(0, 2)
                handle.write(text + "\n")
                handle.flush()
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        if self.syslog:
            self._mirror(text)
        return chained

    def _mirror(self, text: str) -> None:
        handler = syslog_handler(str(self.syslog))
        try:
            record = logging.LogRecord("fedslide.egress", logging.INFO, str(self.path), 0, "%s %s", None, None)
            record.args = (self.path, text)
            handler.handle(record)
        finally:
            handler.close()

    def entries(self) -> list[dict[str, Any]]:
        """Every line written so far."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def verify(self) -> ChainBreak | None:
        """The first place the chain does not verify, or None when every line does."""
        return verify_chain(self.path)


def verify_chain(path: Path) -> ChainBreak | None:
    """The first line of `path` that is not JSON, lacks its hashes, was edited (`entry`) or does not follow the
    line before it (`prev`: a line deleted, inserted or edited before it); None when the whole chain verifies."""
    prev = GENESIS
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            return ChainBreak(path, number, f"not a JSON line ({exc.msg})")
        if not isinstance(entry, dict) or not isinstance(entry.get(PREV), str) or not isinstance(entry.get(ENTRY), str):
            return ChainBreak(path, number, f"no {PREV!r}/{ENTRY!r} hashes: not a chained ledger line")
        if entry[PREV] != prev:
            where = "the genesis value" if prev == GENESIS else f"line {number - 1}"
            return ChainBreak(
                path, number, f"'prev' does not match {where} (a line deleted, inserted or edited before this one)"
            )
        if entry[ENTRY] != _entry_hash(entry):
            return ChainBreak(path, number, "'entry' does not match the line's content (the line was edited)")
        prev = sha256_text(line)
    return None
