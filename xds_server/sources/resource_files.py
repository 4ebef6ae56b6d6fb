"""Raw Envoy resources from a directory of YAML or JSON files (`--resources DIR`).

The escape hatch for config the mesh model cannot express. Each file holds one resource or a
list of them (YAML may hold several `---` documents), typed by `@type` and written in proto3
JSON field form, exactly as in Envoy's own config files. Nested `typed_config` Anys resolve
through the Envoy protos shipped by `xds-protos`.

A file that does not parse or does not match the Envoy API is reported with the file, line,
resource and field, and that file's last good version stays in the cache: a typo in one file
must never take down what the others (or the file's earlier version) configured.

This source parses and validates; it hands the current good resources, by type, to a
`RawSink` (translate/raw.py puts them in the cache). It never touches the xDS cache itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message

from ..protos import import_all, registered_class
from .reading import BoundedReader, ReadLimits, Refused
from .watch import watch_directory

log = logging.getLogger(__name__)

SUFFIXES = frozenset({".yaml", ".yml", ".json"})
# libyaml when available: several times faster, same results.
_YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True, slots=True, kw_only=True)
class ResourceError:
    """One problem in one file, worded for the operator who has to fix it."""

    file: str
    line: int | None = None  # 1-based; the offending field's line when it can be found
    resource: str | None = None  # e.g. 'Cluster "web"'
    field: str | None = None  # e.g. "load_assignment.endpoints[0].lb_endpoints"
    message: str

    def __str__(self) -> str:
        parts = [self.file if self.line is None else f"{self.file}:{self.line}"]
        if self.resource:
            parts.append(self.resource)
        if self.field:
            parts.append(f"field {self.field}")
        parts.append(self.message)
        return ": ".join(parts)


class RawSink(Protocol):
    """Where the good resources go: all of them, by type URL, after every change."""

    def publish(self, by_type: Mapping[str, Sequence[Message]]) -> None: ...


_TYPE_PREFIX = "type.googleapis.com/"
_CLUSTER_LOAD_ASSIGNMENT = "envoy.config.endpoint.v3.ClusterLoadAssignment"


def _name_field(cls: type[Message]) -> str | None:
    """The field an xDS resource is named by (ClusterLoadAssignment: cluster_name); None for
    a message that cannot be a named resource."""
    if cls.DESCRIPTOR.full_name == _CLUSTER_LOAD_ASSIGNMENT:
        return "cluster_name"
    return "name" if "name" in cls.DESCRIPTOR.fields_by_name else None


@dataclass(frozen=True, slots=True)
class _Entry:
    type_url: str
    name: str
    message: Message  # kept as parsed: unchanged files hand the same object over again
    line: int | None
    label: str


# Parsing -------------------------------------------------------------------------------------


def load_file(
    path: Path | str, *, display: str | None = None
) -> tuple[list[Message], list[ResourceError]]:
    """Parse one file. Returns the resources that parsed and every error (named `display`)."""
    path = Path(path)
    display = display or str(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        return [], [ResourceError(file=display, message=f"cannot read: {e.strerror or e}")]
    entries, errors = _parse(raw, path.suffix.lower() == ".json", display)
    return [entry.message for entry in entries], errors


def _parse(raw: bytes, is_json: bool, file: str) -> tuple[list[_Entry], list[ResourceError]]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return [], [ResourceError(file=file, message=f"not UTF-8 text (byte {e.start})")]
    try:
        documents = _json_documents(text) if is_json else _yaml_documents(text)
    except json.JSONDecodeError as e:
        message = f"invalid JSON: {e.msg} (column {e.colno})"
        return [], [ResourceError(file=file, line=e.lineno, message=message)]
    except yaml.YAMLError as e:
        return [], [_yaml_error(file, e)]

    entries: list[_Entry] = []
    errors: list[ResourceError] = []
    seen: dict[tuple[str, str], int | None] = {}
    for data, node in documents:
        if data is None:  # an empty document, e.g. a trailing `---`
            continue
        items = zip(data, _children(node, len(data)), strict=True) if isinstance(data, list) else [(data, node)]
        for item, item_node in items:
            result = _parse_resource(item, item_node, file)
            if isinstance(result, ResourceError):
                errors.append(result)
                continue
            key = (result.type_url, result.name)
            if key in seen:
                where = f" (line {seen[key]})" if seen[key] else ""
                message = f"duplicate name: defined earlier in this file{where}"
                errors.append(_error_at(result, file, message))
                continue
            seen[key] = result.line
            entries.append(result)
    return entries, errors


def _yaml_documents(text: str) -> list[tuple[Any, yaml.Node | None]]:
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


def _json_documents(text: str) -> list[tuple[Any, yaml.Node | None]]:
    data = json.loads(text)  # json for the values: YAML 1.1 reads some valid JSON differently
    try:  # ... and YAML's composer, best effort, only for line numbers
        node = yaml.compose(text, Loader=_YamlLoader)
    except yaml.YAMLError:
        node = None
    return [(data, node)]


def _children(node: yaml.Node | None, count: int) -> list[yaml.Node | None]:
    if isinstance(node, yaml.SequenceNode) and len(node.value) == count:
        return list(node.value)
    return [None] * count


def _yaml_error(file: str, error: yaml.YAMLError) -> ResourceError:
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        message = f"invalid YAML: {error.problem or error.context}"
        if error.context and error.problem:
            message += f" ({error.context})"
        return ResourceError(file=file, line=mark.line + 1 if mark else None, message=message)
    return ResourceError(file=file, message=f"invalid YAML: {' '.join(str(error).split())}")


def _parse_resource(data: Any, node: yaml.Node | None, file: str) -> _Entry | ResourceError:
    line = node.start_mark.line + 1 if node is not None else None
    if not isinstance(data, dict):
        problem = f"expected a resource (a mapping with @type), got {type(data).__name__}"
        return ResourceError(file=file, line=line, message=problem)
    name = data.get("name") or data.get("cluster_name") or data.get("clusterName")
    quoted = f'"{name}"' if isinstance(name, str) else None
    type_url = data.get("@type")
    if not isinstance(type_url, str) or not type_url:
        problem = 'missing "@type" (e.g. type.googleapis.com/envoy.config.cluster.v3.Cluster)'
        return ResourceError(file=file, line=line, resource=quoted, message=problem)
    import_all()  # nested Anys (typed_config) resolve only when every module is imported
    cls = registered_class(type_url.rpartition("/")[2])
    if cls is None:
        return ResourceError(
            file=file,
            line=_locate(node, "@type") or line,
            resource=quoted,
            field="@type",
            message=f'unknown @type "{type_url}"',
        )
    type_name = cls.DESCRIPTOR.name
    label = f"{type_name} {quoted}" if quoted else type_name
    name_field = _name_field(cls)  # only named resources can be served (and told apart)
    if name_field is None:
        problem = f"{cls.DESCRIPTOR.full_name} is not an xDS resource type (it has no name)"
        return ResourceError(file=file, line=line, resource=label, field="@type", message=problem)
    try:
        message = json_format.ParseDict({k: v for k, v in data.items() if k != "@type"}, cls())
    except Exception as e:  # mostly ParseError, but odd YAML values (dates...) raise others
        field, text = _explain(e, type_name)
        return ResourceError(
            file=file,
            line=(_locate(node, field) if field else None) or line,
            resource=label,
            field=field,
            message=text,
        )
    if not (name := getattr(message, name_field)):
        return ResourceError(
            file=file, line=line, resource=label, field=name_field, message="must not be empty"
        )
    type_url = _TYPE_PREFIX + cls.DESCRIPTOR.full_name
    return _Entry(type_url, name, message, line, f'{type_name} "{name}"')


def _error_at(entry: _Entry, file: str, message: str) -> ResourceError:
    return ResourceError(file=file, line=entry.line, resource=entry.label, message=message)


# json_format reports problems as prose: "Failed to parse a field: Failed to parse b field:
# <problem> at Cluster.a.b[0]." The innermost " at <path>" is the most precise location; the
# "Failed to parse" chain is the fallback (it skips oneof members and list indexes).
_FAILED_FIELD = re.compile(r"Failed to parse (\S+) field: ")
_NO_FIELD = re.compile(
    r'Message type "[^"]+" has no field named "(?P<name>[^"]+)" at "(?P<at>[^"]*)"'
)
_NO_TYPE = re.compile(r"Can not find message descriptor by type_url: (\S+)")


def _explain(error: Exception, root: str) -> tuple[str | None, str]:
    """(field path, message) from a json_format error about a message of type `root`."""
    text = str(error)
    chain: list[str] = []
    while match := _FAILED_FIELD.match(text):
        chain.append(match[1])
        text = text[match.end() :]
    text = text.split("\n", 1)[0].rstrip(". ")  # drops the "Available Fields" dump

    def relative(path: str) -> str | None:
        if path == root:
            return ""
        if path.startswith((root + ".", root + "[")):
            return path[len(root) :].lstrip(".")
        return None

    if match := _NO_FIELD.search(text):
        at = relative(match["at"])
        if at is not None:
            field = f"{at}.{match['name']}" if at else match["name"]
            return field, "unknown field"
    head, sep, path = text.rpartition(" at ")
    if sep and (at := relative(path)) is not None:
        field, text = at or None, head.rstrip(". ")
    else:
        field = ".".join(chain) or None
    if match := _NO_TYPE.search(text):
        text = f'unknown @type "{match[1]}"'
    return field, text


_PATH_STEP = re.compile(r"([^.\[\]]+)|\[([^\]]*)\]")


def _locate(node: yaml.Node | None, field: str) -> int | None:
    """The 1-based line of `field` (a json_format path) inside a YAML node, best effort."""
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


# The directory -------------------------------------------------------------------------------

_Parsed = tuple[bytes | None, list[_Entry], list[ResourceError]]


@dataclass(slots=True)
class _FileState:
    raw: bytes | None  # what was last read (None if unreadable): unchanged bytes are not reparsed
    errors: list[ResourceError]  # problems of that content
    good: list[_Entry] | None  # the last content without problems: what the cache serves
    good_since: int  # the reload at which the file first became good: older files win duplicates


class ResourceDirectory:
    """Keeps `sink` in step with the resource files under `directory`."""

    def __init__(self, directory: Path, sink: RawSink, limits: ReadLimits | None = None) -> None:
        self.directory = Path(directory)
        # Bounded reads; `reader.refused` counts refused files for the metrics.
        self.reader = BoundedReader(limits or ReadLimits())
        self._sink = sink
        self._files: dict[Path, _FileState] = {}
        self._errors: list[ResourceError] = []
        self._reloads = 0

    @property
    def errors(self) -> list[ResourceError]:
        """The problems of the current files (the cache holds their last good versions)."""
        return list(self._errors)

    def load(self) -> list[ResourceError]:
        """Read the directory now and publish. Returns the current errors."""
        return self._apply(self._scan(self._known()))

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Reload on every change until `stop` is set or the task is cancelled. Never raises
        for bad input: errors are logged and exposed through `errors`."""
        await watch_directory(self.directory, self._reload, stop, label="resources")

    async def _reload(self) -> list[ResourceError]:
        # Reading and parsing run in a thread so a big file does not stall the event loop;
        # the sink is only called here, on the loop.
        return self._apply(await asyncio.to_thread(self._scan, self._known()))

    def _known(self) -> dict[Path, bytes | None]:
        return {path: state.raw for path, state in self._files.items()}

    def _display(self, path: Path) -> str:
        return path.relative_to(self.directory).as_posix()

    def _scan(self, known: Mapping[Path, bytes | None]) -> dict[Path, _Parsed | None] | None:
        """Every resource file, parsed, or None where the bytes are as `known`.
        None overall if the directory cannot be listed."""
        try:
            if not self.directory.is_dir():
                return None
            paths = sorted(self.directory.rglob("*"))
        except OSError:
            return None
        result: dict[Path, _Parsed | None] = {}
        for path in paths:
            relative = path.relative_to(self.directory)
            # Hidden entries cover editor droppings (.#x.yaml) and the ..data/ directories of a
            # mounted ConfigMap; the suffix check leaves out x.yaml~, .swp and the like.
            if path.suffix.lower() not in SUFFIXES:
                continue
            if any(part.startswith(".") for part in relative.parts) or not path.is_file():
                continue
            file = relative.as_posix()
            try:
                raw = self.reader.read(path, self.directory)
            except FileNotFoundError:  # deleted while scanning: gone
                continue
            except Refused as e:
                result[path] = (None, [], [ResourceError(file=file, message=str(e))])
                continue
            except OSError as e:
                result[path] = (None, [], [ResourceError(file=file, message=f"cannot read: {e}")])
                continue
            if raw == known.get(path):
                result[path] = None
            else:
                is_json = path.suffix.lower() == ".json"
                result[path] = (raw, *_parse(raw, is_json, file))
        return result

    def _apply(self, scanned: dict[Path, _Parsed | None] | None) -> list[ResourceError]:
        self._reloads += 1
        if scanned is None:
            message = "cannot list the directory; keeping the resources loaded from it"
            errors = [ResourceError(file=str(self.directory), message=message)]
        else:
            files: dict[Path, _FileState] = {}
            for path, parsed in scanned.items():
                state = self._files.get(path)
                if parsed is None and state is not None:  # unchanged
                    files[path] = state
                    continue
                raw, entries, file_errors = parsed or (None, [], [])
                good = state.good if state else None
                since = state.good_since if state else 0
                if not file_errors:
                    since = since if good is not None else self._reloads
                    good = entries
                files[path] = _FileState(raw, file_errors, good, since)
            self._files = files  # files not listed any more are dropped, with their resources
            errors = self._publish()
        previous = set(self._errors)
        for error in errors:
            if error not in previous:
                log.warning("resources: %s", error)
        self._errors = errors
        return list(errors)

    def _publish(self) -> list[ResourceError]:
        errors: list[ResourceError] = []
        for _, state in sorted(self._files.items()):
            errors += state.errors
        owners: dict[tuple[str, str], str] = {}
        by_type: dict[str, list[Message]] = {}
        # A name defined twice goes to the file that was good first (ties by path), so adding
        # a conflicting file never displaces what is already serving.
        for path, state in sorted(self._files.items(), key=lambda kv: (kv[1].good_since, kv[0])):
            file = self._display(path)
            for entry in state.good or ():
                key = (entry.type_url, entry.name)
                if (owner := owners.get(key)) is not None:
                    message = f"duplicate name: {owner} defines it too, and that one is used"
                    errors.append(_error_at(entry, file, message))
                    continue
                owners[key] = f"{file}:{entry.line}" if entry.line else file
                by_type.setdefault(entry.type_url, []).append(entry.message)
        self._sink.publish(by_type)
        return errors
