"""Data references: datastores and file datasets as script parameters, as in the reference
(``ws.get_default_datastore().as_mount()``, ``Dataset.File.from_files(path).as_named_input('mnist')
.as_mount()``), without a storage service.

A :class:`Datastore` is a directory on a filesystem (usually one every host sees: NFS, Lustre, GPFS);
a :class:`FileDataset` is one or more files or directories. A job consumes either in one of two modes:

* **mount** (``as_mount()``): the path is used in place. Before anything starts, every host is asked
  whether it has the path; the run fails naming the hosts that lack it.
* **download** (``as_download(path_on_compute=None)``): the data is copied once per host before the
  processes start, into node-local scratch (the agent's directory under ``$TMPDIR`` or ``/tmp``, or
  ``path_on_compute``: absolute, or relative to the job's working directory), from the host's own view
  of the path when it has one, else streamed from the launcher; the copy is removed when the run ends
  (kept with ``--keep-remote``).

As a ``script_params`` value (or in ``arguments``, or with ``--data NAME=PATH[:download]`` on the command
line) a reference becomes the placeholder ``{data:NAME}``, replaced on each host by that host's path; the
script also finds every input in ``Run.get_context().input_datasets[NAME]`` (from ``$TFLAUNCH_INPUT_DATASETS``).
The run records each input (name, path, mode, files, bytes, and a content fingerprint for downloads).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

from .errors import SpecError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Iterable, Sequence

__all__ = ["Datastore", "DataReference", "Dataset", "FileDataset", "DatasetConsumptionConfig", "INPUTS_VAR",
           "MOUNT", "DOWNLOAD", "parse_cli", "describe_inputs", "input_datasets"]

INPUTS_VAR = "TFLAUNCH_INPUT_DATASETS"
MOUNT, DOWNLOAD = "mount", "download"
DEFAULT_DATASTORE = "workspacefilestore"
PLACEHOLDER_RE = re.compile(r"\{data:([^{}]*)\}")
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def _path(value: Any, where: str) -> str:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise SpecError(f"{where}: must be a path, got {value!r}")
    return os.path.abspath(os.path.expanduser(os.fspath(value)))


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise SpecError(f"{where}: {value!r} is not a valid input name: use letters, digits, '_', '-' or '.'")
    return value


def _check_mode(mode: str, path_on_compute: Any) -> str | None:
    if path_on_compute is None:
        return None
    if mode != DOWNLOAD:
        raise SpecError("path_on_compute: only with as_download(); a mount is used where it is")
    if not isinstance(path_on_compute, (str, os.PathLike)) or not os.fspath(path_on_compute):
        raise SpecError(f"path_on_compute: must be a path, got {path_on_compute!r}")
    return os.fspath(path_on_compute)


class _Consumable:
    """What every data reference shares: a name, one or more paths, a mode."""

    _name: str
    _paths: list[str]
    _mode: str = MOUNT
    _path_on_compute: str | None = None
    _kind = "datastore"

    def _tflaunch_input(self) -> dict[str, Any]:
        if self._mode == MOUNT and len(self._paths) != 1:
            raise SpecError(f"input {self._name!r}: a dataset of {len(self._paths)} paths cannot be mounted in place; "
                            "use as_download(), which copies them into one directory")
        return {"name": self._name, "paths": list(self._paths), "mode": self._mode,
                "path_on_compute": self._path_on_compute, "kind": self._kind}

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def path_on_compute(self) -> str | None:
        return self._path_on_compute


class DataReference(_Consumable):
    """A path on a :class:`Datastore` and how the job gets it (``mount`` or ``download``)."""

    def __init__(self, datastore: Datastore, data_reference_name: str | None = None,
                 path_on_datastore: str | None = None, mode: str = MOUNT, path_on_compute: str | None = None,
                 overwrite: bool = False) -> None:
        if not isinstance(datastore, Datastore):
            raise SpecError(f"DataReference: datastore must be a Datastore, got {type(datastore).__name__}")
        if mode not in (MOUNT, DOWNLOAD):
            raise SpecError(f"DataReference: mode must be 'mount' or 'download', got {mode!r}")
        self.datastore = datastore
        self.path_on_datastore = path_on_datastore
        if data_reference_name is None:  # a path inside the datastore is an input of its own
            data_reference_name = datastore.name + ("_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", path_on_datastore.strip("/"))
                                                    if path_on_datastore and path_on_datastore.strip("/") else "")
        self.data_reference_name = _name(data_reference_name[:128], "data_reference_name")
        self._name = self.data_reference_name
        self._paths = [datastore._resolve(path_on_datastore)]
        self._mode = mode
        self._path_on_compute = _check_mode(mode, path_on_compute)
        self.overwrite = bool(overwrite)

    def as_mount(self) -> DataReference:
        return DataReference(self.datastore, self.data_reference_name, self.path_on_datastore, MOUNT)

    def as_download(self, path_on_compute: str | None = None, overwrite: bool = False) -> DataReference:
        return DataReference(self.datastore, self.data_reference_name, self.path_on_datastore, DOWNLOAD,
                             path_on_compute, overwrite)

    def path(self, path: str | None = None, data_reference_name: str | None = None) -> DataReference:
        inner = os.path.join(self.path_on_datastore or "", path or "") or None
        return DataReference(self.datastore, data_reference_name, inner, self._mode, self._path_on_compute)

    def __str__(self) -> str:  # what a script would be given on this machine
        return self._paths[0]

    def __repr__(self) -> str:
        return f"DataReference({self._name!r}, {self._paths[0]!r}, mode={self._mode!r})"


class Datastore:
    """A directory that holds data: ``Datastore('/shared/datasets')``; the workspace's default is
    ``Workspace.get_default_datastore()``. ``Datastore(workspace, name)`` looks a datastore up by name, as
    the reference's ``Datastore.get(workspace, name)`` does."""

    def __init__(self, path: Any = None, name: str | None = None, *, workspace: Any = None) -> None:
        if hasattr(path, "datastores") and hasattr(path, "home"):  # Datastore(ws, 'name'): a Workspace
            workspace, path, name = path, None, name
        if path is None:
            if workspace is None:
                raise SpecError("Datastore: give the directory it is, e.g. Datastore('/shared/datasets')")
            found = workspace.datastores.get(name or DEFAULT_DATASTORE)
            if found is None:
                raise SpecError(f"Datastore: workspace {workspace.home} has no datastore {name!r} "
                                f"(it has: {', '.join(sorted(workspace.datastores))})")
            path, name = found.root, found.name
        self.root = _path(path, "Datastore")
        self.name = _name(name or os.path.basename(self.root.rstrip(os.sep)) or DEFAULT_DATASTORE, "Datastore name")

    @staticmethod
    def get(workspace: Any, datastore_name: str) -> Datastore:
        return Datastore(workspace, datastore_name)

    def _resolve(self, path_on_datastore: str | None) -> str:
        if not path_on_datastore:
            return self.root
        if os.path.isabs(path_on_datastore):
            raise SpecError(f"datastore {self.name}: {path_on_datastore!r}: give a path inside the datastore")
        full = os.path.normpath(os.path.join(self.root, path_on_datastore))
        if full != self.root and not full.startswith(self.root.rstrip(os.sep) + os.sep):
            raise SpecError(f"datastore {self.name}: {path_on_datastore!r} leads outside it")
        return full

    def path(self, path: str | None = None, data_reference_name: str | None = None) -> DataReference:
        return DataReference(self, data_reference_name, path)

    def as_mount(self) -> DataReference:
        return DataReference(self, mode=MOUNT)

    def as_download(self, path_on_compute: str | None = None) -> DataReference:
        return DataReference(self, mode=DOWNLOAD, path_on_compute=path_on_compute)

    def upload(self, src_dir: str, target_path: str | None = None, overwrite: bool = False,
               show_progress: bool = True) -> DataReference:
        """Copy the directory ``src_dir`` to ``target_path`` in the datastore; files already there are kept
        unless ``overwrite``."""
        source = _path(src_dir, "upload: src_dir")
        if not os.path.isdir(source):
            raise SpecError(f"upload: {source} is not a directory")
        files = []
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames.sort()
            files += [os.path.join(dirpath, f) for f in sorted(filenames)]
        self.upload_files(files, relative_root=source, target_path=target_path, overwrite=overwrite,
                          show_progress=show_progress)
        return self.path(target_path)

    def upload_files(self, files: Sequence[str], relative_root: str | None = None, target_path: str | None = None,
                     overwrite: bool = False, show_progress: bool = True) -> DataReference:
        """Copy ``files`` (their paths relative to ``relative_root``, default their common directory)."""
        import logging

        log = logging.getLogger(__name__)
        paths = [_path(f, "upload_files") for f in files]
        root = _path(relative_root, "relative_root") if relative_root else (
            os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else self.root)
        dest_root = self._resolve(target_path)
        for i, src in enumerate(paths):
            rel = os.path.relpath(src, root)
            if rel.startswith(".."):
                raise SpecError(f"upload_files: {src} is not under relative_root {root}")
            dest = os.path.join(dest_root, rel)
            if os.path.exists(dest) and not overwrite:
                continue
            try:
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                tmp = f"{dest}.tflaunch-{os.getpid()}"
                shutil.copy2(src, tmp)
                os.replace(tmp, dest)
            except OSError as exc:
                raise SpecError(f"upload to datastore {self.name}: {dest}: {exc.strerror or exc}") from None
            if show_progress:
                log.info("uploaded %s (%d of %d)", rel, i + 1, len(paths))
        return self.path(target_path)

    def __repr__(self) -> str:
        return f"Datastore({self.root!r}, name={self.name!r})"


