"""TokenStore: round trips, dtype choice, identity isolation, atomic writes, lazy worker reads."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from emu_world.data import token_store
from emu_world.data.token_store import STAGING_DIR, TokenStore, entry_name

GRID = (4, 5)
CAM = "observation.images.top"


def codes(T: int, seed: int, high: int = 1024) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, size=(T, *GRID), dtype=np.int64)  # (T, h, w)


def test_round_trip_per_episode_and_camera(tmp_path: Path) -> None:
    store = TokenStore(tmp_path, "tok-abc123", grid=GRID)
    data = {(ep, cam): codes(10 + ep, seed=ep * 7 + i) for ep in (0, 3) for i, cam in enumerate((CAM, "wrist"))}
    for (ep, cam), c in data.items():
        store.write(ep, cam, c, source={"dataset_root": "/data/x", "episode_length": len(c)})
    assert store.entries() == sorted(data)
    for (ep, cam), c in data.items():
        out = store.read(ep, cam)
        assert out.dtype == np.int64 and out.shape == c.shape
        np.testing.assert_array_equal(out, c)
        assert store.num_frames(ep, cam) == len(c)
    attrs = store.attributes(3, CAM)
    assert attrs["camera"] == CAM and attrs["num_frames"] == 13
    assert attrs["source"] == {"dataset_root": "/data/x", "episode_length": 13}
    # dots never reach the directory names; the original name survives in the attributes
    assert "." not in entry_name(3, CAM)
    assert (tmp_path / "tok-abc123" / entry_name(3, CAM) / "zarr.json").exists()
    # a second instance (a new process) sees the same codes and the recorded grid
    again = TokenStore(tmp_path, "tok-abc123")
    assert again.grid == GRID
    np.testing.assert_array_equal(again.read(0, "wrist"), data[(0, "wrist")])


def test_dtype_choice_uint16_vs_int32(tmp_path: Path) -> None:
    store = TokenStore(tmp_path, "tok")
    small = codes(5, 0, high=65536)
    small[0, 0, 0] = 65535
    big = codes(5, 1)
    big[2, 1, 1] = 65536
    store.write(0, CAM, small)
    store.write(1, CAM, big)
    assert store.attributes(0, CAM)["code_dtype"] == "uint16"
    assert store.attributes(1, CAM)["code_dtype"] == "int32"
    group = store._group()
    assert group[entry_name(0, CAM)].dtype == np.uint16
    assert group[entry_name(1, CAM)].dtype == np.int32
    assert group.attrs["code_dtype"] == "int32"  # widest so far
    np.testing.assert_array_equal(store.read(0, CAM), small)
    np.testing.assert_array_equal(store.read(1, CAM), big)
    assert store.grid == GRID  # fixed by the first write


def test_partial_reads(tmp_path: Path) -> None:
    store = TokenStore(tmp_path, "tok", grid=GRID, chunk_frames=4)
    c = codes(37, 5)
    store.write(2, CAM, c)
    idx = np.array([36, 0, 17, 17, -1])
    np.testing.assert_array_equal(store.read(2, CAM, idx), c[idx])
    np.testing.assert_array_equal(store.read(2, CAM, [3, 4]), c[[3, 4]])
    np.testing.assert_array_equal(store.read(2, CAM, slice(5, 20)), c[5:20])
    np.testing.assert_array_equal(store.read(2, CAM, slice(1, 30, 7)), c[1:30:7])
    np.testing.assert_array_equal(store.read(2, CAM, 9), c[9])
    assert store.read(2, CAM, np.array([], dtype=np.int64)).shape == (0, *GRID)
    with pytest.raises(IndexError, match="out of range"):
        store.read(2, CAM, [37])
    with pytest.raises(KeyError, match="TokenStore.write"):
        store.read(9, CAM)


def test_has_with_length(tmp_path: Path) -> None:
    store = TokenStore(tmp_path, "tok", grid=GRID)
    assert not store.has(0, CAM)
    assert store.entries() == []
    store.write(0, CAM, codes(12, 0))
    assert store.has(0, CAM) and store.has(0, CAM, length=12)
    assert not store.has(0, CAM, length=15)  # a re-recorded, longer episode is a miss
    assert not store.has(0, "wrist") and not store.has(1, CAM)


def test_tokenizer_ids_are_isolated(tmp_path: Path) -> None:
    a = TokenStore(tmp_path, "tok-a", grid=GRID)
    b = TokenStore(tmp_path, "tok-b", grid=(2, 2))
    a.write(0, CAM, codes(6, 0))
    assert not b.has(0, CAM) and b.entries() == []
    b.write(0, CAM, np.ones((6, 2, 2), dtype=np.int32))
    assert a.read(0, CAM).shape == (6, *GRID) and b.read(0, CAM).shape == (6, 2, 2)


def test_mismatched_grid_raises(tmp_path: Path) -> None:
    store = TokenStore(tmp_path, "tok", grid=GRID)
    store.write(0, CAM, codes(3, 0))
    with pytest.raises(ValueError, match=r"records code grid \(4, 5\) but was opened with grid \(8, 8\).*delete"):
        TokenStore(tmp_path, "tok", grid=(8, 8))
    with pytest.raises(ValueError, match="grid"):
        store.write(1, CAM, np.zeros((3, 8, 8), dtype=np.int64))


def test_recorded_id_mismatch_raises(tmp_path: Path) -> None:
    TokenStore(tmp_path, "tok-a", grid=GRID).write(0, CAM, codes(3, 0))
    os.rename(tmp_path / "tok-a", tmp_path / "tok-b")  # someone renamed the directory by hand
    with pytest.raises(ValueError, match="records tokenizer_id 'tok-a'.*opened for 'tok-b'"):
        TokenStore(tmp_path, "tok-b")


@pytest.mark.parametrize("bad", ["", "a/b", "..", ".hidden", "tok id", "tök", "a\\b"])
def test_bad_tokenizer_id_raises(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="not a safe directory name"):
        TokenStore(tmp_path, bad)


def test_bad_codes_raise(tmp_path: Path) -> None:
    store = TokenStore(tmp_path, "tok", grid=GRID)
    with pytest.raises(ValueError, match="shape"):
        store.write(0, CAM, np.zeros(GRID, dtype=np.int64))
    with pytest.raises(ValueError, match="integer dtype"):
        store.write(0, CAM, np.zeros((2, *GRID), dtype=np.float32))
    with pytest.raises(ValueError, match="non-negative"):
        store.write(0, CAM, -np.ones((2, *GRID), dtype=np.int64))
    with pytest.raises(ValueError, match="episode_index"):
        store.write(-1, CAM, codes(2, 0))
    assert store.entries() == []


def test_atomic_overwrite(tmp_path: Path) -> None:
    store = TokenStore(tmp_path, "tok", grid=GRID)
    store.write(0, CAM, codes(20, 0))
    new = codes(7, 1, high=100_000)  # shorter, and now int32
    store.write(0, CAM, new)
    np.testing.assert_array_equal(store.read(0, CAM), new)
    assert store.has(0, CAM, length=7) and store.attributes(0, CAM)["code_dtype"] == "int32"
    assert store.entries() == [(0, CAM)]
    assert list((tmp_path / STAGING_DIR).iterdir()) == []  # the old directory was removed after
    chunks = {p.name for p in (tmp_path / "tok" / entry_name(0, CAM) / "c").iterdir()}
    assert chunks == {"0"}  # no chunk of the old 20-frame array survives


def test_overwrite_without_exchange_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(token_store, "_exchange", lambda a, b: False)  # e.g. a filesystem without it
    store = TokenStore(tmp_path, "tok", grid=GRID)
    store.write(0, CAM, codes(9, 0))
    new = codes(9, 1)
    store.write(0, CAM, new)
    np.testing.assert_array_equal(store.read(0, CAM), new)
    assert list((tmp_path / STAGING_DIR).iterdir()) == []


def test_read_overlapping_an_overwrite_is_repeated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = TokenStore(tmp_path, "tok", grid=GRID, chunk_frames=2)
    old, new = codes(8, 0), codes(8, 1)
    store.write(0, CAM, old)
    select, calls = TokenStore._select, []

    def select_then_overwrite(*args: object) -> np.ndarray:
        out = select(*args)
        if not calls:
            store.write(0, CAM, new)  # another process replaces the entry mid-read
        calls.append(1)
        return out

    monkeypatch.setattr(TokenStore, "_select", staticmethod(select_then_overwrite))
    np.testing.assert_array_equal(store.read(0, CAM), new)  # the stale result was discarded
    assert len(calls) == 2


def test_stale_temp_dir_ignored_then_swept(tmp_path: Path) -> None:
    store = TokenStore(tmp_path, "tok", grid=GRID)
    store.write(0, CAM, codes(4, 0))
    # a writer that crashed mid-write: a half-built array in staging, owned by a dead pid
    host = store._staging_name("tmp").split("-")[1]
    stale = tmp_path / STAGING_DIR / f"tmp-{host}-999999999-deadbeef"
    (stale / "c").mkdir(parents=True)
    (stale / "zarr.json").write_text("{ truncated")
    alive = tmp_path / STAGING_DIR / f"tmp-{host}-{os.getppid()}-cafe"  # a live writer's dir stays
    alive.mkdir()
    reader = TokenStore(tmp_path, "tok")
    assert reader.entries() == [(0, CAM)] and reader.has(0, CAM, length=4)
    writer = TokenStore(tmp_path, "tok")
    writer.write(1, CAM, codes(4, 1))
    assert not stale.exists() and alive.exists()
    assert writer.entries() == [(0, CAM), (1, CAM)]


class _Frames(Dataset):
    """One item per (episode, frame): the codes of that frame and the pid that read them."""

    def __init__(self, store: TokenStore, lengths: dict[int, int]) -> None:
        self.store = store
        self.items = [(ep, t) for ep, n in lengths.items() for t in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ep, t = self.items[i]
        frame = self.store.read(ep, CAM, [t])[0]  # (h, w)
        # the handle must belong to this worker, never the parent's
        assert self.store._handle_pid == os.getpid()
        return {"codes": torch.from_numpy(frame), "pid": torch.tensor(os.getpid())}


def test_dataloader_workers_read_lazily(tmp_path: Path) -> None:
    store = TokenStore(tmp_path, "tok", grid=GRID)
    data = {ep: codes(6, ep) for ep in range(3)}
    for ep, c in data.items():
        store.write(ep, CAM, c)
    assert store._handle is not None  # opened in the parent before the workers start
    ds = _Frames(store, {ep: len(c) for ep, c in data.items()})
    loader = DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    batches = list(loader)
    got = torch.cat([b["codes"] for b in batches]).numpy()  # (N, h, w)
    np.testing.assert_array_equal(got, np.concatenate([data[ep] for ep in range(3)]))
    pids = set(torch.cat([b["pid"] for b in batches]).tolist())
    assert os.getpid() not in pids and len(pids) == 2


def test_pickle_round_trip(tmp_path: Path) -> None:
    store = TokenStore(tmp_path, "tok", grid=GRID)
    c = codes(5, 3)
    store.write(4, CAM, c)
    state = store.__getstate__()
    assert state["_handle"] is None
    clone = pickle.loads(pickle.dumps(store))
    assert clone._handle is None and clone.grid == GRID
    np.testing.assert_array_equal(clone.read(4, CAM, [1, 2]), c[1:3])
    assert clone._handle is not None
