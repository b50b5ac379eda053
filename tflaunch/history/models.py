"""The model registry: named, versioned copies of model files under the tflaunch home (Azure ML SDK v1 ``Model``).

Layout, under ``$TFLAUNCH_HOME`` (default ``~/.tflaunch``)::

    models/<name>/<version>/            appears complete (one rename), never changes afterwards
        model.json                      metadata and manifest (written before the version appears)
        files/<basename>                the registered file, or directory tree, under its own base name:
                                        files/model.keras, files/model/saved_model.pb, ...
    models/<name>/.new-<random>/        staging: invisible to readers; all a SIGKILL can leave behind

``model.json``: ``name``, ``version`` (int), ``created`` (ISO 8601 UTC), ``description``, ``tags``
(str -> str), ``properties`` (str -> str or number), ``source_run`` (``{"id", "experiment", "path"}`` or
null), ``basename``, ``type`` (``file`` | ``directory``), ``files`` (``[{"path", "size", "sha256"}]``, paths
relative to ``files/``, ``/``-separated, sorted), ``links`` (``[{"path", "target"}]``, symbolic links kept
in a registered tree), ``size`` (bytes, all files), ``tflaunch_version``.

How a version is written (copies or hard links, symbolic links, lock-free version numbers):
:mod:`tflaunch.history.model_staging`.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
import shutil

from .. import fsio
from .._version import __version__
from ..errors import ModelNotFoundError, PathSafetyError, SpecError, StoreError
from .model_staging import CHUNK, STAGING_PREFIX, Stager, publish, remove_stale_staging, version_numbers
from .store import EXPERIMENT_RE, Store, now_iso, resolve_home

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Iterable

    from .store import RunRecord

__all__ = ["Model", "ModelNotFoundError", "register", "register_from_run", "parse_ref", "validate_model_name"]

log = logging.getLogger(__name__)

MODELS_DIR = "models"


# -- validation ----------------------------------------------------------------------------------------
def validate_model_name(name: Any) -> str:
    """Return ``name`` if it is a valid model name (the experiment-name rule), else raise SpecError."""
    if not isinstance(name, str) or not EXPERIMENT_RE.match(name):
        raise SpecError(f"model name {name!r} is invalid: use 1-255 letters, digits, '_', '-' or '.', "
                        "starting with a letter or digit")
    return name


def _validate_version(version: Any) -> int | None:
    if version is None:
        return None
    if isinstance(version, str) and version.isdigit() and version.isascii():
        version = int(version)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise SpecError(f"model version {version!r} is invalid: give a whole number >= 1 (or none for the latest)")
    return version


def _validate_tags(tags: Any) -> dict[str, str]:
    if tags is None:
        return {}
    if not isinstance(tags, dict):
        raise SpecError(f"model tags must be a dict of str to str, not {type(tags).__name__}")
    for key, value in tags.items():
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise SpecError(f"model tag {key!r}: {value!r} is invalid: tags map non-empty strings to strings "
                            "(write numbers as strings, e.g. {'epochs': '10'})")
    return dict(tags)


def _validate_properties(properties: Any) -> dict[str, Any]:
    if properties is None:
        return {}
    if not isinstance(properties, dict):
        raise SpecError(f"model properties must be a dict of str to str or number, not {type(properties).__name__}")
    for key, value in properties.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not isinstance(key, str) or not key or not (isinstance(value, str) or number) \
                or (isinstance(value, float) and not math.isfinite(value)):
            raise SpecError(f"model property {key!r}: {value!r} is invalid: properties map non-empty strings to "
                            "strings or finite numbers")
    return dict(properties)


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``"NAME"`` -> (NAME, None) (the latest version); ``"NAME:VERSION"`` -> (NAME, VERSION)."""
    if not isinstance(ref, str) or not ref:
        raise SpecError(f"model {ref!r} is invalid: give NAME or NAME:VERSION")
    name, sep, version = ref.partition(":")
    if sep and not version:
        raise SpecError(f"model {ref!r} is invalid: give NAME or NAME:VERSION (a version after ':')")
    validate_model_name(name)
    if not sep or version == "latest":
        return name, None
    if not (version.isdigit() and version.isascii()) or int(version) < 1:
        raise SpecError(f"model {ref!r} is invalid: the version after ':' must be a whole number >= 1")
    return name, int(version)


