"""The session state machine on its own: transitions fed in sequence, no server."""

from __future__ import annotations

import pytest

from chatserver.domain import AlreadyLoggedIn, NameTaken, NotLoggedIn, ResumeRefused
from chatserver.events import LEFT_DISCONNECTED, LEFT_SERVER_SHUTDOWN
from chatserver.lifecycle import Drop, Leave, LifecycleError, Sessions, State


def test_login_commit_then_disconnect_leaves() -> None:
    s = Sessions("node1")
    s.connect("a")
    session = s.claim("a", "alice")
    assert session.state is State.PENDING and session.id.startswith("node1-")
    assert s.is_ours(session.id)
    assert s.login_committed(session) == []
    assert s.active("a") is session
    [effect] = s.disconnect("a")
    assert effect == Leave(session, LEFT_DISCONNECTED)
    assert session.state is State.LEAVING and s.holder("alice") is session
    s.leave_committed(session)
    assert session.state is State.CLOSED and s.holder("alice") is None


def test_disconnect_while_pending_leaves_on_commit() -> None:
    # The squatting race: the socket goes while its login is being stored.
    s = Sessions()
    s.connect("b")
    session = s.claim("b", "x")
    assert s.disconnect("b") == []
    assert session.socket_gone and session.state is State.PENDING
    [effect] = s.login_committed(session)
    assert effect == Leave(session, LEFT_DISCONNECTED)
    assert s.holder("x") is session  # held until the leave is stored


def test_a_gone_socket_cannot_claim() -> None:
    s = Sessions()
    s.connect("b")
    s.disconnect("b")
    with pytest.raises(NotLoggedIn):
        s.claim("b", "x")


def test_one_name_one_holder_one_session_per_socket() -> None:
    s = Sessions()
    s.connect("a")
    s.connect("b")
    s.claim("a", "alice")
    with pytest.raises(NameTaken):
        s.claim("b", "alice")
    with pytest.raises(AlreadyLoggedIn):
        s.claim("a", "other")


def test_failed_leave_keeps_the_name_until_retried_and_stored() -> None:
    s = Sessions()
    s.connect("a")
    session = s.claim("a", "alice")
    s.login_committed(session)
    s.disconnect("a")
    s.leave_failed(session)
    assert session.state is State.LEAVE_FAILED and s.holder("alice") is session
    s.connect("b")
    with pytest.raises(NameTaken):
        s.claim("b", "alice")
    assert s.retry_leave(session) == Leave(session, LEFT_DISCONNECTED)
    s.leave_committed(session)
    assert s.claim("b", "alice").name == "alice"


def test_failed_login_frees_the_name() -> None:
    s = Sessions()
    s.connect("a")
    session = s.claim("a", "alice")
    assert s.login_failed(session) == []
    assert s.holder("alice") is None and s.socket("a").session is None  # type: ignore[union-attr]
    assert s.claim("a", "alice").state is State.PENDING


def test_takeover_retires_the_ghost_only_when_the_resume_commits() -> None:
    s = Sessions()
    s.connect("old")
    ghost = s.claim("old", "alice")
    s.login_committed(ghost)
    s.connect("new")
    session = s.claim("new", "alice", takeover=ghost)
    assert ghost.state is State.YIELDING
    with pytest.raises(NotLoggedIn):
        s.active("old")  # a yielding session takes no more chats
    effects = s.login_committed(session)
    assert effects == [Drop("old")]
    assert ghost.state is State.CLOSED and s.holder("alice") is session
    # The old socket's disconnect records nothing: its leave is in the resume.
    assert s.disconnect("old") == []


def test_failed_takeover_gives_the_name_back() -> None:
    s = Sessions()
    s.connect("old")
    ghost = s.claim("old", "alice")
    s.login_committed(ghost)
    s.connect("new")
    session = s.claim("new", "alice", takeover=ghost)
    assert s.login_failed(session) == []
    assert ghost.state is State.ACTIVE and s.holder("alice") is ghost
    assert s.active("old") is ghost


def test_failed_takeover_of_a_gone_ghost_leaves() -> None:
    s = Sessions()
    s.connect("old")
    ghost = s.claim("old", "alice")
    s.login_committed(ghost)
    s.connect("new")
    session = s.claim("new", "alice", takeover=ghost)
    assert s.disconnect("old") == []  # yielding: the takeover decides
    assert s.login_failed(session) == [Leave(ghost, LEFT_DISCONNECTED)]


def test_a_second_takeover_of_the_same_ghost_is_refused() -> None:
    s = Sessions()
    s.connect("old")
    ghost = s.claim("old", "alice")
    s.login_committed(ghost)
    s.connect("b")
    s.connect("c")
    s.claim("b", "alice", takeover=ghost)
    with pytest.raises(ResumeRefused) as refused:
        s.claim("c", "alice", takeover=ghost)
    assert refused.value.code == "name_busy"
    assert ghost.state is State.YIELDING


def test_superseded_session_is_dropped_without_a_leave() -> None:
    s = Sessions()
    s.connect("a")
    session = s.claim("a", "alice")
    s.login_committed(session)
    assert s.superseded(session) == [Drop("a")]
    assert session.state is State.CLOSED and s.holder("alice") is None


def test_shutdown_leave_and_illegal_transitions() -> None:
    s = Sessions()
    s.connect("a")
    session = s.claim("a", "alice")
    with pytest.raises(LifecycleError):
        s.leave(session, LEFT_SERVER_SHUTDOWN)  # not committed yet
    s.login_committed(session)
    assert s.leave(session, LEFT_SERVER_SHUTDOWN) == Leave(session, LEFT_SERVER_SHUTDOWN)
    with pytest.raises(LifecycleError):
        s.login_committed(session)
    with pytest.raises(LifecycleError):
        s.retry_leave(session)


def test_versions_are_counted_by_the_session() -> None:
    s = Sessions()
    s.connect("a")
    session = s.claim("a", "alice")
    session.version = 2
    assert [session.next_version() for _ in range(3)] == [3, 4, 5]
