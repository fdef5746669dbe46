"""A Grid that delivers each message to the ClientApp of its node in this process (no transport)."""

from __future__ import annotations

import copy
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from hetlora.flower import client_app as client_module


class LoopbackGrid(Grid):
    """Delivers each message to the ClientApp of the node it is addressed to, in this process."""

    def __init__(self, partitions: int, fresh_process: bool = True):
        self.contexts = {100 + pid: Context(run_id=1, node_id=100 + pid, node_config={"partition-id": pid}, state=RecordDict(), run_config={})
                         for pid in range(partitions)}
        self.fresh_process = fresh_process
        self.bytes_sent = 0
        self.silent: set[int] = set()  # nodes that never reply
        self._pushed: dict[str, Message] = {}

    def set_run(self, run):  # pragma: no cover - not used by serve()
        pass

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        """Keep each message under a fresh id (as a SuperLink does); it is delivered when a pull asks for it."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            self._pushed[message.metadata.message_id] = message
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        """One pending message delivered per pull (replies arrive one at a time, in push order); a message
        whose node is ``silent`` never gets a reply."""
        for message_id in [i for i in self._pushed if i in set(message_ids)]:
            message = self._pushed.pop(message_id)
            if message.metadata.dst_node_id in self.silent:
                continue
            return [self.deliver(message)]
        return []

    def send_and_receive(self, messages, *, timeout=None):
        return [self.deliver(message) for message in messages if message.metadata.dst_node_id not in self.silent]

    def deliver(self, message):
        if self.fresh_process:
            client_module._HOSTS.clear()
        self.bytes_sent += sum(a.numpy().nbytes for rec in message.content.array_records.values() for a in rec.values())
        delivered = copy.deepcopy(message)  # a transport hands each node its own copy (SecAgg+ messages share content)
        try:
            return client_module.app(delivered, self.contexts[message.metadata.dst_node_id])
        except Exception as err:  # as a SuperNode does: the ClientApp's exception becomes an error reply
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(err).__name__}:'{err}'"), reply_to=delivered)