def _home_of(workspace_or_home: Any) -> str:
    """A home from a Workspace (anything with ``.home``), a path, or None (the default home)."""
    if workspace_or_home is not None and not isinstance(workspace_or_home, (str, os.PathLike)):
        home = getattr(workspace_or_home, "home", None)
        if home is None:
            raise TypeError(f"expected a Workspace or a home directory, not {type(workspace_or_home).__name__}")
        workspace_or_home = home
    return resolve_home(workspace_or_home)


def _models_root(home: str) -> str:
    return os.path.join(home, MODELS_DIR)


# -- registering ---------------------------------------------------------------------------------------
def _register(home: Any, name: str, source: str, base: str, *, tags: Any, properties: Any,
              description: Any, source_run: dict[str, Any] | None, shown: str) -> Model:
    validate_model_name(name)
    tags = _validate_tags(tags)
    properties = _validate_properties(properties)
    if description is not None and not isinstance(description, str):
        raise SpecError(f"model description must be a string, not {type(description).__name__}")
    if source_run is not None and not isinstance(source_run, dict):
        raise SpecError("source_run must be a dict {'id', 'experiment', 'path'} or None")
    source = os.path.realpath(source)  # a link given as the source itself is followed
    if os.path.isdir(source):
        kind = "directory"
    elif os.path.isfile(source):
        kind = "file"
    elif os.path.lexists(source):
        raise SpecError(f"cannot register {shown}: it is not a regular file or directory")
    else:
        raise SpecError(f"cannot register {shown}: no such file or directory")
    store = Store(_home_of(home))
    models_root = os.path.realpath(_models_root(store.home))
    if kind == "directory" and (models_root == source or models_root.startswith(source.rstrip(os.sep) + os.sep)):
        raise SpecError(f"cannot register {shown}: it contains the model registry {models_root}")
    store.ensure()
    name_dir = os.path.join(_models_root(store.home), name)
    staging = os.path.join(name_dir, STAGING_PREFIX + os.urandom(8).hex())
    try:
        os.makedirs(name_dir, exist_ok=True)
        remove_stale_staging(name_dir)
        os.mkdir(staging)
        stager = Stager(staging, source)
        os.mkdir(stager.files_dir)
        if kind == "directory":
            stager.add_tree(source, base)
        else:
            stager.add_file(source, base)
        metadata = {
            "name": name, "version": None, "created": now_iso(), "description": description,
            "tags": tags, "properties": properties,
            "source_run": dict(source_run) if source_run is not None else None,
            "basename": base, "type": kind,
            "files": stager.files, "links": stager.links, "size": sum(f["size"] for f in stager.files),
            "tflaunch_version": __version__,
        }
        version = publish(staging, name_dir, metadata)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            hint = " (the disk is full)" if fsio.is_disk_full(exc) else ""
            where = f" ({exc.filename})" if exc.filename else ""
            raise StoreError(f"cannot register model {name!r} in {store.home}: "
                             f"{exc.strerror or exc}{where}{hint}") from None
        raise
    log.info("registered model %s version %d (%d files, %d hard-linked, %d copied)", name, version,
             len(stager.files), stager.hard_links, stager.copies)
    return Model._from_dict(store.home, metadata)


# -- public API ----------------------------------------------------------------------------------------
def register(home: Any, name: str, source: str | os.PathLike, *, tags: dict[str, str] | None = None,
             properties: dict[str, Any] | None = None, description: str | None = None,
             source_run: dict[str, Any] | None = None) -> Model:
    """Register a local file or directory ``source`` as the next version of model ``name``.

    ``home``: a tflaunch home, a Workspace, or None (``$TFLAUNCH_HOME``, else ``~/.tflaunch``).
    """
    if not isinstance(source, (str, os.PathLike)) or os.fspath(source) == "":
        raise SpecError(f"model source {source!r} is invalid: give the path of a file or directory")
    path = os.path.abspath(os.fspath(source))
    base = os.path.basename(path.rstrip(os.sep))
    if not base:
        raise SpecError(f"cannot register {os.fspath(source)!r}: give a file or directory below /")
    return _register(home, name, path, base, tags=tags, properties=properties, description=description,
                     source_run=source_run, shown=os.fspath(source))


