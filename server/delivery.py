"""Send a round's messages and hand on each reply as it arrives, retrying training replies lost in transport.

Messages go out with `grid.push_messages`; replies are pulled with `grid.pull_messages` every POLL_S seconds until
every node answered or the round timeout passed. The SuperLink hands out each reply once (pulling deletes it), and
a pull returns every reply available for the ids it names, fully inflated, so ids are pulled one at a time: each
reply is given to the caller (the strategy folds it, server/strategy.py) and let go before the next is pulled,
and the coordinator never holds more than one reply's arrays, however many sites answer together.

A reply can be lost with no fault of the site: the SuperLink answers for a node whose heartbeat lapsed
(NODE_UNAVAILABLE; after a coordinator restart this is often a site's previous SuperNode while its new one has
already connected), a message or reply expired (MESSAGE_UNAVAILABLE, REPLY_MESSAGE_UNAVAILABLE), the ClientApp
process died (CLIENT_APP_CRASHED), or nothing came back before the round timeout. When too few usable replies are
left for the round to count, the same training message goes again to the connected nodes that have not answered,
at most `retries` times; a site that answered (or failed by itself: a ClientApp exception is not retried, it would
fail again) is never asked twice. Each attempt is reported to `on_attempt` so the round loop can record it. The
lost replies of nodes that never answered come last, once every attempt is over, so the strategy records them.

Flower's error replies come from the SuperLink (src_node_id 1), so a reply is matched to its site by the message
it answers (`reply_to_message_id` -> the node it was sent to, in `sent_to`), never by its sender.
"""

from __future__ import annotations

import gc
import time
from typing import Callable, Iterator

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common.constant import ErrorCode
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from server.lifecycle import OPERATOR_NOTE
from server.store import RoundAttempt, now
from server.task_sum import array_view
from transport.protocol import ARRAYS
from transport.wire import arrays_of, joined_record

POLL_S = 0.1  # between pulls of the replies still awaited
LOST_CODES = {ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE,
              ErrorCode.CLIENT_APP_CRASHED}
NO_REPLY = "no reply before the round timeout"
NOT_PUSHED = "the SuperLink did not take the message"


def lost_reason(reply: Message | None) -> str | None:
    """Why a reply (None: none came) counts as lost in transport, or None when the site answered."""
    if reply is None:
        return NO_REPLY
    if reply.has_error() and reply.error.code in LOST_CODES:
        return reply.error.reason
    return None


def on_wire(messages: list[Message]) -> tuple[list[Message], int]:
    """The messages with their weights joined, one Array per dtype (transport/wire.py): a message is then a few
    objects, not two per parameter group. Messages sharing one ArrayRecord (a round's) share its joined copy.
    -> (messages to push, joined copies made)."""
    joined: dict[int, tuple[ArrayRecord, ArrayRecord]] = {}  # id(record) -> (record, kept alive while in use)
    out = []
    for m in messages:
        content = m.content
        if (record := arrays_of(content)) is not None:
            if id(record) not in joined:
                joined[id(record)] = (record, joined_record({k: array_view(a) for k, a in record.items()}))
            content = RecordDict({**content, ARRAYS: joined[id(record)][1]})
        out.append(Message(content, dst_node_id=m.metadata.dst_node_id, message_type=m.metadata.message_type,
                           ttl=m.metadata.ttl, group_id=m.metadata.group_id))
    return out, len(joined)


def push(grid, messages: list[Message], sent_to: dict[str, int]) -> dict[str, int]:
    """Push messages, weights joined -> message id -> node of those the SuperLink took (also recorded in sent_to)."""
    wire, copies = on_wire(messages)
    taken = {i for i in grid.push_messages(wire) if i}
    pushed = {m.metadata.message_id: m.metadata.dst_node_id for m in wire if m.metadata.message_id in taken}
    sent_to.update(pushed)
    del wire
    if copies:
        # the joined copy is garbage once sent, but views Flower made of the messages' records refer to themselves
        # (transport/wire.py, drop_arrays), so it would wait for a cycle collection while the round holds a second
        # copy of the model; collect now. (A simulation's grid keeps the messages it was given, so they cannot be
        # emptied instead.) run_federation froze the imports' objects: this looks at new ones only, 15 ms, not 0.2 s
        gc.collect()
    return pushed


def arrivals(grid, pending: dict[str, int], timeout: float) -> Iterator[tuple[int, Message]]:
    """(node, reply) for the message ids in `pending` as their replies arrive, each once; what is left in
    `pending` afterwards had no reply before the timeout."""
    deadline = time.monotonic() + timeout
    while pending:
        for message_id in list(pending):
            replies = list(grid.pull_messages([message_id]))
            while replies:
                reply = replies.pop(0)
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is not None:  # a reply to something else, or one already handed on, is not ours
                    yield node, reply
                del reply  # the caller is done with it: it goes before the next pull
        if not pending or time.monotonic() > deadline:
            return
        time.sleep(POLL_S)


def stream(grid, messages: list[Message], timeout: float, sent_to: dict[str, int]) -> Iterator[Message]:
    """Send once; the replies as they arrive (evaluation, reports: no retries, a missing reply is just missing)."""
    for _, reply in arrivals(grid, push(grid, list(messages), sent_to), timeout):
        yield reply
        del reply


