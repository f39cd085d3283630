"""The registry of research projects: which projects exist and who may request exports for each.

A project is the unit of linkability: its pseudonym secret, map key and bundle key
(:mod:`compliance.exports.keys`) are shared by every export made for it, so whoever may request for a
project may link their data with everything that project already received. The registry is
``policies/projects.yaml`` (``COMPLIANCE_EXPORTS_PROJECTS_FILE``): declarative, reviewed in version
control, loaded once and validated strictly (unknown or misspelt keys, a duplicated project id, a group
that is not a path, a project without members are refused at start-up), so a typo cannot widen access.

Members are Keycloak group paths (``/research``) and/or usernames. A token carries the user's groups in
its ``groups`` claim (:class:`compliance.auth.interfaces.Principal`): full paths (``/research``) when the
realm's group mapper has ``full.path`` on (Keycloak's default), bare names (``cardiology``) when it is off,
as in the demo realm. A full path must equal a registered path. A bare name matches the registered group
whose last segment it is (``cardiology`` -> ``/departments/cardiology``); two registered groups with the
same last segment are refused at load, since a name could not tell them apart. The realm itself must not
hold same-named groups under different parents while it sends names: such a realm sends full paths.

Membership is decided when a request is made (:meth:`ProjectRegistry.authorize`) and recorded on the
request (``export_request.requester_membership``: ``group /research`` or ``user rob``); an approval
needs that basis to still be registered for an open project (:meth:`ProjectRegistry.still_grants`).

A refusal never says whether the project exists: "not a member of a registered project named X" is true
of both, and it is all a non-member is told (the audit trail says which it was). Closing a project
(``closed: true``) keeps its id, its keys and its membership visible to stewards, and refuses new
requests and approvals; an id is never reused for another team (it would inherit the keys).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from compliance.errors import ConfigurationError, PermissionDenied

#: Project ids: what the API's pattern accepts, lower case (pseudonym keys are bound to the exact id).
_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
#: A Keycloak group path: "/" then one or more segments separated by "/", no blank segment.
_GROUP_PATH = re.compile(r"^(/[^/\s][^/]*)+$")
#: Keycloak stores usernames in lower case.
_USERNAME = re.compile(r"^[a-z0-9][a-z0-9._@+-]{0,254}$")
_TOP_KEYS = {"version", "projects"}
_PROJECT_KEYS = {"title", "description", "members", "protocols", "closed"}
_MEMBER_KEYS = {"groups", "users"}


class ProjectAccessDenied(PermissionDenied):
    """The caller may not request exports for the project they named (or it is not registered) -> 403."""

    code = "project_access_denied"


@dataclass(frozen=True)
class Project:
    id: str
    title: str
    groups: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    protocols: tuple[str, ...] = ()
    description: str = ""
    closed: bool = False

    def membership_of(self, username: str, groups: Collection[str]) -> str | None:
        """How a caller belongs (``"user rob"``, ``"group /research"``), or None."""
        if username in self.users:
            return f"user {username}"
        for path in self.groups:
            if any(_claims_group(claim, path) for claim in groups):
                return f"group {path}"
        return None

    def grants(self, membership: str) -> bool:
        """Whether a membership recorded earlier (``membership_of``) is still registered."""
        kind, _, who = membership.partition(" ")
        return (kind == "user" and who in self.users) or (kind == "group" and who in self.groups)

    def public(self) -> dict[str, object]:
        """What a data steward (and a member) sees: the project and its membership."""
        return {"id": self.id, "registered": True, "title": self.title, "description": self.description,
                "protocols": list(self.protocols), "closed": self.closed,
                "members": {"groups": list(self.groups), "users": list(self.users)}}


def _claims_group(claim: str, path: str) -> bool:
    if claim.startswith("/"):
        return claim == path
    return _last_segment(path) == claim  # a bare name (full.path off): unique among registered groups


def _last_segment(path: str) -> str:
    return path.rsplit("/", 1)[-1]


class ProjectRegistry:
    """The registered projects, loaded once (:func:`load_projects`)."""

    def __init__(self, projects: Iterable[Project] = ()) -> None:
        self._by_id = {p.id: p for p in projects}

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, project_id: str) -> Project | None:
        return self._by_id.get(project_id)

    def is_registered(self, project_id: str) -> bool:
        return project_id in self._by_id

    def all(self) -> list[Project]:
        return [self._by_id[i] for i in sorted(self._by_id)]

    def of_member(self, username: str, groups: Collection[str]) -> list[Project]:
        """The open projects a caller may request exports for."""
        return [p for p in self.all() if not p.closed and p.membership_of(username, groups)]

    def authorize(self, project_id: str, username: str, groups: Collection[str]) -> tuple[Project, str]:
        """The project and how the caller belongs to it; else :class:`ProjectRefused` (for the audit) whose
        public message is the same whether the project is unknown or the caller is not a member."""
        project = self._by_id.get(project_id)
        if project is None:
            raise ProjectRefused(project_id, f"no registered project is named {project_id!r}")
        membership = project.membership_of(username, groups)
        if membership is None:
            raise ProjectRefused(project_id, f"{username!r} is not a member of project {project_id!r} "
                                             f"(members: {_members_text(project)}; the caller's groups: "
                                             f"{sorted(groups) or 'none'})")
        if project.closed:  # a member may know that their project is closed
            raise ProjectRefused(project_id, f"project {project_id!r} is closed",
                                 public=f"project {project_id!r} is closed: no new export requests")
        return project, membership

    def still_grants(self, project_id: str, membership: str | None) -> str | None:
        """None if a request made with ``membership`` may still be approved and run, else why not."""
        project = self._by_id.get(project_id)
        if project is None:
            return f"project {project_id!r} is not registered (policies/projects.yaml)"
        if project.closed:
            return f"project {project_id!r} is closed"
        if membership is None:
            return ("the request was made before projects were registered: its requester's membership was never "
                    "checked; they must request again")
        if not project.grants(membership):
            return f"the requester's membership ({membership}) is no longer registered for project {project_id!r}"
        return None

    def describe(self, project_id: str) -> dict[str, object]:
        """A request's project as a steward sees it (an unregistered one says so)."""
        project = self._by_id.get(project_id)
        return project.public() if project is not None else {"id": project_id, "registered": False}