def register_from_run(record: RunRecord, name: str, model_path: str, *, tags: dict[str, str] | None = None,
                      properties: dict[str, Any] | None = None, description: str | None = None) -> Model:
    """Register file or directory ``model_path`` of a run (relative to its record, e.g.
    ``outputs/model.keras``) as the next version of model ``name``; the run is recorded as its source."""
    if not isinstance(model_path, str):
        raise PathSafetyError(f"{model_path!r}: give a path relative to the run, such as outputs/model.keras")
    parts = [p for p in model_path.replace("\\", "/").split("/") if p not in ("", ".")]
    source = record.safe_path(model_path)  # refuses '..', absolute paths and symlink escapes
    if not parts:
        raise PathSafetyError(f"{model_path!r}: give the model's path inside run {record.id}, "
                              "such as outputs/model.keras")
    if not os.path.exists(source):
        raise PathSafetyError(f"run {record.id} has no file {model_path!r} "
                              f"(see `tflaunch runs files {record.id}`)")
    try:
        experiment = record.definition().get("experiment")
    except StoreError:
        experiment = (record.read_status(check_lease=False) or {}).get("experiment")
    source_run = {"id": record.id, "experiment": experiment, "path": "/".join(parts)}
    return _register(record.store.home, name, source, parts[-1], tags=tags, properties=properties,
                     description=description, source_run=source_run, shown=f"{model_path!r} of run {record.id}")


def _read_model_json(root: str, name: str, version: int) -> dict[str, Any] | None:
    """``models/<name>/<version>/model.json``, or None when it is missing or not a model's metadata."""
    path = os.path.join(root, name, str(version), "model.json")
    try:
        data = fsio.read_json(path)
    except (OSError, ValueError) as exc:
        log.debug("skipping %s: %s", path, exc)
        return None
    if not isinstance(data, dict) or data.get("name") != name or data.get("version") != version:
        log.warning("skipping %s: it does not describe model %s version %d", path, name, version)
        return None
    return data


def _matches(values: dict[str, Any], wanted: Any, what: str) -> bool:
    """Azure's filter: a list of keys (present) or [key, value] pairs (equal); a dict means pairs."""
    if isinstance(wanted, dict):
        wanted = list(wanted.items())
    if isinstance(wanted, str):
        wanted = [wanted]
    for item in wanted:
        if isinstance(item, str):
            if item not in values:
                return False
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            if item[0] not in values or str(values[item[0]]) != str(item[1]):
                return False
        else:
            raise SpecError(f"{what} filter {item!r} is invalid: give a key or a [key, value] pair")
    return True