class FileDataset(_Consumable):
    """Files or directories to give a job (``Dataset.File.from_files(path)``)."""

    _kind = "dataset"

    def __init__(self, paths: list[str], name: str | None = None, mode: str = MOUNT,
                 path_on_compute: str | None = None) -> None:
        self._paths = list(paths)
        self._name = name or "dataset_" + hashlib.sha256("\0".join(paths).encode()).hexdigest()[:8]
        self._mode = mode
        self._path_on_compute = path_on_compute
        self.name = name

    def as_named_input(self, name: str) -> DatasetConsumptionConfig:
        return DatasetConsumptionConfig(_name(name, "as_named_input"), self)

    def as_mount(self, path_on_compute: str | None = None) -> DatasetConsumptionConfig:
        return DatasetConsumptionConfig(self._name, self).as_mount(path_on_compute)

    def as_download(self, path_on_compute: str | None = None) -> DatasetConsumptionConfig:
        return DatasetConsumptionConfig(self._name, self).as_download(path_on_compute)

    def to_path(self) -> list[str]:
        """The dataset's files, as paths relative to its root (as the reference returns them)."""
        out = []
        for path in self._paths:
            if os.path.isdir(path):
                for dirpath, dirnames, filenames in os.walk(path):
                    dirnames.sort()
                    out += ["/" + os.path.relpath(os.path.join(dirpath, f), path).replace(os.sep, "/")
                            for f in sorted(filenames)]
            else:
                out.append("/" + os.path.basename(path))
        return sorted(out)

    def download(self, target_path: str | None = None, overwrite: bool = False) -> list[str]:
        """Copy the dataset's files under ``target_path`` (default: the current directory)."""
        dest = _path(target_path or ".", "target_path")
        written = []
        for path in self._paths:
            for rel, src in _walk_files(path):
                out = os.path.join(dest, rel)
                if os.path.exists(out) and not overwrite:
                    raise SpecError(f"download: {out} exists (give overwrite=True)")
                os.makedirs(os.path.dirname(out), exist_ok=True)
                shutil.copy2(src, out)
                written.append(out)
        return written

    def __repr__(self) -> str:
        return f"FileDataset({self._paths!r})"


