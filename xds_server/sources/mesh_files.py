"""The mesh from a directory of Kubernetes-shaped YAML/JSON files (`--source DIR`).

The embedded default source: the same objects a cluster would hold (Services, EndpointSlices,
Pods, HTTPRoutes, GRPCRoutes, TrafficPolicies...), written as files, hot-reloaded. A file may
hold several `---` documents, a list, or a `kind: List` as `kubectl get -o yaml` writes it.

Bad input never takes the mesh down. Each problem is reported with file:line, object and field,
and the last good state is kept *per object*: an object that turns invalid keeps its previous
valid version in the store while every other object, even in the same file, still updates. A
file that cannot be parsed at all keeps every object it last gave. Objects whose file is gone
disappear.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml

from .reading import BoundedReader, ReadLimits, Refused
from .watch import ChangedPaths, watch_changes
from ..model.store import KINDS, MeshObject, MeshStore, ObjectChange, ObjectKey, key_of
from .k8s_objects import ObjectError, convert

log = logging.getLogger(__name__)

SUFFIXES = frozenset({".yaml", ".yml", ".json"})
DEFAULT_NAMESPACE = "default"
# libyaml when available: several times faster, same results.
_YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshError:
    """One problem with one object (or file), worded for the operator who has to fix it."""

    file: str
    line: int | None = None  # 1-based: the offending field's line when it can be found
    kind: str = ""
    namespace: str = ""
    name: str = ""
    field: str = ""  # as the user spells it: spec.rules[0].backendRefs[1].weight
    message: str
    severity: Literal["error", "warning"] = "error"  # warnings: skipped on purpose, not broken

    @property
    def object(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace and self.name else self.name
        return " ".join(part for part in (self.kind, where) if part)

    def __str__(self) -> str:
        parts = [self.file if self.line is None else f"{self.file}:{self.line}"]
        if self.severity == "warning":
            parts.append("warning")
        parts += [p for p in (self.object, self.field) if p]
        parts.append(self.message)
        return ": ".join(parts)


# Parsing one file -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Doc:
    """One object of a file: `obj` when valid; `key` whenever its identity is known."""

    key: ObjectKey | None
    obj: MeshObject | None
    line: int | None


@dataclass(frozen=True, slots=True)
class ParsedFile:
    digest: str | None  # sha256 of the file's bytes; None: unreadable
    docs: tuple[_Doc, ...]
    errors: tuple[MeshError, ...]
    failed: bool  # nothing could be read: keep what this file gave before


def parse_file(raw: bytes, is_json: bool, file: str) -> ParsedFile:
    """Every object of one file's bytes, converted, with every problem (named `file`)."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return _failed(digest_of(raw), MeshError(file=file, message=f"not UTF-8 text (byte {e.start})"))
    try:
        documents = _json_documents(text) if is_json else _yaml_documents(text)
    except json.JSONDecodeError as e:
        message = f"invalid JSON: {e.msg} (column {e.colno})"
        return _failed(digest_of(raw), MeshError(file=file, line=e.lineno, message=message))
    except yaml.YAMLError as e:
        return _failed(digest_of(raw), _yaml_error(file, e))
    docs: list[_Doc] = []
    errors: list[MeshError] = []
    for data, node in _objects(documents):
        line = node.start_mark.line + 1 if node is not None else None
        try:
            obj = convert(data, default_namespace=DEFAULT_NAMESPACE)
        except ObjectError as e:
            errors += _errors_of(e, file, node)
            if not e.warning and e.kind in KINDS and e.name:  # known: its last good is kept
                docs.append(_Doc((e.kind, e.namespace, e.name), None, line))
            continue
        except Exception as e:  # a converter bug must not stop every other object loading
            log.exception("mesh files: cannot convert an object in %s", file)
            errors.append(MeshError(file=file, line=line, message=f"internal error: {e!r}"))
            continue
        docs.append(_Doc(key_of(obj), obj, line))
    return ParsedFile(digest_of(raw), tuple(docs), tuple(errors), failed=False)


def _failed(digest: str | None, error: MeshError) -> ParsedFile:
    return ParsedFile(digest, (), (error,), failed=True)


