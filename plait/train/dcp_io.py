"""What of ``plait.train.checkpoint`` needs ``torch.distributed.checkpoint`` (DCP), imported only
when a checkpoint is saved or loaded: DCP and the DTensor it brings cost each process ~0.8 s
to import, which a run without checkpoints need not pay.

Loading runs no code from the checkpoint: DCP's pickled metadata is read through an unpickler
that admits an explicit list of DCP's metadata classes (``_allowed_globals``)."""

from __future__ import annotations

import functools
import pickle
import threading
import zlib
from contextlib import contextmanager, nullcontext
from pathlib import Path, PosixPath, PurePosixPath

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from plait.errors import first_line
from plait.parallel.shards import Chunks
from plait.train.checkpoint import CheckpointError


# -- safe loading of DCP's metadata --------------------------------------------------------
def _allowed_globals() -> dict[tuple[str, str], object]:
    """Every global that DCP's pickled metadata names, and nothing else: its dataclasses, torch
    sizes, dtypes and layouts, and the folder path it records. Names are matched whole (no
    dotted lookups inside a module), and the objects come from this table, not from importing."""
    from torch.distributed.checkpoint import metadata as md
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    classes = (md.Metadata, md.MetadataIndex, md.TensorStorageMetadata, md.BytesStorageMetadata,
               md.ChunkStorageMetadata, md.TensorProperties, md.StorageMeta, md._MEM_FORMAT_ENCODING)
    allowed = {("torch.distributed.checkpoint.metadata", c.__name__): c for c in classes}
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = _StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # a name -> layout table
    allowed.update({("pathlib", c.__name__): c for c in (PosixPath, PurePosixPath)})  # builds a path, opens nothing
    allowed.update({("torch", name): v for name, v in vars(torch).items() if isinstance(v, torch.dtype)})
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata; any global outside ``_allowed_globals()`` is refused."""

    allowed: dict[tuple[str, str], object] = {}

    def find_class(self, module: str, name: str):
        if not self.allowed:
            type(self).allowed = _allowed_globals()
        found = self.allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")
        return found


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with the metadata read by ``_MetadataUnpickler`` instead of pickle."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            try:
                metadata = _MetadataUnpickler(stream).load()
            except Exception as exc:  # a refused class, or bytes that are no pickle at all
                raise CheckpointError(f"checkpoint {self.path}: unreadable or unsafe metadata: {first_line(exc)}") from None
        if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
            raise CheckpointError(f"checkpoint {self.path}: metadata is not DCP metadata")
        for info in (metadata.storage_data or {}).values():  # DCP opens these names inside the folder
            name = getattr(info, "relative_path", None)
            if not isinstance(name, str) or name != Path(name).name or name in ("", ".", ".."):
                raise CheckpointError(f"checkpoint {self.path}: metadata names a file outside the checkpoint: {name!r}")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# -- DCP's planners and writer, for our flat state ---------------------------------------------
class SavePlanner(dcp.DefaultSavePlanner):
    """DCP's planner, finding the boxes of ``Chunks`` (DCP looks up plain tensors only). Our
    state is flat already: DCP's flattening would take a ``Chunks`` apart."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index):
        obj = self.state_dict[index.fqn]
        return obj.__get_tensor_shard__(index) if isinstance(obj, Chunks) else super().lookup_object(index)


class LoadPlanner(dcp.DefaultLoadPlanner):
    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        # DCP's own set-up would also materialise meta tensors, and drops any value it does not
        # know (a ``Chunks`` becomes None); ours holds real tensors only.
        self.original_state_dict = self.state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def lookup_tensor(self, index):
        obj = self.state_dict[index.fqn]
        return obj.__get_tensor_shard__(index) if isinstance(obj, Chunks) else super().lookup_tensor(index)


@functools.cache
def _record_crc_off():
    """A context that turns ``torch.save``'s record CRC off in the calling thread alone; None
    where this torch has no such setting, or where its config patches are the process's (older
    torch: torch 2.13's are per thread), for there the writer threads would patch and restore one
    global value in turn and could leave it off. Found out once: patched here, read in a thread."""
    try:
        from torch.utils.serialization import config

        def patch():
            return config.patch({"save.compute_crc32": False})

        seen = []
        with patch():
            reader = threading.Thread(target=lambda: seen.append(config.save.compute_crc32))
            reader.start()
            reader.join()
    except (ImportError, AttributeError, KeyError):  # no such module or setting in this torch
        return None
    return patch if seen == [True] else None


class _HashingStream:
    """A file being written, with the CRC-32 and size of what went into it."""

    def __init__(self, stream):
        self._stream, self.crc, self.size = stream, 0, 0

    def write(self, data) -> int:
        n = self._stream.write(data)
        view = memoryview(data).cast("B")
        self.crc, self.size = zlib.crc32(view, self.crc), self.size + view.nbytes
        return n

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class _HashingFileSystem(FileSystem):
    """DCP's file system, hashing each file as it is written (one pass over the bytes, not a
    second read of the file): ``records`` maps a file's name to its size and CRC-32.

    DCP writes each tensor into the file as a ``torch.save`` zip archive, and ``torch.save``
    hashes every record with a CRC-32 of its own: a second pass over bytes hashed here already
    (0.09 s of CPU per 400 MB, in a 0.45 s save of 400 MB a rank). It is off while a file is
    written, in the writing thread only (``_record_crc_off``); ``torch.load`` reads such records
    unverified, and the manifest's CRC of each file is checked before DCP reads it."""

    def __init__(self):
        super().__init__()
        self.records: dict[str, dict] = {}

    @contextmanager
    def create_stream(self, path, mode: str):
        with super().create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            hashing = _HashingStream(stream)
            with (_record_crc_off() or nullcontext)():
                yield hashing
            self.records[Path(path).name] = {"bytes": hashing.size, "crc32": hashing.crc}

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        if Path(path).name in self.records:  # DCP writes its metadata as .metadata.tmp, then renames it
            self.records[Path(new_path).name] = self.records.pop(Path(path).name)


class HashingWriter(dcp.FileSystemWriter):
    """DCP's writer with files hashed as they are written, each rank's share in ``THREADS``
    files written by as many threads: zlib's CRC-32 and the writes release the GIL, so one
    file's hashing overlaps another's I/O (one thread: 0.95 s for 400 MB a rank on 2 cores;
    four: 0.81; plain DCP without hashing: 0.69)."""

    THREADS = 4

    def __init__(self, path: Path):
        super().__init__(path, thread_count=self.THREADS)
        self.fs = _HashingFileSystem()