class ProjectRefused(Exception):
    """Why a project was refused: ``reason`` for the audit trail, ``public`` for the caller."""

    def __init__(self, project_id: str, reason: str, *, public: str | None = None) -> None:
        super().__init__(reason)
        self.project_id = project_id
        self.reason = reason
        self.public = public or ("you are not a member of a registered research project named "
                                 f"{project_id!r}; yours are listed by GET /api/v1/exports/projects "
                                 "(compliance exports projects)")

    def denial(self) -> ProjectAccessDenied:
        return ProjectAccessDenied(self.public, detail={"project": self.project_id})


def _members_text(project: Project) -> str:
    parts = [f"group {g}" for g in project.groups] + [f"user {u}" for u in project.users]
    return ", ".join(parts) or "none"


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently:
    a second entry for a project would replace the first one's members)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_projects(path: Path) -> ProjectRegistry:
    """Read and validate the registry; any defect refuses to load (ConfigurationError naming it)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"cannot read the research project registry {path}: {exc}") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{path}: not valid YAML ({exc})") from exc
    return projects_from_mapping(data, source=str(path))


def projects_from_mapping(data: object, *, source: str = "<projects>") -> ProjectRegistry:
    if not isinstance(data, dict) or set(data) - _TOP_KEYS or data.get("version") != 1:
        raise ConfigurationError(f"{source}: expected the keys 'version: 1' and 'projects' only")
    entries = data.get("projects")
    if entries is None:
        entries = {}
    if not isinstance(entries, dict):
        raise ConfigurationError(f"{source}: 'projects' must map project ids to projects")
    projects = [_project(str(pid), spec, source) for pid, spec in entries.items()]
    by_name: dict[str, str] = {}
    for path in sorted({g for p in projects for g in p.groups}):
        other = by_name.setdefault(_last_segment(path), path)
        if other != path:
            raise ConfigurationError(f"{source}: member groups {other} and {path} share the name "
                                     f"{_last_segment(path)!r}, which a token carrying group names cannot tell "
                                     "apart; register one of them, or rename a group")
    return ProjectRegistry(projects)


def _project(pid: str, spec: object, source: str) -> Project:
    where = f"{source}: project {pid!r}"
    if not _ID.match(pid):
        raise ConfigurationError(f"{where}: ids are 1-64 lower-case letters, digits, '.', '_', '-'")
    if not isinstance(spec, dict):
        raise ConfigurationError(f"{where}: must be a mapping with {sorted(_PROJECT_KEYS)}")
    if unknown := set(spec) - _PROJECT_KEYS:
        raise ConfigurationError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(_PROJECT_KEYS)})")
    title = spec.get("title")
    if not isinstance(title, str) or not title.strip():
        raise ConfigurationError(f"{where}: 'title' is required")
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise ConfigurationError(f"{where}: 'description' must be text")
    closed = spec.get("closed", False)
    if not isinstance(closed, bool):
        raise ConfigurationError(f"{where}: 'closed' must be true or false")
    protocols = _strings(spec.get("protocols", []), f"{where}: 'protocols'", max_length=128)
    members = spec.get("members")
    if not isinstance(members, dict):
        raise ConfigurationError(f"{where}: 'members' must be a mapping with 'groups' and/or 'users'")
    if unknown := set(members) - _MEMBER_KEYS:
        raise ConfigurationError(f"{where}: unknown member keys {sorted(unknown)} (allowed: groups, users)")
    groups = _strings(members.get("groups", []), f"{where}: 'members.groups'", max_length=255)
    for g in groups:
        if not _GROUP_PATH.match(g) or g != g.strip():
            raise ConfigurationError(f"{where}: member group {g!r} is not a Keycloak group path (e.g. /research)")
    users = _strings(members.get("users", []), f"{where}: 'members.users'", max_length=255)
    for u in users:
        if not _USERNAME.match(u):
            raise ConfigurationError(f"{where}: member user {u!r} is not a Keycloak username (lower case)")
    if not (groups or users) and not closed:
        raise ConfigurationError(f"{where}: an open project needs at least one member group or user")
    return Project(id=pid, title=title.strip(), description=description.strip(), groups=groups, users=users,
                   protocols=protocols, closed=closed)


def _strings(value: object, where: str, *, max_length: int) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigurationError(f"{where} must be a list of non-empty strings")
    items: Sequence[str] = value
    if len(set(items)) != len(items):
        raise ConfigurationError(f"{where} lists a value twice")
    if any(len(v) > max_length for v in items):
        raise ConfigurationError(f"{where}: at most {max_length} characters each")
    return tuple(sorted(items))