class DatasetConsumptionConfig(_Consumable):
    """A named use of a dataset by a job (``ds.as_named_input('mnist').as_mount()``)."""

    _kind = "dataset"

    def __init__(self, name: str, dataset: FileDataset, mode: str = MOUNT, path_on_compute: str | None = None) -> None:
        self.name = self._name = name
        self.dataset = dataset
        self._paths = list(dataset._paths)
        self._mode = mode
        self._path_on_compute = _check_mode(mode, path_on_compute)

    def as_mount(self, path_on_compute: str | None = None) -> DatasetConsumptionConfig:
        if path_on_compute is not None:
            raise SpecError("as_mount(path_on_compute=...): a mount is used where it is; use as_download("
                            "path_on_compute=...) to have a copy at a place of your choosing")
        return DatasetConsumptionConfig(self._name, self.dataset, MOUNT)

    def as_download(self, path_on_compute: str | None = None) -> DatasetConsumptionConfig:
        return DatasetConsumptionConfig(self._name, self.dataset, DOWNLOAD, path_on_compute)

    def __repr__(self) -> str:
        return f"DatasetConsumptionConfig({self._name!r}, {self._paths!r}, mode={self._mode!r})"


class _FileFactory:
    @staticmethod
    def from_files(path: Any, validate: bool = True) -> FileDataset:
        """A dataset of the files/directories ``path``: a path, a ``(Datastore, 'relative/path')`` tuple, a
        :class:`DataReference`, or a list of those. ``validate``: check that they exist on this machine
        (turn it off for paths that only the compute hosts have)."""
        items = path if isinstance(path, list) else [path]
        paths = []
        for i, item in enumerate(items):
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Datastore):
                paths.append(item[0]._resolve(item[1]))
            elif isinstance(item, DataReference):
                paths.append(item._paths[0])
            else:
                paths.append(_path(item, f"from_files: path[{i}]" if len(items) > 1 else "from_files: path"))
        if not paths:
            raise SpecError("from_files: give at least one path")
        if validate:
            missing = [p for p in paths if not os.path.exists(p)]
            if missing:
                raise SpecError(f"from_files: {missing[0]} does not exist on this machine (validate=False if only "
                                "the compute hosts have it)")
        return FileDataset(paths)


