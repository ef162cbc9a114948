#!/bin/sh
# azd postdeploy hook: subscribe process_capture to the capture account's BlobCreated events.
#
# The Event Grid subscription cannot live in Bicep: its webhook URL carries the function app's
# blobs_extension system key, which exists only once the code is deployed. For an existing capture
# account this hook first wires the account (roles, system topic) with app/captures.bicep, so that
# azd's own deployment never touches that account's resource group (see docs/deploy.md).
#
# In order: check the capture account (kind, endpoints), wire it if it is an existing one, drop
# the account-wide roles earlier versions gave the app, wait until the role assignments are
# visible, wait for the blobs_extension key, then create or update this environment's own
# subscription, with a dead-letter container in the results account. Safe to re-run:
# `azd hooks run postdeploy`. The key never appears in output nor on a command line: az reads the
# webhook URL from a file only this user can read (az loads any `@file` argument).
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
: "${CAPTURES_BLOB_ENDPOINT:?$missing}"
: "${CAPTURES_QUEUE_ENDPOINT:?$missing}"
: "${CAPTURES_SYSTEM_TOPIC_NAME:?$missing}"
: "${CAPTURES_EVENT_SUBSCRIPTION_NAME:?$missing}"
: "${RESULTS_STORAGE_ACCOUNT_ID:?$missing}"
: "${RESULTS_DEADLETTER_CONTAINER_NAME:?$missing}"

# Built-in role definition ids (the same in every tenant), as in infra/app/rbac.bicep.
storage_blob_data_reader=2a2b9908-6ea1-4ae2-8e65-a410df84e7d1
storage_queue_data_contributor=974c5e8b-45b9-4653-ba55-5f855dd0fb88
storage_blob_data_contributor=ba92f5b4-2d11-453d-a403-e96b0029c9fe
# The blob trigger's poison queue, in the account it watches (app/captures.bicep creates it).
poison_queue=webjobs-blobtrigger-poison

# Every call targets azd's subscription, whatever the Azure CLI's default is, and never reads the
# hook's standard input (the loops below read theirs from a here-document).
azs() { az "$@" --subscription "$AZURE_SUBSCRIPTION_ID" </dev/null; }
hooks_dir=$(cd "$(dirname "$0")" && pwd)
lower() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }
fail() {
    echo "postdeploy: $*" >&2
    exit 1
}
tab=$(printf '\t')
# az prints a JSON null as "None" in tsv output.
value() { if [ "$1" = "None" ]; then printf ''; else printf '%s' "$1"; fi; }
# Deployment names are unique per environment (the app name carries the resource token) and
# within ARM's 64 characters, however long the environment name.
deployment_name() { printf '%s-%s' "$1" "$AZURE_FUNCTION_APP_NAME" | cut -c1-64; }

# The capture account as Azure describes it, checked before anything is created (one tsv row: a
# list of rows, since the CLI prints each item of a top-level list on a line of its own).
account=$(azs storage account list \
    --query "[?name=='$CAPTURES_STORAGE_ACCOUNT_NAME'].[id, kind, dnsEndpointType, primaryEndpoints.blob, primaryEndpoints.queue]" \
    --output tsv)
if [ -z "$account" ]; then
    fail "no storage account '$CAPTURES_STORAGE_ACCOUNT_NAME' in the current subscription"
fi
IFS="$tab" read -r account_id kind dns_type blob_endpoint queue_endpoint <<EOF
$account
EOF
dns_type=$(value "$dns_type")
case "$kind" in
    StorageV2) ;;
    BlobStorage)
        fail "storage account '$CAPTURES_STORAGE_ACCOUNT_NAME' is of kind BlobStorage: Event Grid" \
            "publishes its blob events, but it has no queue service, and the Functions blob trigger" \
            "keeps its poison queue (webjobs-blobtrigger-poison) in the account it watches." \
            "Upgrade it to StorageV2 (az storage account update --name $CAPTURES_STORAGE_ACCOUNT_NAME" \
            "--set kind=StorageV2 --access-tier Hot) or write the captures to a StorageV2 account."
        ;;
    *)
        fail "storage account '$CAPTURES_STORAGE_ACCOUNT_NAME' is of kind '$kind': Event Grid" \
            "publishes blob events only for StorageV2 (general-purpose v2) and BlobStorage accounts," \
            "and the blob trigger needs a queue service, so it must be StorageV2. Upgrade it" \
            "(az storage account update --name $CAPTURES_STORAGE_ACCOUNT_NAME --set kind=StorageV2" \
            "--access-tier Hot) or write the captures to a StorageV2 account."
        ;;
