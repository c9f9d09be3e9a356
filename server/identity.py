"""MLflow knows who you are: the user the gate verified is the one MLflow records.

Why: a plain MLflow server believes whatever the client says. A run's ``mlflow.user`` tag is
the client's OS user (``root`` for a CI job), a model version's ``user_id`` stays empty, and
the UI cannot show who is logged in. Behind our proxy the server knows better.

Contract:

- The guard (``guard.py``) calls :func:`serve_as` for each request that came through nginx,
  with the identity nginx vouched for (``X-Stack-User``, ``X-Stack-Role``, ``X-Stack-Auth``:
  written only after the gate said yes; a client's own copies never pass nginx). It holds the
  identity in a context variable for that request only; MLflow's Flask handlers run in worker
  threads that inherit it (anyio copies the context into them).
- While a request runs with an identity, what MLflow writes names that identity, whatever
  the client sent (:func:`install` hooks SQLAlchemy's flush, below every handler and
  store method, so no spelling of a request body can get around it: the values MLflow
  builds its row objects with, then each flush):
  - a new run's ``user_id`` and its ``mlflow.user`` tag (added when the client sent none; the
    answer to ``runs/create`` shows a tag the client sent, rewritten, or none);
  - a model version's ``user_id``; a new registered model gets an ``mlflow.user`` tag (MLflow
    3.17 keeps no creator for registered models);
  - an ``mlflow.user`` tag written later (``set-tag``, ``log-batch``) on a run or registered
    model that has none gets the verified name; one that exists is never changed, so the
    creator stays the creator (the write still succeeds; other tags in it are kept), and
    deleting it is refused with PERMISSION_DENIED (deleting the run or model itself is not).
- Not vouched for (MLflow stores them as the client sends them): datasets' ``created_by``,
  assessments' ``source_id``, logged models' tags, traces' user metadata.
- ``GET /(ajax-)api/2.0/mlflow/users/current`` (MLflow's current-user call, which the UI makes
  on every page and which only MLflow's basic-auth app serves) answers the identity, so the
  UI shows the account; the account page's own roles and permissions calls answer the stack
  role (:func:`account_answer`). ``is_basic_auth`` is false: the UI's change-password form
  would call MLflow's user store, which this stack does not use (stackctl changes passwords).
- Requests without an identity (the container's health check, the in-container job runner)
  write what MLflow would write without this module.

A token's identity is its name as ``stackctl token add`` gave it; ``X-Stack-Auth: token``
tells it from a person.
"""

import contextvars
import json
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote

USER_TAG = "mlflow.user"
# The UI's account calls (MLflow serves them only in its basic-auth app).
ACCOUNT_PATH = re.compile(r"/(?:ajax-)?api/[23]\.0/mlflow/users/.+")
_CURRENT_USER = re.compile(r"/(?:ajax-)?api/2\.0/mlflow/users/current")
_CURRENT_PERMISSIONS = re.compile(r"/(?:ajax-)?api/3\.0/mlflow/users/current/permissions")
_ROLES_LIST = re.compile(r"/(?:ajax-)?api/3\.0/mlflow/users/roles/list")
ROLES = frozenset({"viewer", "editor", "admin"})
KINDS = frozenset({"password", "token"})


@dataclass(frozen=True)
class Identity:
    """Who a request is from: the verified name, its role and how it logged in."""

    name: str
    role: str
    kind: str


_current: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "mlflow_stack_identity", default=None
)


def from_headers(user: bytes, role: bytes | None, kind: bytes | None) -> Identity:
    """The identity nginx sent: ``user`` is the gate's percent-encoded UTF-8 name.

    A role or kind outside the known sets (an nginx that predates them) is recorded as
    unknown rather than trusted: it grants nothing here, it only labels.
    """
    name = unquote(user.decode("ascii", "replace"), encoding="utf-8", errors="replace")
    role_text = (role or b"").decode("ascii", "replace")
    kind_text = (kind or b"").decode("ascii", "replace")
    return Identity(
        name=name,
        role=role_text if role_text in ROLES else "unknown",
        kind=kind_text if kind_text in KINDS else "password",
    )


def current() -> Identity | None:
    """The identity of the request being served, or None (health check, job runner)."""
    return _current.get()


def serve_as(identity: Identity | None) -> contextvars.Token:
    """Make ``identity`` the current request's; returns the token to reset it with."""
    return _current.set(identity)


def reset(token: contextvars.Token) -> None:
    _current.reset(token)


# What each stack role means in the terms of MLflow's permission model, for the UI's account
# page. Descriptive only: the gate enforces the roles (scripts/mlflowstack/access.py).
_ROLE_PERMISSION = {"viewer": "READ", "editor": "EDIT", "admin": "MANAGE"}
_ROLE_DESCRIPTION = {
    "viewer": "Reads everything; changes nothing.",
    "editor": "Reads and changes experiments, runs, models, traces and artifacts.",
    "admin": "Everything, including server-wide settings.",
}
_RESOURCE_TYPES = ("experiment", "registered_model")


