"""The results store of a dataset run: chunked arrays (Zarr), a per-image table (Parquet), the settings.

Layout of a store folder ``OUT`` (any fsspec URL the writers can reach; a local path in the tests)::

    OUT/store.json                  settings, model identity, dataset identity, sizes (written first)
    OUT/maps.zarr/                  Zarr v3 group, every array chunked by batch along its first axis:
        rgb                (N, H, W, 3)  uint8    the CLEAR maps (Eq. 6)
        dominant_class     (N, H, W)     int16/32 C(x) (Eq. 4), a class id
        dominant_response  (N, H, W)     float32  D(x) (Eq. 5)
        classes            (N, K)        int32    the class ids of the K maps of each image
        logits             (N, n)        float32
        class_share        (N, n)        float32  each class's share of the image's positive D mass
        thumbnails         (N, h, w, C)  uint8    the input as the model sees it, before mean/std (optional)
        responses          (N, K, H, W)  float32  r(x|c) of the K classes (optional)
    OUT/table/part-00012.parquet    the per-image rows of chunk 12: the chunk's commit record
    OUT/images.parquet              every row, in order, once every chunk is done

A chunk is complete or absent: its arrays are written first and its table part last, atomically (a temp
name, then a rename; on object stores one PUT), so a chunk counts as done exactly when its part exists.
An interrupted run (Ctrl-C, ``kill -9``, a full disk) leaves at most half-written array chunks without a
part; a rerun writes them again. Writing a chunk twice writes the same bytes, so a retried task (a Dask
worker that died after writing) is harmless. Nothing in the store depends on who wrote it or when (no
times, hosts or worker counts), so a cluster writes the same bytes as one process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .reference import ClearmapsError

FORMAT = "clearmaps-results/1"
SETTINGS = "store.json"
ARRAYS = "maps.zarr"
PARTS = "table"
TABLE = "images.parquet"
ZSTD_LEVEL = 3


def part_name(chunk: int) -> str:
    return f"{PARTS}/part-{chunk:05d}.parquet"


# ---- files through fsspec, written atomically ---------------------------------------------------------------

def _fs(url: str):
    import fsspec.core

    return fsspec.core.url_to_fs(str(url))


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def write_atomic(fs, path: str, data: bytes) -> None:
    """``path`` appears whole or not at all: locally a temp file renamed over it (readers and a killed
    writer never see half a file); on an object store a single PUT, which is atomic there."""
    if not _is_local(fs):
        fs.pipe_file(path, data)
        return
    from .render import atomic_write

    # a temp file beside it, renamed over it, with the umask's mode; a failed write names the file
    atomic_write(path, lambda f: f.write(data))


# ---- the store ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArraySpec:
    name: str
    shape: tuple  # per image
    dtype: str


class ResultsStore:
    """A results store at ``url`` (see the module docstring). Open one with :func:`create_store` (a run) or
    :func:`open_store` (reading)."""

    def __init__(self, url: str, settings: dict):
        self.fs, self.root = _fs(str(url).rstrip("/"))
        # a local path as an absolute one: what workers elsewhere are given
        self.url = self.root if _is_local(self.fs) else str(url).rstrip("/")
        self.settings = settings
        self.count = int(settings["count"])
        self.chunk_size = int(settings["chunk_size"])
        self.specs = [ArraySpec(a["name"], tuple(a["shape"]), a["dtype"]) for a in settings["arrays"]]
        self._group = None

    # -- layout
    @property
    def chunks(self) -> int:
        return -(-self.count // self.chunk_size)

    def bounds(self, chunk: int) -> tuple[int, int]:
        return chunk * self.chunk_size, min(self.count, (chunk + 1) * self.chunk_size)

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    # -- arrays
    def group(self, mode: str = "r+"):
        if self._group is None:
            import zarr
            from zarr.storage import FsspecStore, LocalStore

            store = LocalStore(self._path(ARRAYS)) if _is_local(self.fs) else \
                FsspecStore(self.fs, path=self._path(ARRAYS))
            self._group = zarr.open_group(store=store, mode=mode)
        return self._group

    def _create_arrays(self) -> None:
        import zarr
        from zarr.codecs import ZstdCodec
        from zarr.storage import FsspecStore, LocalStore

        store = LocalStore(self._path(ARRAYS)) if _is_local(self.fs) else FsspecStore(self.fs, path=self._path(ARRAYS))
        group = zarr.open_group(store=store, mode="w")
        for spec in self.specs:
            group.create_array(spec.name, shape=(self.count,) + spec.shape, chunks=(self.chunk_size,) + spec.shape,
                               dtype=spec.dtype, compressors=ZstdCodec(level=ZSTD_LEVEL), fill_value=0,
                               # every chunk is a file, even all zeros: a rewritten chunk replaces the old one
                               config={"write_empty_chunks": True})
        self._group = None

    def done(self) -> set[int]:
        """The chunks whose table part exists (their arrays were written before it)."""
        try:
            names = self.fs.ls(self._path(PARTS), detail=False)
        except FileNotFoundError:
            return set()
        done = set()
        for name in names:
            base = name.rsplit("/", 1)[-1]
            if base.startswith("part-") and base.endswith(".parquet"):
                try:
                    done.add(int(base[5:-8]))
                except ValueError:
                    continue
        return {c for c in done if c < self.chunks}

    def write_chunk(self, chunk: int, arrays: dict, table) -> None:
        """Write chunk ``chunk``'s arrays, then its table part (the commit)."""
        import io

        import pyarrow.parquet as pq

        start, stop = self.bounds(chunk)
        group = self.group()
        for spec in self.specs:
            a = np.ascontiguousarray(arrays[spec.name], dtype=spec.dtype)
            if a.shape != (stop - start,) + spec.shape:
                raise ClearmapsError(f"chunk {chunk}: array {spec.name} has shape {a.shape}; expected "
                                     f"{(stop - start,) + spec.shape}.")
            group[spec.name][start:stop] = a
        if table.num_rows != stop - start:
            raise ClearmapsError(f"chunk {chunk}: {table.num_rows} table rows for {stop - start} images.")
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        write_atomic(self.fs, self._path(part_name(chunk)), buf.getvalue())

    def finish(self) -> bool:
        """Write images.parquet (every part, in order) when every chunk is done; True when written."""
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        if len(self.done()) != self.chunks:
            return False
        parts = [pq.read_table(self.fs.open(self._path(part_name(c)), "rb")) for c in range(self.chunks)]
        buf = io.BytesIO()
        pq.write_table(pa.concat_tables(parts), buf, compression="zstd")
        write_atomic(self.fs, self._path(TABLE), buf.getvalue())
        return True

    # -- reading
    def table(self):
        """The per-image table (pyarrow Table) of the chunks done so far, in order."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.fs.exists(self._path(TABLE)):
            return pq.read_table(self.fs.open(self._path(TABLE), "rb"))
        parts = [pq.read_table(self.fs.open(self._path(part_name(c)), "rb")) for c in sorted(self.done())]
        if not parts:
            raise ClearmapsError(f"the store {self.url!r} holds no finished chunk yet; run clearmaps explain first.")
        return pa.concat_tables(parts)

    def array(self, name: str):
        """The Zarr array ``name`` (read it with slices, a chunk at a time)."""
        group = self.group("r")
        if name not in group:
            raise ClearmapsError(f"the store {self.url!r} has no array {name!r}; it has "
                                 f"{sorted(group.array_keys())}.")
        return group[name]


def _describe_difference(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += _describe_difference(a, b, f"{prefix}{key}.")
        else:
            show = lambda v: (repr(v) if len(repr(v)) < 60 else repr(v)[:57] + "...")  # noqa: E731
            out.append(f"{prefix}{key}: {show(a)} then, {show(b)} now")
    return out


def _dumps(settings: dict) -> bytes:
    return (json.dumps(settings, indent=1, sort_keys=True, default=str) + "\n").encode()


def read_settings(url: str) -> dict | None:
    fs, root = _fs(url)
    path = f"{str(root).rstrip('/')}/{SETTINGS}"
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "rb") as f:
            settings = json.loads(f.read().decode())
    except (OSError, ValueError) as exc:
        raise ClearmapsError(f"{url}/{SETTINGS} could not be read ({exc}); choose another output folder or "
                             "--force to start over.") from None
    if not isinstance(settings, dict) or settings.get("format") != FORMAT:
        raise ClearmapsError(f"{url} is not a clearmaps results store ({SETTINGS} is not of the format {FORMAT}).")
    return settings


def create_store(url: str, settings: dict, force: bool = False) -> ResultsStore:
    """Open the store at ``url`` for a run with ``settings`` (a dict with "count", "chunk_size", "arrays"
    and whatever the results depend on). A store made with the same settings is resumed (its done chunks
    are kept); one made with other settings is refused. ``force`` deletes what the store holds and starts
    over."""
    settings = json.loads(_dumps({**settings, "format": FORMAT}))  # as it will read back
    fs, root = _fs(url)
    root = str(root).rstrip("/")
    old = read_settings(url)
    if old is not None and old != settings:
        if not force:
            diff = _describe_difference(old, settings)
            raise ClearmapsError(f"{url} holds results made with other settings ({'; '.join(diff[:4])}"
                                 f"{'; ...' if len(diff) > 4 else ''}); --force starts over (deleting them), or "
                                 "choose another output folder.")
    if force or old is None or old != settings:
        for name in (TABLE, PARTS, ARRAYS, SETTINGS):  # only what a store holds, never the folder around it
            path = f"{root}/{name}"
            if fs.exists(path):
                fs.rm(path, recursive=True)
        fs.makedirs(root, exist_ok=True)
        store = ResultsStore(url, settings)
        store._create_arrays()
        fs.makedirs(f"{root}/{PARTS}", exist_ok=True)
        write_atomic(fs, f"{root}/{SETTINGS}", _dumps(settings))  # last: arrays exist whenever it does
        return store
    fs.makedirs(f"{root}/{PARTS}", exist_ok=True)
    return ResultsStore(url, settings)


def open_store(url: str) -> ResultsStore:
    """A store written by ``clearmaps explain``, for reading."""
    settings = read_settings(url)
    if settings is None:
        raise ClearmapsError(f"{url} is not a clearmaps results store (no {SETTINGS}); give the --out folder of a "
                             "clearmaps explain run on a dataset.")
    return ResultsStore(url, settings)
