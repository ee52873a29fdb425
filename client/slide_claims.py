"""Claims on slides, so that two preprocessing workers never write the same slide.

A claim is a small JSON file `<claims_dir>/<slide_id>.claim` (owner, host, pid, token, time) on the same shared
file system as the feature files. It is created exclusively and whole (written to a temp file, then `os.link`ed
into place, which fails when the name exists), kept alive by a heartbeat thread that touches its mtime every
`lease / 4` seconds, and removed when the slide is finished. A claim whose mtime is older than the lease belongs to
a dead worker (or a dead driver) and is taken over; so is a claim whose owner is the claimant itself (a Ray task
retried after its worker died keeps its task id). The holder checks, before it renames its feature files into
place, that the claim file still carries its token, so a worker that lost its claim writes nothing.

Files rather than a Ray actor: the claim lives where the outputs live, so it also holds against a second driver
(another `fedslide preprocess` on the same site, another cluster) and survives a driver restart; an actor's
state dies with its job. Staleness compares file mtimes with the local clock: keep the lease well above the
clock skew between nodes.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

CLAIM_SUFFIX = ".claim"
CLAIMS_DIR = ".claims"  # under features/<encoder>/, beside the feature files the claims guard


class ClaimLost(RuntimeError):
    """The claim file no longer carries this holder's token (it went stale and another worker took it)."""


@dataclass(frozen=True)
class ClaimInfo:
    """What a claim file says about its holder."""

    owner: str
    host: str
    pid: int
    token: str
    acquired: float
    age_s: float  # seconds since the last heartbeat


class SlideClaim:
    """A held claim: a heartbeat while in use (context manager), `verify()` before committing, removed on exit."""

    def __init__(self, path: Path, token: str, lease_s: float):
        self.path = path
        self.token = token
        self.lease_s = lease_s
        self.lost_reason = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> SlideClaim:
        self._thread = threading.Thread(target=self._beat, name=f"claim-heartbeat {self.path.name}", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.release()

    @property
    def lost(self) -> bool:
        return bool(self.lost_reason) or not self._ours()

    def _ours(self) -> bool:
        info = _read(self.path)
        return info is not None and info.get("token") == self.token

    def verify(self) -> None:
        """Raise ClaimLost unless the claim file still carries this holder's token."""
        if self.lost_reason:
            raise ClaimLost(self.lost_reason)
        if not self._ours():
            self.lost_reason = f"claim {self.path} was taken over by another worker (its lease ran out)"
            raise ClaimLost(self.lost_reason)

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                self.verify()
                os.utime(self.path)
            except (ClaimLost, OSError) as exc:
                self.lost_reason = self.lost_reason or f"claim {self.path} lost: {exc}"
                return

    def release(self) -> None:
        """Remove the claim file if it is still this holder's."""
        if self._ours():
            self.path.unlink(missing_ok=True)


class ClaimStore:
    """The claim files of one site's preprocessing output, with a lease in seconds."""

    def __init__(self, directory: Path | str, lease_s: float):
        if lease_s <= 0:
            raise ValueError(f"claim lease must be > 0 seconds, got {lease_s}")
        self.directory = Path(directory)
        self.lease_s = float(lease_s)

    def path(self, slide_id: str) -> Path:
        return self.directory / f"{slide_id}{CLAIM_SUFFIX}"

    def holder(self, slide_id: str) -> ClaimInfo | None:
        """Who holds the slide's claim now (None when nobody does)."""
        path = self.path(slide_id)
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        data = _read(path) or {}
        return ClaimInfo(
            owner=str(data.get("owner", "?")),
            host=str(data.get("host", "?")),
            pid=int(data.get("pid", -1)),
            token=str(data.get("token", "")),
            acquired=float(data.get("acquired", 0.0)),
            age_s=time.time() - mtime,
        )

    def live_claims(self) -> dict[str, ClaimInfo]:
        """Slide id -> holder of every claim younger than the lease (a worker is writing that slide now)."""
        found = {}
        for path in sorted(self.directory.glob(f"*{CLAIM_SUFFIX}")) if self.directory.is_dir() else []:
            info = self.holder(path.name[: -len(CLAIM_SUFFIX)])
            if info is not None and info.age_s < self.lease_s:
                found[path.name[: -len(CLAIM_SUFFIX)]] = info
        return found

    def try_claim(self, slide_id: str, owner: str) -> SlideClaim | None:
        """Claim the slide for `owner`; None while another owner holds a live (heartbeating) claim.

        A stale claim (older than the lease) or one held by `owner` itself is taken over.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(slide_id)
        token = secrets.token_hex(8)
        record = {"owner": owner, "host": socket.gethostname(), "pid": os.getpid(), "token": token}
        for _ in range(5):
            if self._create(path, {**record, "acquired": time.time()}):
                return SlideClaim(path, token, self.lease_s)
            try:
                seen = path.stat()
            except FileNotFoundError:
                continue  # released meanwhile: try again
            data = _read(path) or {}
            stale = time.time() - seen.st_mtime > self.lease_s
            if not (stale or data.get("owner") == owner):
                return None
            self._take_over(path, seen, token)
        return None

    @staticmethod
    def _create(path: Path, record: dict[str, object]) -> bool:
        """Put a whole claim file at `path` unless one exists (exclusive: `os.link` fails on an existing name)."""
        tmp = path.with_name(f".{path.name}.{record['token']}.new")
        tmp.write_text(json.dumps(record))
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _take_over(path: Path, seen: os.stat_result, token: str) -> None:
        """Remove the stale claim `seen`; if the file changed since it was looked at, put it back."""
        grave = path.with_name(f".{path.name}.{token}.expired")
        try:
            os.rename(path, grave)
        except FileNotFoundError:
            return  # another claimant moved it first
        moved = grave.stat()
        if (moved.st_ino, moved.st_mtime_ns) != (seen.st_ino, seen.st_mtime_ns):
            try:  # a live holder's heartbeat or a fresh claim: restore it
                os.link(grave, path)
            except FileExistsError:
                pass
        grave.unlink(missing_ok=True)


def claim_store(site_dir: Path, encoder_name: str, lease_s: float) -> ClaimStore:
    """Where a site's slide claims live: beside the feature files they guard."""
    return ClaimStore(Path(site_dir) / "features" / encoder_name / CLAIMS_DIR, lease_s)


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
