"""A zarr v3 cache of vision-tokenizer codes, one array per (episode, camera).

Layout on disk (``root`` is the token cache of one dataset, e.g. ``<dataset_root>/tokens``)::

    root/
      <tokenizer_id>/                       zarr v3 group; attributes:
        zarr.json                             format, format_version, tokenizer_id,
                                              grid [h, w], code_dtype (widest written so far)
        episode_000012-observation_images_top-1f3a9c0e/
          zarr.json                         array (T, h, w), uint16 or int32, chunks (16, h, w),
          c/0/0/0 ...                         Blosc zstd; attributes: episode_index, camera
                                              (original name), num_frames, code_dtype, write_id,
                                              source (optional, from the caller)
      .staging/                             temporary directories of writes in flight;
                                              never read, swept by the next writer

Array directory names are ``episode_<index:06d>-<camera with unsafe characters as _>-<8 hex
digits of sha1(camera)>``: deterministic, free of dots, and distinct for distinct cameras.

Identity rule: codes live under ``root/<tokenizer_id>/``, where ``tokenizer_id`` is an opaque hash
of the tokenizer's config and weights computed by the tokenizer. A different tokenizer opens a
different directory, so it can never read another tokenizer's codes. Opening a directory whose
recorded id, grid or format version disagrees with the caller raises ``ValueError`` naming both.

Atomicity: ``write`` builds the complete array (metadata and all chunks) in ``root/.staging/`` and
moves it into the group with ``os.replace``. zarr v3 groups find their children by listing the
directory, so an array appears whole or not at all. Overwriting swaps the new directory with the
old one in a single ``renameat2(RENAME_EXCHANGE)`` on Linux (elsewhere: the old one is renamed
aside first, leaving an instant in which the entry is a miss), then removes the old one. Every
write records a fresh ``write_id``; ``read`` checks it before and after fetching chunks and
repeats a read that overlapped an overwrite, so frames of two versions are never mixed. A writer
that crashes leaves only directories under ``.staging``, which readers never look at and the next
writer removes (once their owning process is gone, or after a day). Nothing is fsynced: this
protects against crashed processes, not against power loss. One writer per entry at a time is
assumed (tokenize each episode in one process).

Laziness: the zarr group handle is opened on first use in each process and dropped when the store
is pickled, so a ``TokenStore`` can be handed to ``torch.utils.data.DataLoader`` workers (fork or
spawn) and each worker opens its own handle. Reads fetch only the chunks holding the requested
frames.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr
from zarr.storage import LocalStore

FORMAT_NAME = "emu_world.token_store"
FORMAT_VERSION = 1
STAGING_DIR = ".staging"
STALE_AFTER_S = 24 * 3600.0  # staging dirs of other hosts (or unparseable names) older than this are swept

_SAFE_ID = re.compile(r"[A-Za-z0-9._-]{1,200}")
_ENTRY = re.compile(r"episode_(\d{6,})-[A-Za-z0-9_-]+-[0-9a-f]{8}")
_READ_ATTEMPTS = 20
_UINT16_LIMIT = 1 << 16
_INT32_LIMIT = 1 << 31

Frames = int | slice | Sequence[int] | np.ndarray | None


def _safe_host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # exists under another user, or not a pid we can judge: keep it
    return True


_RENAME_EXCHANGE = 2  # linux/fs.h
_renameat2: Any = None  # libc's renameat2, looked up on first use; False where unavailable


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE); False when not possible."""
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                _renameat2 = libc.renameat2
                _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                _renameat2.restype = ctypes.c_int
            except (OSError, AttributeError):
                _renameat2 = False
    if not _renameat2 or not b.exists():
        return False
    at_fdcwd = -100
    rc = _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0  # EINVAL (filesystem without support), ENOENT (b vanished): fall back to rename