esac
same_url() { [ "$(lower "${1%/}")" = "$(lower "${2%/}")" ]; }
if ! same_url "$blob_endpoint" "$CAPTURES_BLOB_ENDPOINT" \
    || ! same_url "$queue_endpoint" "$CAPTURES_QUEUE_ENDPOINT"; then
    fail "storage account '$CAPTURES_STORAGE_ACCOUNT_NAME' (dnsEndpointType ${dns_type:-Standard})" \
        "has the endpoints $blob_endpoint and $queue_endpoint, but the app was configured with" \
        "$CAPTURES_BLOB_ENDPOINT and $CAPTURES_QUEUE_ENDPOINT. Accounts with dnsEndpointType" \
        "AzureDnsZone have endpoints that cannot be derived from their name: run" \
        "'azd env set CAPTURES_EXISTING_BLOB_ENDPOINT $blob_endpoint'," \
        "'azd env set CAPTURES_EXISTING_QUEUE_ENDPOINT $queue_endpoint', then 'azd up'."
fi

# The two resources the app's (and the deployer's) roles are scoped to (app/captures-access.bicep).
container_id="$account_id/blobServices/default/containers/$CAPTURES_CONTAINER_NAME"
poison_queue_id="$account_id/queueServices/default/queues/$poison_queue"
deployer_access=$(lower "${CAPTURES_DEPLOYER_ACCESS:-true}")

# Azure allows one system topic per source: find the account's (created by main.bicep for a new
# account; for an existing one, possibly owned by something else, and then reused).
topic_name=""
topic_group=""
topic_principal=""
wanted=$(lower "$account_id")
topics=$(azs eventgrid system-topic list \
    --query "[].[name, resourceGroup, source, identity.principalId]" --output tsv)
while IFS="$tab" read -r name group source principal; do
    if [ -n "$name" ] && [ "$(lower "$source")" = "$wanted" ]; then
        topic_name=$name
        topic_group=$group
        topic_principal=$(value "$principal")
    fi
done <<EOF
$topics
EOF