def _errors_of(e: ObjectError, file: str, node: yaml.Node | None) -> list[MeshError]:
    severity: Literal["error", "warning"] = "warning" if e.warning else "error"
    return [
        MeshError(
            file=file,
            line=_locate(node, field),
            kind=e.kind,
            namespace=e.namespace,
            name=e.name,
            field=field,
            message=message,
            severity=severity,
        )
        for field, message in e.problems
    ]


_Document = tuple[Any, "yaml.Node | None"]


def _yaml_documents(text: str) -> list[_Document]:
    # Compose then construct, rather than yaml.safe_load_all, to keep each node's line numbers.
    loader = _YamlLoader(text)
    try:
        documents = []
        while loader.check_node():
            node = loader.get_node()
            documents.append((loader.construct_document(node), node))
        return documents
    finally:
        loader.dispose()


def _json_documents(text: str) -> list[_Document]:
    data = json.loads(text)  # json for the values: YAML 1.1 reads some valid JSON differently
    try:  # ... and YAML's composer, best effort, only for line numbers
        node = yaml.compose(text, Loader=_YamlLoader)
    except yaml.YAMLError:
        node = None
    return [(data, node)]


def _objects(documents: list[_Document]) -> Iterator[_Document]:
    """The objects of a file: documents, items of a top-level list, items of a `kind: List`."""
    for data, node in documents:
        if data is None:  # an empty document, e.g. a trailing `---`
            continue
        if isinstance(data, list):
            yield from zip(data, _children(node, len(data)), strict=True)
        elif isinstance(data, dict) and _is_list(data):
            items = data["items"] or []
            yield from zip(items, _children(_child(node, "items"), len(items)), strict=True)
        else:
            yield data, node


def _is_list(data: dict[str, Any]) -> bool:
    kind = data.get("kind")
    return isinstance(kind, str) and kind.endswith("List") and isinstance(data.get("items"), list)


def _children(node: yaml.Node | None, count: int) -> list[yaml.Node | None]:
    if isinstance(node, yaml.SequenceNode) and len(node.value) == count:
        return list(node.value)
    return [None] * count