def entry_name(episode_index: int, camera: str) -> str:
    """Directory name of one (episode, camera) array; deterministic and free of dots."""
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", camera)[:64]
    digest = hashlib.sha1(camera.encode("utf-8")).hexdigest()[:8]
    return f"episode_{episode_index:06d}-{readable}-{digest}"


class TokenStore:
    """Per-episode, per-camera tokenizer codes of one dataset, keyed by the tokenizer's identity.

    ``TokenStore(root, tokenizer_id, grid=None)``: ``grid`` is the code grid (h, w); when None it
    is taken from the existing store or fixed by the first ``write``.
    """

    def __init__(
        self,
        root: str | Path,
        tokenizer_id: str,
        grid: tuple[int, int] | None = None,
        chunk_frames: int = 16,
    ) -> None:
        if not isinstance(tokenizer_id, str) or not _SAFE_ID.fullmatch(tokenizer_id) or tokenizer_id[0] == ".":
            raise ValueError(
                f"tokenizer_id {tokenizer_id!r} is not a safe directory name: use only letters, digits, "
                "'-', '_' and '.', 1 to 200 of them, not starting with '.' (e.g. a hex hash of the tokenizer's "
                "config and weights)"
            )
        if grid is not None:
            if len(grid) != 2 or not all(isinstance(g, (int, np.integer)) and g > 0 for g in grid):
                raise ValueError(f"grid must be two positive ints (h, w), got {grid!r}")
            grid = (int(grid[0]), int(grid[1]))
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        self.root = Path(root)
        self.tokenizer_id = tokenizer_id
        self.path = self.root / tokenizer_id  # the zarr group of this tokenizer
        self.chunk_frames = int(chunk_frames)
        self._grid = grid
        self._handle: zarr.Group | None = None  # opened lazily, once per process
        self._handle_pid: int | None = None
        self._swept = False  # stale staging dirs removed by this instance's first write
        if (self.path / "zarr.json").exists():
            self._open_group(create=False)  # validates id, grid and format now, not at first read

    # ----------------------------------------------------------------- pickling / laziness

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None  # zarr handles are per process: workers reopen on first use
        state["_handle_pid"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"TokenStore(root={str(self.root)!r}, tokenizer_id={self.tokenizer_id!r}, grid={self._grid})"

    @property
    def grid(self) -> tuple[int, int] | None:
        """Code grid (h, w), or None before the first write to a new store."""
        return self._grid

    def _group(self, create: bool = False) -> zarr.Group | None:
        """The group handle of this process; None when the store does not exist and create is False."""
        if self._handle is not None and self._handle_pid == os.getpid():
            return self._handle
        if not create and not (self.path / "zarr.json").exists():
            return None
        return self._open_group(create)

    def _open_group(self, create: bool) -> zarr.Group:
        exists = (self.path / "zarr.json").exists()
        if not exists and not create:
            raise FileNotFoundError(f"no token store at {self.path}")
        if exists:
            group = zarr.open_group(store=LocalStore(self.path), mode="a")
            self._check_attrs(dict(group.attrs))
            if group.attrs.get("grid") is None and self._grid is not None:
                group.attrs.update({"grid": list(self._grid)})  # the caller fixes the grid of an empty store
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            group = zarr.open_group(store=LocalStore(self.path), mode="a")
            group.attrs.update(
                {
                    "format": FORMAT_NAME,
                    "format_version": FORMAT_VERSION,
                    "tokenizer_id": self.tokenizer_id,
                    "grid": list(self._grid) if self._grid is not None else None,
                    "code_dtype": None,
                }
            )
        self._handle, self._handle_pid = group, os.getpid()
        return group

    def _check_attrs(self, attrs: dict[str, Any]) -> None:
        fix = f"use another root, or delete {self.path} to re-encode with this tokenizer"
        if attrs.get("format") != FORMAT_NAME:
            raise ValueError(f"{self.path} is not an emu_world token store (attributes {attrs}); {fix}")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"token store {self.path} has format version {attrs.get('format_version')}, "
                f"this code reads version {FORMAT_VERSION}; {fix}"
            )
        if attrs.get("tokenizer_id") != self.tokenizer_id:
            raise ValueError(
                f"token store {self.path} records tokenizer_id {attrs.get('tokenizer_id')!r}, "
                f"but was opened for {self.tokenizer_id!r}; {fix}"
            )
        recorded = tuple(attrs["grid"]) if attrs.get("grid") is not None else None
        if recorded is not None and self._grid is not None and recorded != self._grid:
            raise ValueError(
                f"token store {self.path} records code grid {recorded} but was opened with grid {self._grid} "
                f"(same tokenizer_id {self.tokenizer_id!r}); {fix}"
            )
        if recorded is not None:
            self._grid = recorded

    # ----------------------------------------------------------------- writing

    def write(
        self,
        episode_index: int,
        camera: str,
        codes: np.ndarray,
        source: dict[str, Any] | None = None,
    ) -> None:
        """Store ``codes`` (T, h, w), non-negative integers, for one episode and camera, atomically.

        Stored as uint16 when every code is < 65536, else int32. ``source`` is an optional
        JSON-serialisable dict kept in the array's attributes (e.g. dataset root, episode length).
        An existing entry is replaced whole.
        """
        episode_index = self._check_key(episode_index, camera)
        codes = np.asarray(codes)
        dtype = self._check_codes(codes, episode_index, camera)
        T, h, w = codes.shape
        attrs: dict[str, Any] = {
            "episode_index": episode_index,
            "camera": camera,
            "num_frames": T,
            "code_dtype": dtype.name,
            "tokenizer_id": self.tokenizer_id,
            "write_id": uuid.uuid4().hex,  # lets readers detect an overwrite during their read
        }
        if source is not None:
            try:
                attrs["source"] = json.loads(json.dumps(source))
            except TypeError as e:
                raise ValueError(f"source must be JSON-serialisable (str, numbers, lists, dicts): {e}") from e

        group = self._group(create=True)
        assert group is not None
        self._update_group_attrs(group, (h, w), dtype)
        staging = self.root / STAGING_DIR
        staging.mkdir(parents=True, exist_ok=True)
        if not self._swept:
            self.sweep_staging()
            self._swept = True

        tmp = staging / self._staging_name("tmp")
        array = zarr.create_array(
            store=LocalStore(tmp),
            shape=(T, h, w),
            dtype=dtype,
            chunks=(min(self.chunk_frames, T), h, w),
            compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"),
            fill_value=0,
            attributes=attrs,
            dimension_names=("frame", "row", "col"),
        )
        array[...] = codes.astype(dtype, copy=False)  # (T, h, w)
        self._move_into_place(tmp, self.path / entry_name(episode_index, camera))

    def _check_codes(self, codes: np.ndarray, episode_index: int, camera: str) -> np.dtype:
        """Refuse codes that are not a non-empty (T, h, w) integer grid of this store; the dtype to store."""
        if codes.ndim != 3:
            raise ValueError(f"codes must have shape (T, h, w), got shape {codes.shape}")
        if not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"codes must have an integer dtype, got {codes.dtype}; pass the tokenizer's code indices")
        T, h, w = codes.shape
        if T == 0:
            raise ValueError(f"codes for episode {episode_index} camera {camera!r} have no frames ({codes.shape})")
        if self._grid is not None and (h, w) != self._grid:
            raise ValueError(
                f"codes have grid {(h, w)} but the store {self.path} holds grid {self._grid}; "
                "a different tokenizer needs its own tokenizer_id"
            )
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0:
            raise ValueError(f"codes must be non-negative, got minimum {lo} (episode {episode_index}, {camera!r})")
        if hi >= _INT32_LIMIT:
            raise ValueError(f"codes must fit int32, got maximum {hi}")
        return np.dtype(np.uint16) if hi < _UINT16_LIMIT else np.dtype(np.int32)

    def _update_group_attrs(self, group: zarr.Group, grid: tuple[int, int], dtype: np.dtype) -> None:
        updates: dict[str, Any] = {}
        if self._grid is None:
            self._grid = grid
            updates["grid"] = list(grid)
        recorded = group.attrs.get("code_dtype")
        if recorded is None or (recorded == "uint16" and dtype.name == "int32"):
            updates["code_dtype"] = dtype.name  # the widest dtype written so far
        if updates:
            group.attrs.update(updates)

    def _move_into_place(self, tmp: Path, final: Path) -> None:
        """Put ``tmp`` at ``final``; an existing ``final`` ends up in staging and is removed after.

        On Linux an existing entry is swapped with ``renameat2(RENAME_EXCHANGE)``, so readers never
        see a miss; elsewhere (or where the filesystem refuses) the old directory is first renamed
        aside, leaving an instant in which the entry is absent.
        """
        if _exchange(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old entry
            return
        trash: list[Path] = []
        for _ in range(5):
            try:
                os.replace(tmp, final)  # fails on a non-empty existing directory (POSIX rename)
                break
            except OSError:
                if not final.exists():
                    raise
                aside = self.root / STAGING_DIR / self._staging_name("old")
                try:
                    os.replace(final, aside)
                    trash.append(aside)
                except FileNotFoundError:
                    pass  # another writer moved it already; try again
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"could not move new codes into {final}: another process keeps writing it")
        for old in trash:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def _staging_name(kind: str) -> str:
        return f"{kind}-{_safe_host()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"

    def sweep_staging(self) -> list[Path]:
        """Remove staging dirs left by crashed writers; returns the removed paths.

        A dir is stale when its writer ran on this host and is gone, or when it is older than
        ``STALE_AFTER_S`` (other hosts, unparseable names).
        """
        staging = self.root / STAGING_DIR
        removed: list[Path] = []
        if not staging.is_dir():
            return removed
        host, now = _safe_host(), time.time()
        for child in staging.iterdir():
            parts = child.name.split("-")
            try:
                same_host, pid = parts[1] == host, int(parts[2])
            except (IndexError, ValueError):
                same_host, pid = False, -1
            try:
                age = now - child.stat().st_mtime
            except FileNotFoundError:
                continue
            if pid == os.getpid() and same_host:
                continue  # ours, in flight
            if (same_host and not _pid_alive(pid)) or age > STALE_AFTER_S:
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
        return removed

    # ----------------------------------------------------------------- reading

    @staticmethod
    def _check_key(episode_index: int, camera: str) -> int:
        if isinstance(episode_index, bool) or not isinstance(episode_index, (int, np.integer)) or episode_index < 0:
            raise ValueError(f"episode_index must be a non-negative int, got {episode_index!r}")
        if not isinstance(camera, str) or not camera:
            raise ValueError(f"camera must be a non-empty string, got {camera!r}")
        return int(episode_index)

    def _array(self, episode_index: int, camera: str) -> zarr.Array | None:
        episode_index = self._check_key(episode_index, camera)
        group = self._group()
        name = entry_name(episode_index, camera)
        if group is None or not (self.path / name / "zarr.json").exists():
            return None
        try:
            array = group[name]
        except (KeyError, FileNotFoundError):
            return None  # replaced between the check and the open
        assert isinstance(array, zarr.Array)
        return array

    def _require(self, episode_index: int, camera: str) -> zarr.Array:
        array = self._array(episode_index, camera)
        if array is None:
            raise KeyError(
                f"no codes for episode {episode_index} camera {camera!r} in {self.path}; "
                "encode the episode with the tokenizer and TokenStore.write first"
            )
        return array

    def has(self, episode_index: int, camera: str, length: int | None = None) -> bool:
        """True when codes are stored and, if ``length`` is given, hold exactly that many frames."""
        array = self._array(episode_index, camera)
        if array is None:
            return False
        return length is None or int(array.shape[0]) == int(length)

    def num_frames(self, episode_index: int, camera: str) -> int:
        """Number of frames T stored for one episode and camera (KeyError when absent)."""
        return int(self._require(episode_index, camera).shape[0])

    def attributes(self, episode_index: int, camera: str) -> dict[str, Any]:
        """The array's attributes: episode_index, camera, num_frames, code_dtype, source."""
        return dict(self._require(episode_index, camera).attrs)

    def read(self, episode_index: int, camera: str, frames: Frames = None) -> np.ndarray:
        """Codes as int64: (T, h, w) for all frames, (n, h, w) for a slice or index array, (h, w) for an int.

        Only the chunks holding the requested frames are read. Negative indices count from the end.
        A read that overlaps an overwrite of the same entry is detected (the entry's ``write_id``
        changed while chunks were read) and repeated, so frames of two versions are never mixed.
        """
        for _ in range(_READ_ATTEMPTS):
            array = self._require(episode_index, camera)
            write_id = array.attrs.get("write_id")
            try:
                out = self._select(array, frames, episode_index, camera)
            except IndexError:
                raise  # a bad request, judged against the metadata just opened
            except Exception:
                if self._write_id(episode_index, camera) == write_id:
                    raise  # not caused by a concurrent overwrite
                continue
            if self._write_id(episode_index, camera) == write_id:
                return out  # the same version was in place before and after every chunk read
        raise RuntimeError(
            f"codes of episode {episode_index} camera {camera!r} in {self.path} kept changing during "
            f"{_READ_ATTEMPTS} reads; stop the process that keeps rewriting them"
        )

    def _write_id(self, episode_index: int, camera: str) -> str | None:
        """The write_id of the version now in place (None when absent), read straight from zarr.json."""
        try:
            with open(self.path / entry_name(episode_index, camera) / "zarr.json", "rb") as f:
                return json.load(f).get("attributes", {}).get("write_id")
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return None

    @staticmethod
    def _select(array: zarr.Array, frames: Frames, episode_index: int, camera: str) -> np.ndarray:
        T = int(array.shape[0])
        if frames is None:
            out = array[...]  # (T, h, w)
        elif isinstance(frames, slice) and frames.step in (None, 1):
            out = array[frames]  # (n, h, w), contiguous: basic indexing
        elif isinstance(frames, (int, np.integer)) and not isinstance(frames, bool):
            i = int(frames)
            if not -T <= i < T:
                raise IndexError(f"frame {i} out of range for episode {episode_index} {camera!r} with {T} frames")
            out = array[i % T]  # (h, w)
        else:
            if isinstance(frames, slice):
                idx = np.arange(T)[frames]
            else:
                idx = np.asarray(frames)
                if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
                    raise IndexError(f"frames must be a 1-D integer array, a slice or an int, got {frames!r}")
                idx = idx.astype(np.int64)
                if idx.size and (idx.min() < -T or idx.max() >= T):
                    raise IndexError(
                        f"frames {idx.tolist()} out of range for episode {episode_index} {camera!r} with {T} frames"
                    )
                idx = idx % T
            if idx.size == 0:
                h, w = array.shape[1:]
                return np.zeros((0, h, w), dtype=np.int64)
            unique, inverse = np.unique(idx, return_inverse=True)  # sorted, deduplicated
            out = array.oindex[unique][inverse]  # (n, h, w)
        return np.asarray(out).astype(np.int64)

    def entries(self) -> list[tuple[int, str]]:
        """All stored (episode_index, camera) pairs, sorted."""
        group = self._group()
        if group is None:
            return []
        found: list[tuple[int, str]] = []
        for child in self.path.iterdir():
            if not _ENTRY.fullmatch(child.name) or not (child / "zarr.json").exists():
                continue
            try:
                array = group[child.name]
            except (KeyError, FileNotFoundError):
                continue  # being replaced
            found.append((int(array.attrs["episode_index"]), str(array.attrs["camera"])))
        return sorted(found)