def account_answer(identity: Identity, path: str, query: bytes) -> tuple[int, bytes] | None:
    """The UI's account calls, answered from the verified identity; None for any other path.

    ``users/current`` (every page), ``users/current/permissions`` and ``users/roles/list``
    for the user's own name (the account page). Another user's roles are not known here
    (the users file is the gate's), so that is a 403 in MLflow's error shape.
    """
    if _CURRENT_USER.fullmatch(path):
        return 200, current_user_body(identity)
    permission = _ROLE_PERMISSION.get(identity.role)
    grants = [
        {"resource_type": kind, "resource_pattern": "*", "permission": permission}
        for kind in _RESOURCE_TYPES
        if permission
    ]
    if _CURRENT_PERMISSIONS.fullmatch(path):
        rows = [
            {"role_id": 0, "role_name": identity.role, "workspace": "default", **grant}
            for grant in grants
        ]
        return 200, _json({"is_admin": identity.role == "admin", "permissions": rows})
    if _ROLES_LIST.fullmatch(path):
        asked = parse_qs(query.decode("latin-1")).get("username", [identity.name])[0]
        if asked != identity.name:
            message = "Users and roles are managed with scripts/stackctl; only your own are shown."
            return 403, _json({"error_code": "PERMISSION_DENIED", "message": message})
        role = {
            "id": 0,
            "name": identity.role,
            "workspace": "default",
            "description": _ROLE_DESCRIPTION.get(identity.role, ""),
            "permissions": [{"id": 0, "role_id": 0, **grant} for grant in grants],
        }
        return 200, _json({"roles": [role]})
    return None


def _json(document) -> bytes:
    return json.dumps(document).encode()


def current_user_body(identity: Identity) -> bytes:
    """MLflow's ``users/current`` answer (the shape of its basic-auth app) for ``identity``."""
    return json.dumps(
        {
            "user": {
                # MLflow's user store numbers users; ours has names only, and the UI keys
                # nothing on this for the current user.
                "id": 0,
                "username": identity.name,
                "is_admin": identity.role == "admin",
                "role": identity.role,
                "auth": identity.kind,
            },
            "is_basic_auth": False,
        }
    ).encode()


# MLflow's row classes whose user_id column names the creator.
_CREATED_BY_USER_ID = frozenset({"SqlRun", "SqlModelVersion"})


def _on_construct(target, args, kwargs) -> None:
    """SQLAlchemy ``init`` (before a row object is built): the values MLflow passes in, so
    what a handler returns right away (``runs/create`` answers with the new run) already says
    who. ``kwargs`` may be changed in place at this point."""
    identity = _current.get()
    if identity is None:
        return
    if type(target).__name__ in _CREATED_BY_USER_ID:
        kwargs["user_id"] = identity.name
    elif kwargs.get("key") == USER_TAG:
        kwargs["value"] = identity.name


def _on_flush(session, flush_context, instances) -> None:
    """SQLAlchemy ``before_flush``, the last word before rows are written: a new creator tag
    names the identity (whatever was assigned after construction, e.g. a second tag of the
    same key in one ``log-batch``), a missing one is added, an existing one keeps its value,
    and deleting one is refused (unless its run or model goes with it)."""
    identity = _current.get()
    if identity is None:
        return
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED
    from mlflow.store.model_registry.dbmodels.models import (
        SqlRegisteredModel,
        SqlRegisteredModelTag,
    )
    from mlflow.store.tracking.dbmodels.models import SqlRun, SqlTag
    from sqlalchemy import inspect

    creator_tags = (SqlTag, SqlRegisteredModelTag)
    for row in list(session.new):
        if isinstance(row, creator_tags) and row.key == USER_TAG:
            row.value = identity.name
        elif isinstance(row, SqlRun) and not any(tag.key == USER_TAG for tag in row.tags):
            row.tags.append(SqlTag(key=USER_TAG, value=identity.name))
        elif isinstance(row, SqlRegisteredModel) and not any(
            tag.key == USER_TAG for tag in row.registered_model_tags
        ):
            tag = SqlRegisteredModelTag(key=USER_TAG, value=identity.name)
            row.registered_model_tags.append(tag)
            session.add(tag)
    for row in session.dirty:
        if isinstance(row, creator_tags) and row.key == USER_TAG:
            history = inspect(row).attrs.value.history
            if history.deleted:
                row.value = history.deleted[0]
    deleted = set(session.deleted)
    for row in deleted:
        if isinstance(row, creator_tags) and row.key == USER_TAG:
            parent = row.run if isinstance(row, SqlTag) else row.registered_model
            if parent not in deleted:
                raise MlflowException(
                    f"The {USER_TAG} tag records who created this; it cannot be deleted.",
                    error_code=PERMISSION_DENIED,
                )


def install() -> None:
    """Hook the identity into MLflow's row objects and every SQLAlchemy session (idempotent)."""
    from mlflow.store.model_registry.dbmodels.models import (
        SqlModelVersion,
        SqlRegisteredModelTag,
    )
    from mlflow.store.tracking.dbmodels.models import SqlRun, SqlTag
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    for model in (SqlRun, SqlTag, SqlModelVersion, SqlRegisteredModelTag):
        if not event.contains(model, "init", _on_construct):
            event.listen(model, "init", _on_construct)
    if not event.contains(Session, "before_flush", _on_flush):
        event.listen(Session, "before_flush", _on_flush)