class Dataset:
    """``Dataset.File.from_files(path)``, as in the reference (tabular datasets are not supported)."""

    File = _FileFactory

    class Tabular:  # noqa: D106 - the reference's other kind, refused with what to use instead
        @staticmethod
        def from_delimited_files(*_args: Any, **_kwargs: Any) -> None:
            raise SpecError("Dataset.Tabular: not supported; use Dataset.File.from_files(path) and read the files "
                            "in the script (pandas.read_csv, tf.data)")


# -- the job's side ----------------------------------------------------------------------------------------
def is_reference(value: Any) -> bool:
    return isinstance(value, _Consumable)


def placeholder(name: str) -> str:
    return "{data:%s}" % name


def add_input(ref: Any, inputs: list[dict[str, Any]], where: str) -> str:
    """Record ``ref`` among ``inputs`` (once per name) and return its placeholder."""
    item = ref._tflaunch_input()
    for existing in inputs:
        if existing["name"] == item["name"]:
            if existing != item:
                raise SpecError(f"{where}: input {item['name']!r} is already given with another path or mode; "
                                "name them apart with as_named_input(name)")
            return placeholder(item["name"])
    inputs.append(item)
    return placeholder(item["name"])


def parse_cli(values: Iterable[str]) -> list[dict[str, Any]]:
    """``--data NAME=PATH[:download|:mount]`` values as inputs."""
    inputs: list[dict[str, Any]] = []
    for text in values:
        name, sep, rest = text.partition("=")
        if not sep or not name or not rest:
            raise SpecError(f"--data: expected NAME=PATH[:download], got {text!r}")
        mode = MOUNT
        head, colon, tail = rest.rpartition(":")
        if colon and tail in (MOUNT, DOWNLOAD) and head:
            rest, mode = head, tail
        ref = FileDataset([_path(rest, f"--data {name}")]).as_named_input(_name(name, "--data"))
        add_input(ref.as_download() if mode == DOWNLOAD else ref, inputs, f"--data {name}")
    return inputs


def check_placeholders(arguments: Sequence[str], inputs: Sequence[dict[str, Any]]) -> None:
    """SpecError when an argument names an input that is not given."""
    known = {i["name"] for i in inputs}
    for arg in arguments:
        for name in PLACEHOLDER_RE.findall(arg):
            if name not in known:
                shown = ", ".join(sorted(known)) or "none"
                raise SpecError(f"{placeholder(name)} in the script's arguments: no input {name!r} (inputs: {shown}; "
                                "give it with --data NAME=PATH)")


def host_paths(inputs: Sequence[dict[str, Any]], known: dict[str, str] | None) -> dict[str, str]:
    """Each input's path on one host: a mount's own path, a download's copy (``DATA`` until known)."""
    known = known or {}
    return {i["name"]: known.get(i["name"]) or (i["paths"][0] if i["mode"] == MOUNT else "DATA") for i in inputs}


