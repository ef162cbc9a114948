#!/bin/sh
# azd postdeploy hook: subscribe process_capture to the capture account's BlobCreated events.
#
# The Event Grid subscription cannot live in Bicep: its webhook URL carries the function app's
# blobs_extension system key, which exists only once the code is deployed. For an existing capture
# account this hook first wires the account (roles, system topic) with app/captures.bicep, so that
# azd's own deployment never touches that account's resource group (see docs/deploy.md).
# Safe to re-run: `azd hooks run postdeploy`. Never prints the key.
set -eu

if ! command -v az >/dev/null 2>&1; then
    echo "postdeploy: the Azure CLI (az) is required, see docs/deploy.md" >&2
    exit 1
fi
missing="set by azd from the provisioning outputs: run 'azd up' or 'azd hooks run postdeploy'"
: "${AZURE_ENV_NAME:?$missing}"
: "${AZURE_SUBSCRIPTION_ID:?$missing}"
: "${AZURE_RESOURCE_GROUP:?$missing}"
: "${AZURE_FUNCTION_APP_NAME:?$missing}"
: "${AZURE_FUNCTION_APP_HOSTNAME:?$missing}"
: "${PROCESSOR_PRINCIPAL_ID:?$missing}"
: "${CAPTURES_STORAGE_ACCOUNT_NAME:?$missing}"
: "${CAPTURES_IS_EXISTING:?$missing}"
: "${CAPTURES_CONTAINER_NAME:?$missing}"
: "${CAPTURES_SYSTEM_TOPIC_NAME:?$missing}"
: "${CAPTURES_EVENT_SUBSCRIPTION_NAME:?$missing}"

# Every call targets azd's subscription, whatever the Azure CLI's default is.
azs() { az "$@" --subscription "$AZURE_SUBSCRIPTION_ID"; }
hooks_dir=$(cd "$(dirname "$0")" && pwd)
lower() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }

topic_group=$AZURE_RESOURCE_GROUP
topic_name=$CAPTURES_SYSTEM_TOPIC_NAME

if [ "$(lower "$CAPTURES_IS_EXISTING")" = "true" ]; then
    account_id=$(azs storage account list \
        --query "[?name=='$CAPTURES_STORAGE_ACCOUNT_NAME'].id | [0]" --output tsv)
    if [ -z "$account_id" ]; then
        echo "postdeploy: no storage account '$CAPTURES_STORAGE_ACCOUNT_NAME' in the current subscription" >&2
        exit 1
    fi
    captures_group=$(printf '%s' "$account_id" | cut -d/ -f5)

    # Azure allows one system topic per source: reuse the account's topic if it already has one.
    create_topic=true
    topic_group=$captures_group
    wanted=$(lower "$account_id")
    topics=$(azs eventgrid system-topic list --query "[].[name, resourceGroup, source]" --output tsv)
    tab=$(printf '\t')
    while IFS="$tab" read -r name group source; do
        if [ -n "$name" ] && [ "$(lower "$source")" = "$wanted" ]; then
            topic_name=$name
            topic_group=$group
            create_topic=false
        fi
    done <<EOF
$topics
EOF

    echo "postdeploy: granting the app read access to $CAPTURES_STORAGE_ACCOUNT_NAME (resource group $captures_group)"
    azs deployment group create \
        --name "nwcap-captures-$AZURE_ENV_NAME" \
        --resource-group "$captures_group" \
        --template-file "$hooks_dir/../app/captures.bicep" \
        --parameters \
            storageAccountName="$CAPTURES_STORAGE_ACCOUNT_NAME" \
            principalId="$PROCESSOR_PRINCIPAL_ID" \
            systemTopicName="$topic_name" \
            createSystemTopic="$create_topic" \
            tags="{\"nwcap-env-name\": \"$AZURE_ENV_NAME\"}" \
        --output none
fi

# The host creates the blobs_extension key when it first indexes a blob trigger, which can take a
# few minutes after a deployment.
poll_seconds=${NWCAP_KEY_POLL_SECONDS:-10}
key=""
attempt=1
while :; do
    key=$(azs functionapp keys list \
        --name "$AZURE_FUNCTION_APP_NAME" --resource-group "$AZURE_RESOURCE_GROUP" \
        --query "systemKeys.blobs_extension" --output tsv 2>/dev/null || true)
    if [ -n "$key" ] && [ "$key" != "None" ]; then
        break
    fi
    if [ "$attempt" -ge 30 ]; then
        echo "postdeploy: no blobs_extension key on $AZURE_FUNCTION_APP_NAME after 30 attempts;" \
            "check that process_capture is listed by 'az functionapp function list'" >&2
        exit 1
    fi
    echo "postdeploy: waiting for the function host to create its blobs_extension key ($attempt/30)"
    attempt=$((attempt + 1))
    sleep "$poll_seconds"
done

endpoint="https://$AZURE_FUNCTION_APP_HOSTNAME/runtime/webhooks/blobs?functionName=Host.Functions.process_capture&code=$key"
echo "postdeploy: subscribing process_capture to *.cap blobs in $CAPTURES_CONTAINER_NAME (topic $topic_name)"
azs eventgrid system-topic event-subscription create \
    --name "$CAPTURES_EVENT_SUBSCRIPTION_NAME" \
    --resource-group "$topic_group" \
    --system-topic-name "$topic_name" \
    --endpoint-type webhook \
    --endpoint "$endpoint" \
    --included-event-types Microsoft.Storage.BlobCreated \
    --subject-begins-with "/blobServices/default/containers/$CAPTURES_CONTAINER_NAME/" \
    --subject-ends-with .cap \
    --subject-case-sensitive false \
    --output none
echo "postdeploy: done; new captures in $CAPTURES_STORAGE_ACCOUNT_NAME/$CAPTURES_CONTAINER_NAME are now processed"
