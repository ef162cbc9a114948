"""The policy of one capture: the configured policy with the sections for its machine merged in.

The machine comes from the blob's path (:mod:`analyzer.store.blobpath`); a blob whose path names
no VM gets the base policy alone. docs/policy.md ("Scopes") describes the merge.
"""

from __future__ import annotations

from analyzer.judge.policy import Policy
from analyzer.judge.policy_scope import Machine
from analyzer.store.blobpath import UNKNOWN_VM, CaptureLocation


def machine_of(location: CaptureLocation) -> Machine | None:
    """The machine the path names (``None`` for an unattributed blob)."""
    if location.layout == "custom" or location.vm == UNKNOWN_VM:
        return None
    return Machine(location.subscription, location.resource_group, location.vm, location.scale_set)


def capture_policy(policy: Policy | None, location: CaptureLocation) -> Policy:
    """The policy that applies to the capture at ``location`` (the default without one)."""
    return (policy or Policy.default()).for_machine(machine_of(location))
