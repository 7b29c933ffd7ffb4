"""Who hears about a bad night: a Prefect automation that calls a webhook when a run of the nightly
deployment fails or crashes, when a model is rejected by the champion gate, when a new batch is quarantined,
when the champion's model is damaged and set aside, when a night's tables, report or artifacts could not be written
(the decision stands), or when the watchdog (``flows/stack/watchdog.py``) finds no night scheduled or a night that
did not start.

``make serve`` runs this against its server (``python -m flows.night.alerts``). The webhook is a Prefect
``Webhook`` block named ``mnist-alerts`` made from ``$MNIST_ALERT_WEBHOOK``, so it can be changed
later in the UI (Blocks) without touching the automation.
"""

from __future__ import annotations

import os
import sys

ALERT_ENV = "MNIST_ALERT_WEBHOOK"
BLOCK_NAME = "mnist-alerts"
AUTOMATION_NAME = "mnist-nightly-alerts"
DEPLOYMENT = "mnist-retrain/nightly"
ALERT_EVENTS = (
    "prefect.flow-run.Failed",
    "prefect.flow-run.Crashed",
    "mnist.model.rejected",
    "mnist.batch.quarantined",
    "mnist.night.artifact-changed",  # flows/night/pipeline.py: a stored file changed under the night; decided again
    "mnist.champion.damaged",  # flows/night/steps.py: the champion's model cannot be rebuilt by this code; set aside
    "mnist.night.unpublished",  # flows/night/pipeline.py: a publication step failed; the decision stands
    "mnist.schedule.missing",  # flows/stack/watchdog.py: no night in the next 26 h
    "mnist.night.late",  # flows/stack/watchdog.py: a night that did not start within its grace
)

# The webhook's JSON body: what happened, to what, and why (the gate's reason, when there is one). The whole
# body is one value serialised by `tojson`, never strings pasted between quotes: a run named `a"b` (or a
# reason holding a newline) stays valid JSON, so the alert is not lost.
PAYLOAD = (
    "{{ {"
    "'alert': event.event, "
    "'resource': event.resource.id, "
    "'name': event.resource.get('prefect.resource.name', ''), "
    "'occurred': event.occurred | string, "
    "'reason': event.payload.get('reason', ''), "
    "'decision': event.payload.get('decision', ''), "
    "'state_message': event.payload.get('validated_state', {}).get('message', '')"
    "} | tojson }}"
)

HOW_TO = (
    f"No alerts: set {ALERT_ENV} to a webhook URL (Slack, Teams, PagerDuty, any HTTP endpoint) and run `make serve` again, "
    f"to be told when a nightly run fails or crashes, or a model is rejected."
)


def prepare_automations(deployment: str, *names: str):
    """The deployment's id, with any automation of these names deleted, so creating them again replaces them."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployment_id = client.read_deployment_by_name(deployment).id
        for name in names:
            for old in client.read_automations_by_name(name):
                client.delete_automation(old.id)
    return deployment_id


def configure_alerts(webhook_url: str | None, deployment: str = DEPLOYMENT) -> str:
    """Create (or replace) the webhook block and the automation; returns a line for the operator."""
    if not webhook_url:
        return HOW_TO
    from prefect.automations import Automation, CallWebhook, EventTrigger
    from prefect.blocks.webhook import Webhook

    block_id = Webhook(method="POST", url=webhook_url).save(BLOCK_NAME, overwrite=True)
    deployment_id = prepare_automations(deployment, AUTOMATION_NAME)
    Automation(
        name=AUTOMATION_NAME,
        description=f"Call the {BLOCK_NAME} webhook when a {deployment} run fails or crashes, a model is rejected, "
        "a new batch is quarantined, or no night is scheduled or started on time.",
        trigger=EventTrigger(
            expect=set(ALERT_EVENTS),
            match_related={"prefect.resource.id": f"prefect.deployment.{deployment_id}"},
            posture="Reactive",
            threshold=1,
        ),
        actions=[CallWebhook(block_document_id=block_id, payload=PAYLOAD)],
    ).create()
    return f"Alerts:         {', '.join(ALERT_EVENTS)} of {deployment} → webhook block {BLOCK_NAME}"


def main() -> int:
    print(configure_alerts(os.environ.get(ALERT_ENV)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