if [ "$(lower "$CAPTURES_IS_EXISTING")" = "true" ]; then
    captures_group=$(printf '%s' "$account_id" | cut -d/ -f5)
    create_topic=false
    if [ -z "$topic_name" ]; then
        create_topic=true
        topic_name=$CAPTURES_SYSTEM_TOPIC_NAME
        topic_group=$captures_group
    fi
    echo "postdeploy: granting the app read access to $CAPTURES_CONTAINER_NAME and its poison queue in $CAPTURES_STORAGE_ACCOUNT_NAME (resource group $captures_group)"
    # The deployer gets the same two roles on the same two resources, for nwcap reconcile and
    # nwcap status (unless CAPTURES_DEPLOYER_ACCESS is false). Azure refuses a second assignment
    # of a role a principal already holds on the same scope under another name, so roles the
    # deployer holds there already (assigned by hand) are not assigned again.
    operator=""
    if [ -n "${DEPLOYER_PRINCIPAL_ID:-}" ] && [ "$deployer_access" = "true" ]; then
        lacking=""
        for pair in "$container_id $storage_blob_data_reader" "$poison_queue_id $storage_queue_data_contributor"; do
            scope=${pair% *}
            role=${pair##* }
            # Before the first wiring the container or queue may not exist yet: nothing is held.
            held=$(azs role assignment list --scope "$scope" \
                --query "[?principalId=='$DEPLOYER_PRINCIPAL_ID'].roleDefinitionId" --output tsv 2>/dev/null || true)
            if ! printf '%s\n' "$held" | grep -qi "$role"; then
                lacking="$lacking $role"
            fi
        done
        if [ "$lacking" = " $storage_blob_data_reader $storage_queue_data_contributor" ]; then
            operator=$DEPLOYER_PRINCIPAL_ID
            echo "postdeploy: granting the deployer the same rights there, for nwcap reconcile and nwcap status"
        elif [ -z "$lacking" ]; then
            echo "postdeploy: the deployer already holds the rights nwcap reconcile and nwcap status need there"
        else
            echo "postdeploy: warning: the deployer holds only part of the rights nwcap reconcile needs on" \
                "$CAPTURES_STORAGE_ACCOUNT_NAME; grant the rest with: az role assignment create" \
                "--assignee-object-id $DEPLOYER_PRINCIPAL_ID --role <id> --scope <the container's or the queue's id>," \
                "for each id of:$lacking (scopes: $container_id, $poison_queue_id)" >&2
        fi
    fi
    created_principal=$(azs deployment group create \
        --name "$(deployment_name nwcap-captures)" \
        --resource-group "$captures_group" \
        --template-file "$hooks_dir/../app/captures.bicep" \
        --parameters \
            storageAccountName="$CAPTURES_STORAGE_ACCOUNT_NAME" \
            containerName="$CAPTURES_CONTAINER_NAME" \
            principalId="$PROCESSOR_PRINCIPAL_ID" \
            operatorPrincipalId="$operator" \
            systemTopicName="$topic_name" \
            createSystemTopic="$create_topic" \
            tags="{\"nwcap-env-name\": \"$AZURE_ENV_NAME\"}" \
        --query "properties.outputs.systemTopicPrincipalId.value" --output tsv)
    if [ "$create_topic" = true ]; then
        topic_principal=$(value "$created_principal")
    fi
    if [ -n "$topic_principal" ]; then
        echo "postdeploy: letting system topic $topic_name dead-letter into $RESULTS_DEADLETTER_CONTAINER_NAME"
        azs deployment group create \
            --name "$(deployment_name nwcap-deadletter)" \
            --resource-group "$AZURE_RESOURCE_GROUP" \
            --template-file "$hooks_dir/../app/deadletter-access.bicep" \
            --parameters \
                resultsAccountName="${RESULTS_STORAGE_ACCOUNT_ID##*/}" \
                containerName="$RESULTS_DEADLETTER_CONTAINER_NAME" \
                principalId="$topic_principal" \
            --output none
    fi
elif [ -z "$topic_name" ]; then
    fail "no Event Grid system topic on '$CAPTURES_STORAGE_ACCOUNT_NAME'; run 'azd provision' again"
fi

# Before 0.4 the app held Storage Blob Data Reader and Storage Queue Data Contributor on the whole
# account; they are now scoped to the capture container and the poison queue, so the account-wide
# ones (and any other role the app identity holds on the account itself) go.
wide=$(azs role assignment list --scope "$account_id" \
    --query "[?principalId=='$PROCESSOR_PRINCIPAL_ID'].id" --output tsv)
if [ -n "$wide" ]; then
    echo "postdeploy: removing the app's account-wide roles on $CAPTURES_STORAGE_ACCOUNT_NAME (now scoped to the container and the poison queue)"
    # Word splitting is intended: one assignment id per word.
    # shellcheck disable=SC2086
    azs role assignment delete --ids $wide --output none
fi

# Role assignments take a while to show up after a deployment; events sent before the app may
# read the account would fail. Bounded wait with back-off: base, 2x, 4x... capped at 60 s.
role_attempts=${NWCAP_ROLE_WAIT_ATTEMPTS:-8}
role_delay=${NWCAP_ROLE_POLL_SECONDS:-5}
wait_for_roles() {
    # $1 what (for messages), $2 scope, $3 principal id, then the role definition ids.
    what=$1
    scope=$2
    principal=$3
    shift 3
    attempt=1
    delay=$role_delay
    while :; do
        granted=$(azs role assignment list --scope "$scope" \
            --query "[?principalId=='$principal'].roleDefinitionId" --output tsv)
        absent=""
        for role in "$@"; do
            if ! printf '%s\n' "$granted" | grep -qi "$role"; then
                absent="$absent $role"
            fi
        done
        if [ -z "$absent" ]; then
            return 0
        fi
        if [ "$attempt" -ge "$role_attempts" ]; then
            fail "the role assignments of $what (role ids:$absent on $scope) are still not" \
                "visible after $role_attempts attempts; check the deployment, then run" \
                "'azd hooks run postdeploy' again"
        fi
        echo "postdeploy: waiting for the role assignments of $what to propagate ($attempt/$role_attempts, ${delay}s)"
        sleep "$delay"
        attempt=$((attempt + 1))
        delay=$((delay * 2))
        if [ "$delay" -gt 60 ]; then
            delay=60
        fi
    done
}
wait_for_roles "the app on $CAPTURES_CONTAINER_NAME" "$container_id" "$PROCESSOR_PRINCIPAL_ID" \
    "$storage_blob_data_reader"
wait_for_roles "the app on $poison_queue" "$poison_queue_id" "$PROCESSOR_PRINCIPAL_ID" \
    "$storage_queue_data_contributor"
deadletter_container_id="$RESULTS_STORAGE_ACCOUNT_ID/blobServices/default/containers/$RESULTS_DEADLETTER_CONTAINER_NAME"
if [ -n "$topic_principal" ]; then
    wait_for_roles "system topic $topic_name on $RESULTS_DEADLETTER_CONTAINER_NAME" \
        "$deadletter_container_id" "$topic_principal" "$storage_blob_data_contributor"
else
    echo "postdeploy: warning: system topic $topic_name (not created by nwcap) has no managed identity," \
        "so undeliverable events cannot be dead-lettered; see 'Dead-lettered events' in docs/deploy.md" >&2
fi
# ARM lists an assignment as soon as it exists; each storage front end enforces it only once its
# cache refreshes, minutes later. An event delivered before then fails with 403 and its capture
# waits for the next reconcile run, so pause a bounded while before subscribing.
settle=${NWCAP_ROLE_SETTLE_SECONDS:-120}
case $settle in
    '' | *[!0-9]*) fail "NWCAP_ROLE_SETTLE_SECONDS must be a whole number of seconds, not '$settle'" ;;
