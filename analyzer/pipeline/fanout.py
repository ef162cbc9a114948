"""The reconciler's work fanned out through a storage queue, so that a backlog drains in minutes.

One timer run processing captures one after another drains a few dozen per run; a backlog of
thousands (an outage, a lost Event Grid subscription, a redeploy) would take hours. Instead
the timer only decides what is due and sends one message per capture to :data:`FANOUT_QUEUE`;
a queue-triggered function processes each message as the reconciler would have, and the host
spreads the messages over as many instances and workers as the app's scale settings allow.

Nothing about correctness moves to the queue: a message is only a hint, like an Event Grid
event. Processing claims the capture row first (a conditional write), a claim less than
``stale_after`` old makes the message's run leave the capture to the run under way
(``busy``), and a capture already final at its ETag costs one read. A message lost, expired
or parked in the queue's poison queue leaves its capture due, and the next timer run sends
it again. So that a queue still draining is not flooded with copies of what it holds, a run
sends at most its limit less the messages already waiting.
"""

from __future__ import annotations

import contextlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from azure.core.exceptions import ResourceExistsError
from azure.storage.queue import QueueClient, QueueServiceClient, TextBase64EncodePolicy

log = logging.getLogger(__name__)

FANOUT_QUEUE = "nwcap-captures"
# Messages expire after this long: a capture still due then is sent again by a later run.
MESSAGE_TTL = 48 * 3600
_MAX_MESSAGE = 4096  # characters: a blob path is at most 1,024
_PARALLEL_SENDS = 8


@dataclass(frozen=True, slots=True)
class QueuedCapture:
    """A capture due for a run: its container, blob name and why it is due."""

    container: str
    blob: str
    reason: str

    def to_message(self) -> str:
        return json.dumps(
            {"container": self.container, "blob": self.blob, "reason": self.reason},
            separators=(",", ":"),
        )

    @classmethod
    def from_message(cls, text: str) -> QueuedCapture | None:
        """The capture a message names, or ``None`` when it is not one of these messages."""
        if len(text) > _MAX_MESSAGE:
            return None
        try:
            fields = json.loads(text)
        except ValueError:
            return None
        if not isinstance(fields, dict):
            return None
        values = [fields.get(name) for name in ("container", "blob", "reason")]
        if not all(isinstance(value, str) and value for value in values[:2]):
            return None
        reason = values[2] if isinstance(values[2], str) else ""
        return cls(str(values[0]), str(values[1]), reason[:40])


def fanout_queue(service: QueueServiceClient, *, create: bool) -> QueueClient:
    """The fan-out queue, its messages Base64-encoded as the queue trigger expects; created
    when ``create`` (with a connection string; identity-based deployments create it in Bicep)."""
    queue = service.get_queue_client(FANOUT_QUEUE, message_encode_policy=TextBase64EncodePolicy())
    if create:
        with contextlib.suppress(ResourceExistsError):
            queue.create_queue()
    return queue


class QueueFanout:
    """Sends due captures to the fan-out queue (see the module's docstring)."""

    def __init__(self, queue: QueueClient, *, limit: int) -> None:
        self.queue = queue
        self.limit = limit

    def room(self) -> int:
        """How many messages this run may send: the limit less those still waiting."""
        waiting = self.queue.get_queue_properties().approximate_message_count or 0
        return max(0, self.limit - waiting)

    def send(self, captures: list[QueuedCapture]) -> int:
        """Send one message per capture, a few at a time; returns how many were sent (a send
        that fails leaves its capture due for the next run)."""

        def send_one(capture: QueuedCapture) -> bool:
            self.queue.send_message(capture.to_message(), time_to_live=MESSAGE_TTL)
            return True

        sent = 0
        with ThreadPoolExecutor(max_workers=_PARALLEL_SENDS) as pool:
            futures = [pool.submit(send_one, capture) for capture in captures]
            for capture, future in zip(captures, futures, strict=True):
                try:
                    sent += future.result()
                except Exception as error:  # noqa: PERF203 - the next run sends it again
                    log.warning("Could not queue %s/%s: %s", capture.container, capture.blob, error)
        return sent
