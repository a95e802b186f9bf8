"""A Grid that delivers messages to in-process ClientApps: the server loop, strategies and workflows without
servers (tests, benchmarks). Each node keeps its Context state across messages, as a SuperNode does.

Like the SuperLink, `push_messages` gives each message an id and `pull_messages` hands out each reply once. A
ClientApp handles its message when the reply is first pulled, so a caller pulling one id at a time
(server/delivery.py) gets each reply as soon as its site is done, before the next site starts."""

from __future__ import annotations

import copy
import uuid

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid:
    def __init__(self, app, node_configs: dict[int, dict], run_config: dict | None = None, run_id: int = 1,
                 keep: bool = True):
        self.app, self.node_configs, self.run_config, self.run_id = app, node_configs, run_config or {}, run_id
        self.keep = keep  # keep every message for inspection (tests); benchmarks at model size do not
        self.sent: list[Message] = []
        self.received: list[Message] = []  # every reply, as the server got it
        self.waiting: dict[str, Message] = {}  # message id -> pushed message whose reply was not pulled yet
        self.states = {n: RecordDict() for n in node_configs}  # a SuperNode keeps each node's Context state
        self.run = type("Run", (), {"run_id": run_id})()  # what legacy workflows read (grid.run.run_id)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 1  # what a ServerApp process is given

    def get_node_ids(self):
        return list(self.node_configs)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what the SuperLink assigns on push
            m.metadata.__dict__["_run_id"] = self.run_id
            if self.keep:
                self.sent.append(m)
            self.waiting[m.metadata.message_id] = m
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        """The replies to those of message_ids not pulled before, each handled now by its node's ClientApp."""
        return [self._handle(m) for i in message_ids if (m := self.waiting.pop(i, None)) is not None]

    def send_and_receive(self, messages, timeout=None):
        return self.pull_messages(self.push_messages(messages))

    def _handle(self, m: Message) -> Message:
        node = m.metadata.dst_node_id
        ctx = Context(run_id=self.run_id, node_id=node, node_config=self.node_configs[node],
                      state=self.states[node], run_config=self.run_config)
        try:
            TaskIdentity.node_id = node
            # each node gets its own copy, as if it came over the wire (SecAgg+'s mod edits what it receives)
            reply = self.app(copy.deepcopy(m), ctx)
        except Exception as e:  # the SuperNode turns a ClientApp exception into an error reply
            reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=m)
        finally:
            TaskIdentity.node_id = 0
        reply.metadata.__dict__["_src_node_id"] = node
        if self.keep:  # a copy: the server's side may edit the reply (server/secure.py restores masked vectors)
            self.received.append(copy.deepcopy(reply))
        return reply