def deliver(grid, make_messages: Callable[[list[int]], list[Message]], nodes: list[int], timeout: float,
            retries: int, needed: int, sent_to: dict[str, int],
            on_attempt: Callable[[dict[int, str]], None] | None = None, wait_s: float = 60.0) -> Iterator[Message]:
    """Send to `nodes` and yield each answer as it arrives; while fewer than `needed` nodes answered and some
    replies were lost, resend to the connected nodes that have not answered (at most `retries` more times, waiting
    up to `wait_s` for enough nodes to be connected); then yield the last lost reply of each node that never
    answered. on_attempt(lost node -> reason) after each attempt; sent_to gets every message id -> node."""
    answered: set[int] = set()
    lost_replies: dict[int, Message] = {}  # error replies only: no arrays
    targets = list(nodes)
    for attempt in range(1, retries + 2):
        messages = make_messages(targets)
        pending = push(grid, messages, sent_to)
        taken = set(pending.values())  # the messages passed in never get ids: push sends joined copies
        lost = {m.metadata.dst_node_id: NOT_PUSHED for m in messages if m.metadata.dst_node_id not in taken}
        for node, reply in arrivals(grid, pending, timeout):
            if (reason := lost_reason(reply)) is None:
                answered.add(node)
                lost_replies.pop(node, None)
                lost.pop(node, None)
                yield reply
            else:
                lost[node], lost_replies[node] = reason, reply
            del reply
        lost.update({node: NO_REPLY for node in pending.values()})
        if on_attempt is not None:
            on_attempt(lost)
        if not lost or len(answered) >= needed or attempt > retries:
            break
        targets = _waiting_nodes(grid, answered, needed, wait_s)
        if not targets:
            break
    for node, reply in lost_replies.items():
        if node not in answered:
            yield reply


def _waiting_nodes(grid, answered: set[int], needed: int, wait_s: float) -> list[int]:
    """Connected nodes that have not answered, once answered + these could reach `needed` (bounded wait)."""
    deadline = time.monotonic() + wait_s
    while True:
        waiting = [n for n in grid.get_node_ids() if n not in answered]
        if len(answered) + len(waiting) >= needed or time.monotonic() > deadline:
            return waiting
        time.sleep(1.0)


class Only:
    """The grid as a strategy's configure_train sees it: only the nodes this attempt goes to."""

    def __init__(self, grid, nodes: list[int]):
        self.grid, self.nodes = grid, list(nodes)

    def get_node_ids(self):
        return self.nodes


class RoundAttempts:
    """The round_attempts rows of one round: one per sending of its training messages. The open row is committed
    at once, so a coordinator that dies mid-round leaves it 'running' and the resume marks it 'interrupted'."""

    def __init__(self, engine, run_id: int, rnd: int, flwr_run_id: int | None):
        self.engine, self.run_id, self.round = engine, run_id, rnd
        self.flwr_run_id = None if flwr_run_id is None else str(flwr_run_id)
        self.row_id: int | None = None

    def start(self, sent: int) -> None:
        """A sending begins; one begun before it in this round was retried."""
        if self.row_id is not None:
            self._close("retried")
        with Session(self.engine) as s:
            done = s.scalar(select(func.count()).select_from(RoundAttempt).where(
                RoundAttempt.run_id == self.run_id, RoundAttempt.round == self.round))
            row = RoundAttempt(run_id=self.run_id, round=self.round, attempt=done + 1,
                               flwr_run_id=self.flwr_run_id, sent=sent, outcome="running")
            s.add(row)
            s.commit()
            self.row_id = row.id

    def end(self, lost: dict[int, str], strategy, log) -> None:
        """After one sending: which replies were lost in transport, and why."""
        if not lost:
            return
        who = "; ".join(f"{strategy.site_names.get(n, f'node-{n}')} (node {n}): {r}" for n, r in lost.items())
        with Session(self.engine) as s:
            row = s.get(RoundAttempt, self.row_id)
            row.lost, row.detail = len(lost), who[:4000]
            s.commit()
        log(f"{OPERATOR_NOTE}round {self.round}: {len(lost)} repl{'y' if len(lost) == 1 else 'ies'} lost in "
            f"transport ({who[:300]})")

    def fail(self, why: str) -> None:
        if self.row_id is not None:
            self._close("failed", why[:4000])

    def finish(self, s: Session) -> None:
        """In the round's own transaction: the open attempt is the one that counted."""
        if self.row_id is not None:
            s.execute(update(RoundAttempt).where(RoundAttempt.id == self.row_id, RoundAttempt.outcome == "running")
                      .values(outcome="ok", ended_at=now()))

    def _close(self, outcome: str, detail: str | None = None) -> None:
        with Session(self.engine) as s:
            row = s.get(RoundAttempt, self.row_id)
            if row.outcome == "running":
                row.outcome, row.ended_at = outcome, now()
                row.detail = "; ".join(d for d in (row.detail, detail) if d)[:4000] or None
                s.commit()
