"""Feature files held in memory and served while the file on disk is unchanged.

A site's warm SuperExec (`client.superexec`) holds the site's labelled feature files and forks every ClientApp
task from itself, so a task's `load_sites` takes them from memory instead of reading every h5 file again for each
message. A file is served only while its device, inode, size and modification time are the ones it had when it was
read (feature files are written to a temporary name and renamed into place, so a rewritten file is a new inode);
any other file, or one that changed, is read from disk as before.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from fedslide.common.features import FeatureBag, FeatureFileError, read_feature_file

FileStamp = tuple[int, int, int, int]  # device, inode, size, modification time (ns)


def file_stamp(path: Path | str) -> FileStamp | None:
    """What identifies a file's current contents; None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def bag_bytes(bag: FeatureBag) -> int:
    """Memory held by a bag's arrays."""
    arrays = (bag.features, bag.coords, bag.parent, bag.child, bag.tokens)
    return sum(int(a.nbytes) for a in arrays if a is not None)


class FeatureStore:
    """Feature bags read once, up to `max_bytes` of arrays, served while their files are unchanged."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._held: dict[tuple[FileStamp, bool], FeatureBag] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._held)

    @property
    def nbytes(self) -> int:
        """Memory held by every bag."""
        return sum(bag_bytes(b) for b in self._held.values())

    def read(self, path: Path | str, load_tokens: bool = False) -> FeatureBag:
        """The file's bag: the held one when the file is unchanged (a copy of the bag whose arrays are shared),
        else read from disk."""
        stamp = file_stamp(path)
        held = self._held.get((stamp, load_tokens)) if stamp is not None else None
        if held is None:
            self.misses += 1
            return read_feature_file(path, load_tokens=load_tokens)
        self.hits += 1
        return dataclasses.replace(held, path=Path(path), attrs=dict(held.attrs))

    def hold(self, files: list[tuple[Path, bool]]) -> tuple[int, int, int]:
        """Hold these (path, load_tokens) files and drop every other: unchanged ones are kept, new or changed ones
        read, in order, while the total stays within `max_bytes`. Returns (files held, files read now, files left
        on disk)."""
        wanted = [(file_stamp(path), path, tokens) for path, tokens in files]
        keep = {(stamp, tokens) for stamp, _, tokens in wanted if stamp is not None}
        self._held = {key: bag for key, bag in self._held.items() if key in keep}
        total = self.nbytes
        read = left = 0
        for stamp, path, tokens in wanted:
            if stamp is None or (stamp, tokens) in self._held:
                left += stamp is None
                continue
            if total >= self.max_bytes:
                left += 1
                continue
            try:
                bag = read_feature_file(path, load_tokens=tokens)
            except FeatureFileError:  # left to the task that reads it, which reports it
                left += 1
                continue
            size = bag_bytes(bag)
            if total + size > self.max_bytes:
                left += 1
                continue
            self._held[(stamp, tokens)] = bag
            total += size
            read += 1
        return len(self._held), read, left
