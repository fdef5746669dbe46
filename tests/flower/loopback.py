"""A Grid that delivers each message to the ClientApp of its node in this process (no transport)."""

from __future__ import annotations

import copy

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

    def set_run(self, run):  # pragma: no cover - not used by serve()
        pass

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            if self.fresh_process:
                client_module._HOSTS.clear()
            self.bytes_sent += sum(a.numpy().nbytes for rec in message.content.array_records.values() for a in rec.values())
            delivered = copy.deepcopy(message)  # a transport hands each node its own copy (SecAgg+ messages share content)
            try:
                replies.append(client_module.app(delivered, self.contexts[message.metadata.dst_node_id]))
            except Exception as err:  # as a SuperNode does: the ClientApp's exception becomes an error reply
                replies.append(Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(err).__name__}:'{err}'"),
                                       reply_to=delivered))
        return replies
