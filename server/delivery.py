"""Send a round's training messages and get every reply that can be had, retrying replies lost in transport.

A reply can be lost with no fault of the site: the SuperLink answers for a node whose heartbeat lapsed
(NODE_UNAVAILABLE; after a coordinator restart this is often a site's previous SuperNode while its new one has
already connected), a message or reply expired (MESSAGE_UNAVAILABLE, REPLY_MESSAGE_UNAVAILABLE), the ClientApp
process died (CLIENT_APP_CRASHED), or nothing came back before the round timeout. When too few usable replies are
left for the round to count, the same training message goes again to the connected nodes that have not answered,
at most `retries` times; a site that answered (or failed by itself: a ClientApp exception is not retried, it would
fail again) is never asked twice. Each attempt is reported to `on_attempt` so the round loop can record it.

Flower's error replies come from the SuperLink (src_node_id 1), so a reply is matched to its site by the message
it answers (`reply_to_message_id` -> the node it was sent to), never by its sender.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from flwr.app import Message
from flwr.common.constant import ErrorCode
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from server.store import RoundAttempt, now

LOST_CODES = {ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE,
              ErrorCode.CLIENT_APP_CRASHED}
NO_REPLY = "no reply before the round timeout"


def lost_reason(reply: Message | None) -> str | None:
    """Why a reply (None: none came) counts as lost in transport, or None when the site answered."""
    if reply is None:
        return NO_REPLY
    if reply.has_error() and reply.error.code in LOST_CODES:
        return reply.error.reason
    return None


@dataclass
class Delivery:
    replies: list[Message] = field(default_factory=list)  # one per node: its answer, else its last lost reply
    sent_to: dict[str, int] = field(default_factory=dict)  # message id -> the node it went to (every attempt)


def deliver(grid, make_messages: Callable[[list[int]], list[Message]], nodes: list[int], timeout: float,
            retries: int, needed: int, on_attempt: Callable[[dict[int, str]], None] | None = None,
            wait_s: float = 60.0) -> Delivery:
    """Send to `nodes`; while fewer than `needed` nodes answered and some replies were lost, resend to the
    connected nodes that have not answered (at most `retries` more times, waiting up to `wait_s` for enough
    nodes to be connected). on_attempt(lost node -> reason) after each attempt."""
    out = Delivery()
    answered: dict[int, Message] = {}
    lost_replies: dict[int, Message] = {}
    targets = list(nodes)
    for attempt in range(1, retries + 2):
        messages = make_messages(targets)
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # ids are set when pushed
        out.sent_to.update(sent)
        got = {sent.get(r.metadata.reply_to_message_id, r.metadata.src_node_id): r for r in replies}
        lost = {}
        for node in targets:
            reason = lost_reason(got.get(node))
            if reason is None:
                answered[node] = got[node]
                lost_replies.pop(node, None)
            else:
                lost[node] = reason
                if node in got:
                    lost_replies[node] = got[node]
        if on_attempt is not None:
            on_attempt(lost)
        if not lost or len(answered) >= needed or attempt > retries:
            break
        targets = _waiting_nodes(grid, answered, needed, wait_s)
        if not targets:
            break
    out.replies = list(answered.values()) + [r for n, r in lost_replies.items() if n not in answered]
    return out


def _waiting_nodes(grid, answered: dict[int, Message], needed: int, wait_s: float) -> list[int]:
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
        log(f"round {self.round}: {len(lost)} repl{'y' if len(lost) == 1 else 'ies'} lost in transport ({who[:300]})")

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