def substitute(arguments: Sequence[str], paths: dict[str, str]) -> list[str]:
    return [PLACEHOLDER_RE.sub(lambda m: paths.get(m.group(1), m.group(0)), arg) for arg in arguments]


def download_dest(item: dict[str, Any], scratch: str, work_dir: str) -> str:
    """Where a download goes on a host: ``path_on_compute`` (relative: to the working directory), else
    the agent's node-local directory."""
    target = item.get("path_on_compute")
    if target:
        return target if os.path.isabs(target) else os.path.join(work_dir, target)
    return os.path.join(scratch, "data", item["name"])


def _walk_files(path: str) -> Iterable[tuple[str, str]]:
    """(relative name, absolute path) of the files under ``path`` (a file: its base name), links as files."""
    if not os.path.isdir(path):
        yield os.path.basename(path), path
        return
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for f in sorted(filenames):
            full = os.path.join(dirpath, f)
            yield os.path.relpath(full, path), full


def describe_inputs(inputs: Sequence[dict[str, Any]], fingerprint: bool = True) -> list[dict[str, Any]]:
    """What the record keeps of each input, counted on this machine: name, path(s), mode, files, bytes,
    and for a download ``sha256`` over the (name, size, content) of every file; counts are None for a
    path this machine does not have."""
    out = []
    for item in inputs:
        row: dict[str, Any] = {"name": item["name"], "path": item["paths"][0] if len(item["paths"]) == 1
                               else list(item["paths"]), "mode": item["mode"], "files": None, "bytes": None}
        if all(os.path.exists(p) for p in item["paths"]):
            digest = hashlib.sha256() if fingerprint and item["mode"] == DOWNLOAD else None
            files = size = 0
            for root in item["paths"]:
                prefix = os.path.basename(root.rstrip(os.sep)) if len(item["paths"]) > 1 else ""
                for rel, full in _walk_files(root):
                    try:
                        st = os.stat(full)
                    except OSError:
                        continue
                    files += 1
                    size += st.st_size
                    if digest is not None:
                        digest.update(f"{os.path.join(prefix, rel)}\0{st.st_size}\0".encode())
                        with open(full, "rb") as fh:
                            for chunk in iter(lambda: fh.read(1 << 20), b""):
                                digest.update(chunk)
            row.update(files=files, bytes=size)
            if digest is not None:
                row["sha256"] = digest.hexdigest()
        out.append(row)
    return out


def input_datasets(env: dict[str, str] | None = None) -> dict[str, str]:
    """The job's inputs on this host, ``{name: path}`` (what ``Run.get_context().input_datasets`` is)."""
    text = (os.environ if env is None else env).get(INPUTS_VAR)
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def layout(paths: Sequence[str]) -> list[tuple[str, str]]:
    """(source, name in the copy) for each path: one directory's contents go at the top, a file (or each
    of several paths) under its base name. The copy on every host and the streamed tar agree on it."""
    if len(paths) == 1 and os.path.isdir(paths[0]):
        return [(paths[0], ".")]
    return [(p, os.path.basename(p.rstrip(os.sep))) for p in paths]


def write_tar(item: dict[str, Any], path: str) -> None:
    """The input as a tar file (for hosts that cannot see it), laid out as :func:`layout` says."""
    import tarfile

    with tarfile.open(path, "w") as tar:
        for source, name in layout(item["paths"]):
            if name == ".":
                for entry in sorted(os.listdir(source)):
                    tar.add(os.path.join(source, entry), arcname=entry)
            else:
                tar.add(source, arcname=name)


# The copy a host's agent runs for a download it can read itself: python -I -S -c COPY_PROGRAM SRC... DEST
# (into DEST.partial, renamed at the end: a half-made copy is never taken for the data).
COPY_PROGRAM = """\
import os, shutil, sys
dest, srcs = sys.argv[-1], sys.argv[1:-1]
tmp = dest + ".partial"
shutil.rmtree(tmp, ignore_errors=True)
os.makedirs(tmp)
for s in srcs:
    top = len(srcs) == 1 and os.path.isdir(s)
    t = tmp if top else os.path.join(tmp, os.path.basename(s.rstrip("/")))
    if os.path.isdir(s):
        shutil.copytree(s, t, dirs_exist_ok=True)
    else:
        shutil.copy2(s, t)
shutil.rmtree(dest, ignore_errors=True)
os.replace(tmp, dest)
"""
