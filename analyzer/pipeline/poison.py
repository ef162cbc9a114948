"""The blob trigger's poison queue: where it is, how long it is, and what its messages name.

The Functions host moves a blob-trigger message there after its last failed attempt; the queue
is shared by every function app whose blob triggers watch the account, so a message says whose
it is (``FunctionId``). Draining it is part of a reconcile run (:mod:`analyzer.pipeline.reconcile`).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.queue import QueueClient

from analyzer.store.connections import ConnectionSettings, queue_service_for

POISON_QUEUE = "webjobs-blobtrigger-poison"
# What the Functions host writes as a poison message's FunctionId for nwcap's blob trigger
# (``Host.Functions.`` and the function's name). Two nwcap apps on one account share it.
TRIGGER_FUNCTION_ID = "Host.Functions.process_capture"


@dataclass(frozen=True, slots=True)
class PoisonMessage:
    """What a blob-trigger poison message names: the function that gave up, and the blob."""

    function_id: str
    container: str
    blob: str

    def is_ours(self) -> bool:
        """True for a message of nwcap's blob trigger (``FunctionId`` compared ignoring case)."""
        return self.function_id.lower() == TRIGGER_FUNCTION_ID.lower()


def poison_message(content: str) -> PoisonMessage | None:
    """The blob-trigger poison message in ``content``, or ``None`` when it is not one. The host
    writes JSON (``FunctionId``, ``ContainerName``, ``BlobName``); queues written
    Base64-encoded are decoded first."""
    for text in (content, _base64_text(content)):
        if not text:
            continue
        try:
            document = json.loads(text)
        except ValueError:
            continue
        if isinstance(document, dict):
            function_id = document.get("FunctionId")
            container = document.get("ContainerName")
            name = document.get("BlobName")
            if all(isinstance(value, str) and value for value in (function_id, container, name)):
                return PoisonMessage(str(function_id), str(container), str(name))
    return None


def _base64_text(content: str) -> str:
    try:
        return base64.b64decode(content.encode("ascii"), validate=True).decode("utf-8")
    except (ValueError, binascii.Error, UnicodeError):
        return ""


def poison_queue(connection: ConnectionSettings) -> QueueClient:
    """The blob trigger's poison queue in the captures account of ``connection``."""
    return queue_service_for(connection).get_queue_client(POISON_QUEUE)


def poison_length(queue: QueueClient) -> int | None:
    """Approximate number of messages in the poison queue (``None``: no such queue)."""
    try:
        return int(queue.get_queue_properties().approximate_message_count or 0)
    except ResourceNotFoundError:
        return None
