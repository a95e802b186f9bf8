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
    lost: dict[int, str] = field(default_factory=dict)  # node -> why its reply was lost (last attempt)
    attempts: int = 0


def deliver(grid, make_messages: Callable[[list[int]], list[Message]], nodes: list[int], timeout: float,
            retries: int, needed: int, on_attempt: Callable[[int, list[int], dict[int, str]], None] | None = None,
            wait_s: float = 60.0) -> Delivery:
    """Send to `nodes`; while fewer than `needed` nodes answered and some replies were lost, resend to the
    connected nodes that have not answered (at most `retries` more times, waiting up to `wait_s` for enough
    nodes to be connected). on_attempt(attempt, nodes sent to, lost node -> reason) after each attempt."""
    out = Delivery()
    answered: dict[int, Message] = {}
    lost_replies: dict[int, Message] = {}
    targets = list(nodes)
    for attempt in range(1, retries + 2):
        out.attempts = attempt
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
        out.lost = {n: r for n, r in {**out.lost, **lost}.items() if n not in answered}
        if on_attempt is not None:
            on_attempt(attempt, targets, lost)
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
