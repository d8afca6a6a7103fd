"""How the server waits for a round's replies (server.round_wait): not for a SuperNode that restarted while
it held an instruction, and not past the timeout without a record; and for enough SuperNodes before a round's
step (server.strategy), not forever. On Flower's own in-memory SuperLink state and grid (tests/test_deployment.py:
real processes)."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.proto.task_pb2 import Task
from flwr.server.superlink.linkstate import InMemoryLinkState, LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid import InMemoryGrid

from server.round_wait import RESTARTED, RoundWaitGrid
from server.rounds import round_rows
from server.strategy import PartnerFedAvg, TooFewPartners, make_strategy
from shared.federation.settings import FederationSettings
from tests.test_screening import SENT, _Grid, evaluation_content, reply, train_content

HEARTBEAT = 30.0


@pytest.fixture
def superlink() -> Iterator[tuple[InMemoryLinkState, InMemoryGrid, int]]:
    """Flower's in-memory SuperLink state with one run, one active SuperNode, and the ServerApp's grid."""
    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    assert isinstance(state, InMemoryLinkState)
    run = Run.create_empty(run_id=7)
    run.primary_task_id, run.federation_id = 11, NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)  # as flwr.simulation.run_simulation registers its run
    state.task_store[11] = Task(task_id=11, run_id=run.run_id)
    node = state.create_node("owner", "owner", secrets.token_bytes(32), heartbeat_interval=HEARTBEAT)
    assert state.activate_node(node, HEARTBEAT)
    grid = InMemoryGrid(state_factory=factory, pull_interval=0.05)
    grid.set_run(run)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run.run_id, 1, 11  # the ServerApp's, as Flower sets them
    yield state, grid, node


def instruction(node: int) -> Message:
    return Message(content=RecordDict({"arrays": ArrayRecord({"w": torch.ones(2)})}), dst_node_id=node, message_type=MessageType.TRAIN)


def test_a_supernode_activated_again_after_its_instruction_gets_a_reply_saying_so(
    superlink: tuple[InMemoryLinkState, InMemoryGrid, int],
) -> None:
    state, grid, node = superlink

    def restart() -> None:
        """The node's process dies holding the instruction; a new one activates before the server's next pull,
        so the SuperLink, which answers only for a node that is offline when pulled, sees it online."""
        time.sleep(0.3)
        with state.lock:  # between two pulls
            state.deactivate_node(node)
            time.sleep(0.001)  # activation times are the SuperLink's clock, in microseconds
            assert state.activate_node(node, HEARTBEAT)

    restarted = threading.Thread(target=restart)
    restarted.start()
    started = time.monotonic()
    replies = list(RoundWaitGrid(grid).send_and_receive([instruction(node)], timeout=30))
    restarted.join()
    assert time.monotonic() - started < 5  # not the timeout
    assert len(replies) == 1 and replies[0].has_error() and replies[0].error.reason == RESTARTED
    assert replies[0].metadata.src_node_id == node  # the reply is the node's, as the server names rows by it


def test_a_supernode_still_running_is_waited_for_until_the_timeout_and_then_recorded(
    superlink: tuple[InMemoryLinkState, InMemoryGrid, int],
) -> None:
    _, grid, node = superlink
    started = time.monotonic()
    replies = list(RoundWaitGrid(grid).send_and_receive([instruction(node)], timeout=0.5))
    assert time.monotonic() - started >= 0.5
    # Flower's own wait returns nothing for it; here the round's record shows it, and why
    assert len(replies) == 1 and replies[0].has_error() and replies[0].metadata.src_node_id == node
    assert replies[0].error.reason == "Error: no reply within 0.5 s (run config round-timeout): the server stopped waiting for it"
    assert list(grid.send_and_receive([instruction(node)], timeout=0.5)) == []


def test_a_partner_whose_supernode_went_offline_is_named_in_its_row(superlink: tuple[InMemoryLinkState, InMemoryGrid, int]) -> None:
    """Flower's SuperLink answers for a SuperNode that stopped sending heartbeats (its machine went down)
    from its own node id; the server's grid gives that reply the node of the instruction it answers, so
    the partner's row is its own (tests/test_deployment.py has the real thing)."""
    state, grid, gone = superlink
    state.deactivate_node(gone)  # offline before it replied
    assert [r.metadata.src_node_id for r in grid.send_and_receive([instruction(gone)], timeout=5)] != [gone]  # Flower's: the SuperLink's
    (offline,) = RoundWaitGrid(grid).send_and_receive([instruction(gone)], timeout=5)
    assert offline.has_error() and offline.metadata.src_node_id == gone

    strategy = PartnerFedAvg()
    strategy.configure_train(1, ArrayRecord(SENT), ConfigRecord({}), grid=_Grid())  # type: ignore[arg-type]
    strategy.aggregate_train(1, [offline, *(reply(node, train_content(name=f"p{node}")) for node in (1, 2, 4))])
    log = strategy.finish_round(1)
    strategy.configure_evaluate(1, ArrayRecord(SENT), ConfigRecord({}), grid=_Grid())  # type: ignore[arg-type]
    strategy.aggregate_evaluate(1, [reply(gone, evaluation_content("p3", 0.1))])  # back in time to be scored
    log = strategy.finish_round(1)
    rows = {r["partner"]: r for r in round_rows(1, log)}
    assert set(rows) == {"p1", "p2", "p3", "p4"}
    assert rows["p3"]["failed"] and "Node Unavailable" in rows["p3"]["note"] and rows["p3"]["node_id"] == gone
    assert not any(rows[p]["failed"] for p in ("p1", "p2", "p4"))


def test_a_round_waits_for_min_partners_at_most_partners_timeout(superlink: tuple[InMemoryLinkState, InMemoryGrid, int]) -> None:
    """Flower's sampling waits for min-partners SuperNodes without a limit: a partner that never comes
    back would hold the run for ever. The strategy waits at most partners-timeout, then stops the run saying why."""
    state, grid, _ = superlink
    strategy = make_strategy(FederationSettings(min_partners=2, partners_timeout=0.5))
    started = time.monotonic()
    with pytest.raises(TooFewPartners) as info:
        strategy.configure_train(1, ArrayRecord(SENT), ConfigRecord({}), grid)
    assert 0.5 <= time.monotonic() - started < 5
    assert str(info.value).startswith(
        "round 1's training: 1 SuperNode(s) connected, 2 needed (run config min-partners), after waiting 0.5 s "
        "(run config partners-timeout). The run stops here; start it again with the same run-id to resume after its last "
        "finished round, once they are back or with a lower min-partners"
    )

    def join() -> None:  # a second partner's SuperNode connects while the round waits
        time.sleep(0.3)
        assert state.activate_node(state.create_node("owner", "owner", secrets.token_bytes(32), heartbeat_interval=HEARTBEAT), HEARTBEAT)

    joining = threading.Thread(target=join)
    joining.start()
    waiting = make_strategy(FederationSettings(min_partners=2, partners_timeout=30))
    instructions = list(waiting.configure_evaluate(1, ArrayRecord(SENT), ConfigRecord({}), grid))
    joining.join()
    assert len(instructions) == 2 and time.monotonic() - started < 10  # both partners, as soon as the second came