esac
if [ "$settle" -gt 0 ]; then
    echo "postdeploy: giving the role assignments ${settle}s to take effect in storage (NWCAP_ROLE_SETTLE_SECONDS=0 skips this)"
    sleep "$settle"
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

# Before 0.2 every environment used this one name; replace it when it delivers to this app.
legacy=$(azs eventgrid system-topic event-subscription list \
    --resource-group "$topic_group" --system-topic-name "$topic_name" \
    --query "[?name=='evgs-process-capture' && contains(destination.endpointBaseUrl || '', '$AZURE_FUNCTION_APP_HOSTNAME')].name" \
    --output tsv)
if [ -n "$legacy" ] && [ "$legacy" != "$CAPTURES_EVENT_SUBSCRIPTION_NAME" ]; then
    echo "postdeploy: removing the former subscription evgs-process-capture of this app"
    azs eventgrid system-topic event-subscription delete --name evgs-process-capture \
        --resource-group "$topic_group" --system-topic-name "$topic_name" --yes --output none
fi

# The webhook URL carries the key: written to a file of this user's only (mktemp: mode 0600) and
# handed to az as `@file`, so that it never shows in the process list or in EDR telemetry.
endpoint_file=$(mktemp)
trap 'rm -f "$endpoint_file"' EXIT
printf '%s' "https://$AZURE_FUNCTION_APP_HOSTNAME/runtime/webhooks/blobs?functionName=Host.Functions.process_capture&code=$key" \
    >"$endpoint_file"
key=""
echo "postdeploy: subscribing process_capture to *.cap blobs in $CAPTURES_CONTAINER_NAME (topic $topic_name, subscription $CAPTURES_EVENT_SUBSCRIPTION_NAME)"
# data.api: a blob is complete when one of these calls created it. On an account with a
# hierarchical namespace, CreateFile raises BlobCreated for the empty file before its content
# is flushed (FlushWithClose raises it again, complete).
set -- --name "$CAPTURES_EVENT_SUBSCRIPTION_NAME" \
    --resource-group "$topic_group" \
    --system-topic-name "$topic_name" \
    --endpoint-type webhook \
    --endpoint "@$endpoint_file" \
    --included-event-types Microsoft.Storage.BlobCreated \
    --subject-begins-with "/blobServices/default/containers/$CAPTURES_CONTAINER_NAME/" \
    --subject-ends-with .cap \
    --subject-case-sensitive false \
    --advanced-filter data.api StringIn CopyBlob PutBlob PutBlockList FlushWithClose \
    --max-delivery-attempts 30 \
    --event-ttl 1440
if [ -n "$topic_principal" ]; then
    set -- "$@" --deadletter-identity systemassigned \
        --deadletter-identity-endpoint "$deadletter_container_id"
fi
azs eventgrid system-topic event-subscription create "$@" --output none
echo "postdeploy: done; new captures in $CAPTURES_STORAGE_ACCOUNT_NAME/$CAPTURES_CONTAINER_NAME are now processed"
