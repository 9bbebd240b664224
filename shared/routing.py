"""Which runner renders a request: data, not a race.

A ``cover.requested`` message carries the attribute ``runner`` (``cpu``: a Cloud Run Job execution
started by the push trigger; ``gpu``: a GPU runner pulling its own subscription). The two
subscriptions have complementary filters, so every request reaches exactly one of them; a message
without the attribute (a direct publisher that does not set it) goes to the deployment's default
runner. The dispatcher always sets it: the request's ``runner`` if given, else ``COVER_DEFAULT_RUNNER``.
Claims stay, as the net for duplicate deliveries only.

Every consumer can also check the route itself (``COVER_SERVES``, :func:`routed_to`): a message routed
elsewhere is acknowledged unread. In production the filters make that check idle; the Pub/Sub emulator
accepts filters but does not apply them, so the rehearsal stack (``make serve``) relies on it.

``infra/main.tf`` writes the same filters in HCL (a test checks they match these).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

ATTRIBUTE = "runner"
Runner = Literal["cpu", "gpu"]
RUNNERS: tuple[Runner, ...] = ("cpu", "gpu")


def subscription_filters(default: Runner) -> dict[Runner, str]:
    """The Pub/Sub filter of each runner's subscription when ``default`` takes unmarked requests."""
    other: Runner = "gpu" if default == "cpu" else "cpu"
    return {
        default: f'NOT attributes.{ATTRIBUTE} = "{other}"',  # its own, and every unmarked request
        other: f'attributes.{ATTRIBUTE} = "{other}"',
    }


def routed_to(attributes: Mapping[str, str], default: Runner) -> Runner:
    """The runner a message goes to: its ``runner`` attribute when it names one, else ``default``
    (what the filters above select, written as code)."""
    named = attributes.get(ATTRIBUTE)
    return "gpu" if named == "gpu" else "cpu" if named == "cpu" else default
