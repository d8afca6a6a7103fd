"""How the server waits for a round's replies: not for a SuperNode that restarted while it held an
instruction, and not past the run's ``round-timeout`` without saying so.

A SuperNode pulls an instruction once. If it restarts before it replies (its
machine went down and a restart policy brought it back), the new process is
never given that instruction again, and Flower's SuperLink, which answers for a
node that is offline ("Node Unavailable"), sees this one online again. Unless
the SuperLink pulled its answer before the restart, the round would wait for
the strategy's timeout. :class:`RoundWaitGrid` notes each addressee's
activation time when a round's instructions are sent and answers for a node
activated again since, with an error reply that says so; the round goes on
without it (tests/test_deployment.py kills and restarts a real SuperNode). A
partner still silent at the timeout gets such a reply too: Flower's own wait
returns nothing for it, and the round's record would not show it at all. And a
reply the SuperLink makes for an offline node comes from the SuperLink's own
node id; it is handed on as the node's, so the partner's row is its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

RESTARTED = (
    "Error: SuperNode activated again after it received this instruction (it restarted, or came back after "
    "missing its heartbeats): the server stopped waiting for its reply"
)

FLOWER_PULL_INTERVAL = 3.0  # seconds between pulls, as Flower's own send_and_receive waits (deployed); a simulation's grid says its own


class RoundWaitGrid(Grid):
    """``grid``, with a ``send_and_receive`` that does not wait for a SuperNode activated again after
    the instructions were sent and answers for the silent ones at the timeout (every other call goes
    to ``grid`` unchanged)."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.pull_interval = float(getattr(grid, "pull_interval", FLOWER_PULL_INTERVAL))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's ``send_and_receive`` (push, then pull until every reply is in or ``timeout``), plus:
        an instruction whose SuperNode has been activated again since it was sent gets an error reply
        (:data:`RESTARTED`) instead of being waited for, and one still unanswered at ``timeout`` an error
        reply saying so (Flower returns nothing for it, so the round's record would not show it)."""
        messages = list(messages)
        # noted just before sending: a node activated after this is not waited for (one activated in the instant
        # between this and the push would cost its update of this round, where a missed restart costs the round its timeout)
        activated = self._activations()
        pushed = set(self.grid.push_messages(messages))  # Flower's grid sets each message's id in place as it pushes it
        waiting = {msg.metadata.message_id: msg for msg in messages if msg.metadata.message_id in pushed}
        replies: list[Message] = []
        end = None if timeout is None else time.monotonic() + timeout
        while waiting:
            for reply in self.grid.pull_messages(list(waiting)):
                replies.append(_from_addressee(reply, waiting.pop(reply.metadata.reply_to_message_id, None)))
            if waiting:
                now = self._activations()
                for message_id, msg in list(waiting.items()):
                    node = msg.metadata.dst_node_id
                    if node in now and now[node] != activated.get(node):
                        replies.append(Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=RESTARTED), reply_to=msg))
                        del waiting[message_id]
            if not waiting:
                break
            if end is not None and time.monotonic() >= end:  # recorded as failed, saying why, rather than left out unsaid
                late = f"Error: no reply within {timeout:g} s (run config round-timeout): the server stopped waiting for it"
                replies += [Message(Error(code=ErrorCode.REPLY_MESSAGE_UNAVAILABLE, reason=late), reply_to=msg) for msg in waiting.values()]
                break
            time.sleep(self.pull_interval)
        return replies

    def _activations(self) -> dict[int, str]:
        """Each connected SuperNode's last activation, as the SuperLink records it (its own clock)."""
        return {node.node_id: node.last_activated_at for node in self.grid.get_nodes()}

    # everything else: the grid's own
    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)


def _from_addressee(reply: Message, sent: Message | None) -> Message:
    """``reply`` as coming from the node its instruction went to. The SuperLink makes the error reply for
    a node that is offline ("Node Unavailable") from its own node id; the server names a round's rows by
    the replying node, so such a reply is made again, the same error, in answer to ``sent``."""
    if sent is None or not reply.has_error() or reply.metadata.src_node_id == sent.metadata.dst_node_id:
        return reply
    return Message(reply.error, reply_to=sent)
