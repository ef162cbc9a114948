#!/bin/sh
# azd predown hook: `azd down` deletes this environment's resource group, but never an existing
# capture account's resource group (postdeploy wires that account outside azd's deployment).
# Before the app's identity is deleted, remove what postdeploy added there: the event
# subscription, the system topic if this environment created it, and the identity's roles.
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

# Every call targets azd's subscription, whatever the Azure CLI's default is.
azs() { az "$@" --subscription "$AZURE_SUBSCRIPTION_ID"; }

account_id=$(azs storage account list \
    --query "[?name=='$CAPTURES_STORAGE_ACCOUNT_NAME'].id | [0]" --output tsv)
if [ -z "$account_id" ]; then
    echo "predown: capture account '$CAPTURES_STORAGE_ACCOUNT_NAME' not found; nothing to remove there"
    exit 0
fi

wanted=$(lower "$account_id")
topics=$(azs eventgrid system-topic list \
    --query "[].[name, resourceGroup, source, tags.\"nwcap-env-name\"]" --output tsv)
tab=$(printf '\t')
while IFS="$tab" read -r name group source owner; do
    if [ -z "$name" ] || [ "$(lower "$source")" != "$wanted" ]; then
        continue
    fi
    echo "predown: removing event subscription $CAPTURES_EVENT_SUBSCRIPTION_NAME from topic $name"
    azs eventgrid system-topic event-subscription delete \
        --name "$CAPTURES_EVENT_SUBSCRIPTION_NAME" --resource-group "$group" \
        --system-topic-name "$name" --yes --output none || true
    if [ "$owner" = "$AZURE_ENV_NAME" ]; then
        echo "predown: removing system topic $name, created by this environment"
        azs eventgrid system-topic delete --name "$name" --resource-group "$group" --yes --output none
    fi
done <<EOF
$topics
EOF

assignments=$(azs role assignment list --scope "$account_id" \
    --query "[?principalId=='$PROCESSOR_PRINCIPAL_ID'].id" --output tsv)
if [ -n "$assignments" ]; then
    echo "predown: removing the app identity's roles on $CAPTURES_STORAGE_ACCOUNT_NAME"
    # Word splitting is intended: one assignment id per word.
    # shellcheck disable=SC2086
    azs role assignment delete --ids $assignments --output none
fi
