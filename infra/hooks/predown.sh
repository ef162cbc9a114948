#!/bin/sh
# azd predown hook: `azd down` deletes this environment's resource group, but never an existing
# capture account's resource group (postdeploy wires that account outside azd's deployment).
# Before the app's identity is deleted, remove what postdeploy added there for this environment:
# its own event subscription, the identity's roles, and the system topic only if nwcap created it
# and no other subscription (another environment's, or anyone else's) still uses it.
# A capture account created by `azd up` lives in the environment's group and goes with it.
set -eu

lower() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }
if [ "$(lower "${CAPTURES_IS_EXISTING:-false}")" != "true" ]; then
    exit 0
fi
if ! command -v az >/dev/null 2>&1; then
    echo "predown: the Azure CLI (az) is required, see docs/deploy.md" >&2
    exit 1
fi
missing="set by azd from the provisioning outputs: run 'azd down'"
: "${AZURE_ENV_NAME:?$missing}"
: "${AZURE_SUBSCRIPTION_ID:?$missing}"
: "${PROCESSOR_PRINCIPAL_ID:?$missing}"
: "${CAPTURES_STORAGE_ACCOUNT_NAME:?$missing}"
: "${CAPTURES_EVENT_SUBSCRIPTION_NAME:?$missing}"

# Every call targets azd's subscription, whatever the Azure CLI's default is, and never reads the
# hook's standard input (the loops below read theirs from a here-document).
azs() { az "$@" --subscription "$AZURE_SUBSCRIPTION_ID" </dev/null; }

account_id=$(azs storage account list \
    --query "[?name=='$CAPTURES_STORAGE_ACCOUNT_NAME'].id | [0]" --output tsv)
if [ -z "$account_id" ]; then
    echo "predown: capture account '$CAPTURES_STORAGE_ACCOUNT_NAME' not found; nothing to remove there"
    exit 0
fi

wanted=$(lower "$account_id")
# The tag marks a topic nwcap created (its value is the environment that created it).
topics=$(azs eventgrid system-topic list \
    --query "[].[name, resourceGroup, source, tags.\"nwcap-env-name\"]" --output tsv)
tab=$(printf '\t')
while IFS="$tab" read -r name group source creator; do
    if [ -z "$name" ] || [ "$(lower "$source")" != "$wanted" ]; then
        continue
    fi
    echo "predown: removing event subscription $CAPTURES_EVENT_SUBSCRIPTION_NAME from topic $name"
    if ! azs eventgrid system-topic event-subscription delete \
        --name "$CAPTURES_EVENT_SUBSCRIPTION_NAME" --resource-group "$group" \
        --system-topic-name "$name" --yes --output none; then
        echo "predown: warning: could not remove $CAPTURES_EVENT_SUBSCRIPTION_NAME from $name;" \
            "remove it with 'az eventgrid system-topic event-subscription delete'" >&2
    fi
    if [ -z "$creator" ] || [ "$creator" = "None" ]; then
        continue
    fi
    remaining=$(azs eventgrid system-topic event-subscription list \
        --resource-group "$group" --system-topic-name "$name" --query "[].name" --output tsv)
    if [ -n "$remaining" ]; then
        echo "predown: keeping system topic $name, still used by: $(printf '%s' "$remaining" | tr '\n' ' ')"
    else
        echo "predown: removing system topic $name, created by nwcap and now unused"
        azs eventgrid system-topic delete --name "$name" --resource-group "$group" --yes --output none
    fi
done <<EOF2
$topics
EOF2

assignments=$(azs role assignment list --scope "$account_id" \
    --query "[?principalId=='$PROCESSOR_PRINCIPAL_ID'].id" --output tsv)
if [ -n "$assignments" ]; then
    echo "predown: removing the app identity's roles on $CAPTURES_STORAGE_ACCOUNT_NAME"
    # Word splitting is intended: one assignment id per word.
    # shellcheck disable=SC2086
    azs role assignment delete --ids $assignments --output none
fi

# The deployer's own roles on the account (granted by postdeploy for nwcap reconcile and nwcap
# status) are shared by every environment this person deployed on it: they stay.
if [ -n "${DEPLOYER_PRINCIPAL_ID:-}" ]; then
    echo "predown: keeping the deployer's roles on $CAPTURES_STORAGE_ACCOUNT_NAME (other environments may use them);" \
        "remove them with: az role assignment delete --assignee $DEPLOYER_PRINCIPAL_ID --scope $account_id" \
        "--role 2a2b9908-6ea1-4ae2-8e65-a410df84e7d1, then again with --role 974c5e8b-45b9-4653-ba55-5f855dd0fb88"
fi