class Model:
    """A registered model version: ``Model("mnist")`` (the latest), ``Model("mnist", 3)``,
    ``Model(workspace, "mnist", version=3)``, ``Model(name="mnist", home=...)``, ``Model(ws, id="mnist:3")``.

    Raises :class:`ModelNotFoundError` for an unknown name or version.
    """

    def __init__(self, *args: Any, name: str | None = None, version: int | None = None, home: Any = None,
                 workspace: Any = None, id: str | None = None) -> None:  # noqa: A002 - Azure's name
        positional = list(args)
        if positional and not isinstance(positional[0], str):  # Azure style: Model(workspace, name)
            if workspace is not None:
                raise TypeError("workspace given twice")
            workspace = positional.pop(0)
        if len(positional) > 2:
            raise TypeError("Model takes a name and a version (and optionally a Workspace first)")
        if positional:
            if name is not None:
                raise TypeError("Model: name given twice")
            name = positional.pop(0)
        if positional:
            if version is not None:
                raise TypeError("Model: version given twice")
            version = positional.pop(0)
        if id is not None:
            if name is not None or version is not None:
                raise TypeError("Model: give either id or name/version")
            name, version = parse_ref(id)
        if name is None:
            raise TypeError("Model needs a name (or an id NAME:VERSION)")
        if workspace is not None and home is not None:
            raise TypeError("Model: give either workspace or home, not both")
        validate_model_name(name)
        version = _validate_version(version)
        self.home = _home_of(workspace if workspace is not None else home)
        root = _models_root(self.home)
        versions = version_numbers(os.path.join(root, name))
        if version is None:
            for candidate in reversed(versions):
                data = _read_model_json(root, name, candidate)
                if data is not None:
                    self._load(data)
                    return
            raise ModelNotFoundError(f"no model {name!r} in {self.home} (see `tflaunch models list`)")
        data = _read_model_json(root, name, version)
        if data is None:
            if not versions:
                raise ModelNotFoundError(f"no model {name!r} in {self.home} (see `tflaunch models list`)")
            raise ModelNotFoundError(f"model {name!r} has no version {version} (the latest is {versions[-1]}; "
                                     f"see `tflaunch models list`)")
        self._load(data)

    @classmethod
    def _from_dict(cls, home: str, data: dict[str, Any]) -> Model:
        model = cls.__new__(cls)
        model.home = home
        model._load(data)
        return model

    def _load(self, data: dict[str, Any]) -> None:
        self._data = data
        self.name: str = data["name"]
        self.version: int = int(data["version"])
        self.id = f"{self.name}:{self.version}"
        self.description: str | None = data.get("description")
        self.tags: dict[str, str] = dict(data.get("tags") or {})
        self.properties: dict[str, Any] = dict(data.get("properties") or {})
        self.created_time: str | None = data.get("created")
        run = data.get("source_run") or {}
        self.run_id: str | None = run.get("id")
        self.experiment: str | None = run.get("experiment")
        self.dir = os.path.join(_models_root(self.home), self.name, str(self.version))
        self.path = os.path.join(self.dir, "files")
        self.basename: str = data.get("basename") or ""
        self.files: list[dict[str, Any]] = list(data.get("files") or [])
        self.links: list[dict[str, str]] = list(data.get("links") or [])
        self.size: int = int(data.get("size") or 0)

    def __repr__(self) -> str:
        return f"Model(name={self.name!r}, version={self.version}, home={self.home!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Model) and (self.home, self.name, self.version) == (other.home, other.name,
                                                                                      other.version)

    def __hash__(self) -> int:
        return hash((self.home, self.name, self.version))

    @property
    def model_path(self) -> str:
        """The registered file or directory itself: ``<path>/<basename>``."""
        return os.path.join(self.path, self.basename)

    def to_dict(self) -> dict[str, Any]:
        """The content of ``model.json`` (what ``tflaunch models show --json`` prints)."""
        import copy

        return copy.deepcopy(self._data)

    def download(self, target_dir: str | os.PathLike = ".", exist_ok: bool = False) -> str:
        """Copy the registered file or directory to ``target_dir/<basename>``; return that path.

        Refuses to overwrite an existing path unless ``exist_ok``; then the existing file or directory
        is replaced as a whole (a directory is copied next to it first, then swapped in)."""
        source = self.model_path
        if not os.path.lexists(source):
            raise StoreError(f"model {self.id}: {source} is missing (the registry was modified)")
        target = os.path.join(os.path.abspath(os.fspath(target_dir)), self.basename)
        is_dir = os.path.isdir(source) and not os.path.islink(source)
        if os.path.lexists(target):
            if not exist_ok:
                raise StoreError(f"{target} exists: remove it, download elsewhere, or pass exist_ok=True")
            if is_dir != (os.path.isdir(target) and not os.path.islink(target)):
                raise StoreError(f"{target} exists and is not a {'directory' if is_dir else 'file'}: remove it first")
        parent = os.path.dirname(target)
        tmp = os.path.join(parent, f".{self.basename}.download-{os.urandom(4).hex()}")
        old = tmp + ".old"
        try:
            os.makedirs(parent, exist_ok=True)
            if is_dir:  # appears complete, or not at all
                shutil.copytree(source, tmp, symlinks=True)
                if os.path.isdir(target):  # exist_ok: replaced whole (no stale files of another version)
                    os.rename(target, old)
                os.rename(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                shutil.copyfile(source, tmp)
                shutil.copymode(source, tmp)
                os.replace(tmp, target)
        except (OSError, shutil.Error) as exc:
            if os.path.isdir(old) and not os.path.lexists(target):
                os.rename(old, target)
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            elif os.path.lexists(tmp):
                os.unlink(tmp)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise StoreError(f"cannot download model {self.id} to {target}: {reason}") from None
        return target

    def verify(self) -> None:
        """Recompute every file's SHA-256 (and check links and extra files) against the manifest; raise
        :class:`StoreError` naming the first file that differs."""
        expected = {f["path"] for f in self.files} | {lnk["path"] for lnk in self.links}
        for entry in self.files:
            full = os.path.join(self.path, *entry["path"].split("/"))
            digest = hashlib.sha256()
            try:
                if os.path.islink(full):
                    raise OSError(errno.EINVAL, "is a symbolic link, not a file")
                with open(full, "rb") as fh:
                    while True:
                        chunk = fh.read(CHUNK)
                        if not chunk:
                            break
                        digest.update(chunk)
            except OSError as exc:
                raise StoreError(f"model {self.id}: {entry['path']} cannot be read: {exc.strerror or exc}") from None
            if digest.hexdigest() != entry["sha256"]:
                raise StoreError(f"model {self.id}: {entry['path']} does not match its SHA-256 in model.json "
                                 "(it was modified after registration)")
        for link in self.links:
            full = os.path.join(self.path, *link["path"].split("/"))
            try:
                target = os.readlink(full)
            except OSError:
                target = None
            if target != link["target"]:
                raise StoreError(f"model {self.id}: {link['path']} is no longer a link to {link['target']!r}")
        for dirpath, dirnames, filenames in os.walk(self.path):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, self.path).replace(os.sep, "/")
            for fn in sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                rel = fn if rel_dir == "." else f"{rel_dir}/{fn}"
                if rel not in expected:
                    raise StoreError(f"model {self.id}: {rel} is not in model.json (added after registration)")

    @classmethod
    def list(cls, workspace_or_home: Any = None, name: str | None = None, tags: Iterable[Any] | None = None, *,
             properties: Iterable[Any] | None = None, latest: bool = False) -> list[Model]:
        """Registered model versions, sorted by name then version.

        ``tags`` / ``properties``: a list of keys (present) or ``[key, value]`` pairs (equal), as in the
        Azure SDK. ``latest``: only the highest version of each name among those that match.
        """
        home = _home_of(workspace_or_home)
        root = _models_root(home)
        if name is not None:
            validate_model_name(name)
            names = [name]
        else:
            try:
                names = sorted(n for n in os.listdir(root) if EXPERIMENT_RE.match(n))
            except (FileNotFoundError, NotADirectoryError):
                return []
        found: list[Model] = []
        for model_name in names:
            versions = version_numbers(os.path.join(root, model_name))
            picked: list[Model] = []
            for version in (reversed(versions) if latest else versions):
                data = _read_model_json(root, model_name, version)
                if data is None:
                    continue
                if tags is not None and not _matches(data.get("tags") or {}, tags, "tag"):
                    continue
                if properties is not None and not _matches(data.get("properties") or {}, properties, "property"):
                    continue
                picked.append(cls._from_dict(home, data))
                if latest:
                    break
            found.extend(picked)
        return found

    @classmethod
    def register(cls, workspace: Any, model_path: str | os.PathLike, model_name: str,
                 tags: dict[str, str] | None = None, properties: dict[str, Any] | None = None,
                 description: str | None = None) -> Model:
        """Azure's ``Model.register(workspace, model_path, model_name, ...)``: see :func:`register`."""
        return register(workspace, model_name, model_path, tags=tags, properties=properties,
                        description=description)

    @staticmethod
    def get_model_path(model_name: str, version: int | None = None, _workspace: Any = None) -> str:
        """Azure's ``Model.get_model_path``: the registered file or directory of a model, in place."""
        return Model(model_name, version, workspace=_workspace).model_path