def _child(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if key_node.value == key:
                return value_node
    return None


def _yaml_error(file: str, error: yaml.YAMLError) -> MeshError:
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        message = f"invalid YAML: {error.problem or error.context}"
        if error.context and error.problem:
            message += f" ({error.context})"
        return MeshError(file=file, line=mark.line + 1 if mark else None, message=message)
    return MeshError(file=file, message=f"invalid YAML: {' '.join(str(error).split())}")


# Field paths: dotted names, [index] into lists, [key] into maps (keys may hold dots).
_PATH_STEP = re.compile(r"([^.\[\]]+)|\[([^\]]*)\]")


def _locate(node: yaml.Node | None, field: str) -> int | None:
    """The 1-based line of `field` (a k8s_objects field path) inside an object's node: the
    deepest part of the path that exists, so a missing field points at its parent."""
    if node is None:
        return None
    line = node.start_mark.line
    for name, key in _PATH_STEP.findall(field):
        step = name or key
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == step:
                    line, node = key_node.start_mark.line, value_node
                    break
            else:
                break
        elif isinstance(node, yaml.SequenceNode) and step.isdigit() and int(step) < len(node.value):
            node = node.value[int(step)]
            line = node.start_mark.line
        else:
            break
    return line + 1


# Many files into one consistent set of objects ------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Held:
    """An object in the store and where it came from."""

    obj: MeshObject
    file: str
    line: int | None


def _where(file: str, line: int | None) -> str:
    return f"{file}:{line}" if line else file


def resolve(
    files: Mapping[str, ParsedFile], previous: Mapping[ObjectKey, _Held]
) -> tuple[dict[ObjectKey, _Held], list[MeshError]]:
    """The objects to serve, given every file's parse and what was served before.

    An invalid object keeps its previous version; a file that failed entirely keeps all it
    gave. An object defined twice goes to the file that already served it, else to the first
    valid definition in path order: adding a conflicting file never displaces what serves.
    """
    claims: dict[ObjectKey, list[tuple[str, int | None, MeshObject | None]]] = {}
    errors: list[MeshError] = []
    for file in sorted(files):
        parsed = files[file]
        errors += parsed.errors
        if parsed.failed:
            for key, held in previous.items():
                if held.file == file:
                    claims.setdefault(key, []).append((file, held.line, held.obj))
            continue
        for doc in parsed.docs:
            if doc.key is not None:
                claims.setdefault(doc.key, []).append((file, doc.line, doc.obj))

    served: dict[ObjectKey, _Held] = {}
    for key, candidates in claims.items():
        before = previous.get(key)
        serving = (c for c in candidates if before is not None and c[0] == before.file)
        valid = (c for c in candidates if c[2] is not None)
        winner = next(serving, None) or next(valid, candidates[0])
        file, line, obj = winner
        if obj is None and before is not None:
            obj = before.obj  # invalid now: its error is reported, its last good version stays
        if obj is not None:
            served[key] = _Held(obj, file, line)
        for other in candidates:
            if other is winner or other[2] is None:  # invalid ones already have their error
                continue
            same = " in this file" if other[0] == file else ""
            kind, namespace, name = key
            errors.append(MeshError(
                file=other[0],
                line=other[1],
                kind=kind,
                namespace=namespace,
                name=name,
                message=f"duplicate: also defined{same} at {_where(file, line)}, which is used",
            ))
    errors.sort(key=lambda e: (e.file, e.line or 0))
    return served, errors


# Reading a directory --------------------------------------------------------------------------


def is_mesh_file(relative: PurePosixPath | Path) -> bool:
    """Whether a path (relative to the directory) names a file that may hold objects."""
    # Hidden entries cover editor droppings (.#x.yaml, .x.yaml.swp) and the ..data/
    # directories of a mounted ConfigMap; the suffix check leaves out x.yaml~ and the like.
    if relative.suffix.lower() not in SUFFIXES:
        return False
    return not any(part.startswith((".", "#", "~")) for part in relative.parts)


def mesh_files(directory: Path) -> list[Path]:
    """The files under `directory` that hold objects, in a stable order. Raises OSError."""
    return [
        path for path in sorted(directory.rglob("*"))
        if is_mesh_file(path.relative_to(directory)) and path.is_file()
    ]


def digest_of(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def read_file(
    path: Path, display: str, known: str | None = None, *, root: Path | None = None,
    reader: BoundedReader | None = None,
) -> ParsedFile | None:
    """Parse one file (errors name it `display`); None when its content digest is still
    `known`. A file past the size limit or a link out of `root` (the source directory) is
    reported and not read (sources/reading.py).
    Raises FileNotFoundError if the file is gone."""
    try:
        raw = (reader or BoundedReader()).read(path, root)
    except FileNotFoundError:
        raise
    except Refused as e:
        return _failed(None, MeshError(file=display, message=str(e)))
    except OSError as e:
        return _failed(None, MeshError(file=display, message=f"cannot read: {e.strerror or e}"))
    digest = digest_of(raw)
    if known is not None and digest == known:
        return None
    return parse_file(raw, path.suffix.lower() == ".json", display)


@dataclass(slots=True)
class _Scan:
    """What one reload found: new parses (None where the content is unchanged) and files
    that are gone. `complete`: every file was seen, so a file not in `parsed` is gone too."""

    parsed: dict[str, ParsedFile | None]
    gone: set[str]
    complete: bool


class MeshDirectory:
    """Keeps `store` in step with the mesh files under `directory`, as source `source_name`.

    Each file's parse and content digest is kept, so a reload parses only files whose bytes
    changed; a reload told which paths changed (by the watcher) reads only those files.
    """

    def __init__(self, directory: Path, store: MeshStore, source_name: str = "files",
                 limits: ReadLimits | None = None) -> None:
        self.directory = Path(directory)
        # Bounded reads; `reader.refused` counts refused files for the metrics.
        self.reader = BoundedReader(limits or ReadLimits())
        self._store = store
        self._source = source_name
        self._files: dict[str, ParsedFile] = {}
        self._held: dict[ObjectKey, _Held] = {}
        self._errors: list[MeshError] = []
        # Times each file (by display name) was read: what a reload costs, for tests and
        # operators; it only grows.
        self.reads: Counter[str] = Counter()

    @property
    def errors(self) -> list[MeshError]:
        """The problems of the current files (the store holds the last good objects)."""
        return list(self._errors)

    def load(self) -> list[MeshError]:
        """Read the directory now and update the store. Returns the current errors."""
        return self._apply(self._scan(self._known(), None))

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Reload on every change until `stop` is set or the task is cancelled. Never raises
        for bad input: errors are logged and exposed through `errors`."""
        await watch_changes(self.directory, self._reload, stop, label="mesh files")

    async def _reload(self, changed: ChangedPaths = None) -> list[MeshError]:
        # Reading and parsing run in a thread so a big tree does not stall the event loop; the
        # store is only written here, on the loop.
        return await self._apply_in_slices(await asyncio.to_thread(self._scan, self._known(), changed))

    def _known(self) -> dict[str, str | None]:
        return {file: parsed.digest for file, parsed in self._files.items()}

    def _scan(self, known: Mapping[str, str | None], changed: ChangedPaths) -> _Scan | None:
        """Read what may have changed: the `changed` files, or every file when a change is
        not about mesh files alone (None, a directory, a ConfigMap's hidden ..data swap).
        None if the directory cannot be listed."""
        targets = self._targets(changed) if changed is not None else None
        complete = targets is None
        try:
            if not self.directory.is_dir():
                return None
            if targets is None:
                paths = mesh_files(self.directory)
        except OSError:
            return None
        if targets is None:
            targets = [path.relative_to(self.directory).as_posix() for path in paths]
        scan = _Scan({}, set(), complete=complete)
        for file in targets:
            path = self.directory / file
            try:
                if not path.is_file():
                    raise FileNotFoundError(file)
                self.reads[file] += 1
                scan.parsed[file] = read_file(path, file, known.get(file), root=self.directory,
                                               reader=self.reader)
            except FileNotFoundError:  # deleted (or deleted while scanning): gone
                scan.gone.add(file)
        return scan

    def _targets(self, changed: frozenset[Path]) -> list[str] | None:
        """The mesh files `changed` names, or None when a full rescan is needed."""
        files = []
        for path in changed:
            try:
                relative = path.relative_to(self.directory)
            except ValueError:
                return None
            if not is_mesh_file(relative) or path.is_dir():
                return None
            files.append(relative.as_posix())
        return sorted(files)

    def _apply(self, scanned: _Scan | None) -> list[MeshError]:
        objects, errors = self._resolve(scanned)
        if objects is not None:
            self._changed(self._store.sync(self._source, objects))
        return self._report(errors)

    async def _apply_in_slices(self, scanned: _Scan | None) -> list[MeshError]:
        """`_apply`, the store written in slices (a big tree's sync never holds the loop)."""
        objects, errors = self._resolve(scanned)
        if objects is not None:
            self._changed(await self._store.sync_in_slices(self._source, objects))
        return self._report(errors)

    def _resolve(self, scanned: _Scan | None) -> tuple[list[MeshObject] | None, list[MeshError]]:
        """The objects the store should hold (None: keep what it has), and the problems."""
        if scanned is None:
            # A vanished directory is not an empty one: keep serving what it held.
            message = "cannot list the directory; keeping the objects loaded from it"
            return None, [MeshError(file=str(self.directory), message=message)]
        files = {} if scanned.complete else dict(self._files)
        for file in scanned.gone:
            files.pop(file, None)
        for file, parsed in scanned.parsed.items():
            if parsed is not None:
                files[file] = parsed
            elif file in self._files:  # unchanged
                files[file] = self._files[file]
        self._files = files
        self._held, errors = resolve(self._files, self._held)
        return [held.obj for held in self._held.values()], errors

    def _changed(self, changes: list[ObjectChange]) -> None:
        if changes:
            log.info("mesh files: %d objects changed", len(changes), extra={"source": self._source})

    def _report(self, errors: list[MeshError]) -> list[MeshError]:
        previous = set(self._errors)
        for error in errors:
            if error not in previous:
                level = logging.INFO if error.severity == "warning" else logging.WARNING
                log.log(level, "mesh files: %s", error)
        self._errors = errors
        return list(errors)
