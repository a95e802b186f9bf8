"""A Grid that delivers messages to in-process ClientApps: the server loop, strategies and workflows without
servers (tests, benchmarks). Each node keeps its Context state across messages, as a SuperNode does."""

from __future__ import annotations

import copy
import uuid

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid:
    def __init__(self, app, node_configs: dict[int, dict], run_config: dict | None = None, run_id: int = 1):
        self.app, self.node_configs, self.run_config, self.run_id = app, node_configs, run_config or {}, run_id
        self.sent: list[Message] = []
        self.received: list[Message] = []  # every reply, as the server got it
        self.states = {n: RecordDict() for n in node_configs}  # a SuperNode keeps each node's Context state
        self.run = type("Run", (), {"run_id": run_id})()  # what legacy workflows read (grid.run.run_id)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 1  # what a ServerApp process is given

    def get_node_ids(self):
        return list(self.node_configs)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what the SuperLink assigns on push
            m.metadata.__dict__["_run_id"] = self.run_id
            self.sent.append(m)
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
            replies.append(reply)
            self.received.append(reply)
        return replies
