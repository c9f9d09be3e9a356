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
    creator stays the creator (the write still succeeds; other tags in it are kept).
- ``GET /(ajax-)api/2.0/mlflow/users/current`` (MLflow's current-user call, which the UI makes
  on every page and which only MLflow's basic-auth app serves) answers the identity, so the
  UI shows the account. ``is_basic_auth`` is false: the UI's change-password form would call
  MLflow's user store, which this stack does not use (passwords are changed with stackctl).
- Requests without an identity (the container's health check, the in-container job runner)
  write what MLflow would write without this module.

A token's identity is its name as ``stackctl token add`` gave it; ``X-Stack-Auth: token``
tells it from a person.
"""

import contextvars
import json
import re
from dataclasses import dataclass
from urllib.parse import unquote

USER_TAG = "mlflow.user"
CURRENT_USER_PATH = re.compile(r"/(?:ajax-)?api/2\.0/mlflow/users/current")
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
    """SQLAlchemy ``before_flush``: add a missing creator tag; keep an existing one."""
    identity = _current.get()
    if identity is None:
        return
    from mlflow.store.model_registry.dbmodels.models import (
        SqlRegisteredModel,
        SqlRegisteredModelTag,
    )
    from mlflow.store.tracking.dbmodels.models import SqlRun, SqlTag
    from sqlalchemy import inspect

    for row in list(session.new):
        if isinstance(row, SqlRun) and not any(tag.key == USER_TAG for tag in row.tags):
            row.tags.append(SqlTag(key=USER_TAG, value=identity.name))
        elif isinstance(row, SqlRegisteredModel) and not any(
            tag.key == USER_TAG for tag in row.registered_model_tags
        ):
            tag = SqlRegisteredModelTag(key=USER_TAG, value=identity.name)
            row.registered_model_tags.append(tag)
            session.add(tag)
    for row in session.dirty:
        if isinstance(row, SqlTag | SqlRegisteredModelTag) and row.key == USER_TAG:
            history = inspect(row).attrs.value.history
            if history.deleted:
                row.value = history.deleted[0]


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
