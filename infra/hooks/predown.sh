#!/bin/sh
# azd predown hook: `azd down` deletes this environment's resource group, but never an existing
# capture account's resource group (postdeploy wires that account outside azd's deployment).
# Before the app's identity is deleted, remove what postdeploy added there for this environment:
# its own event subscription, the identity's roles, the system topic only if nwcap created it
# and no other subscription (another environment's, or anyone else's) still uses it, and the
# deployer's roles when no other nwcap environment is subscribed to the account any more. The
# capture container and the poison queue stay: they hold your captures and unprocessed blobs.
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
: "${CAPTURES_CONTAINER_NAME:?$missing}"

# Every call targets azd's subscription, whatever the Azure CLI's default is, and never reads the
# hook's standard input (the loops below read theirs from a here-document).
azs() { az "$@" --subscription "$AZURE_SUBSCRIPTION_ID" </dev/null; }

account_id=$(azs storage account list \
    --query "[?name=='$CAPTURES_STORAGE_ACCOUNT_NAME'].id | [0]" --output tsv)
if [ -z "$account_id" ]; then
    echo "predown: capture account '$CAPTURES_STORAGE_ACCOUNT_NAME' not found; nothing to remove there"
    exit 0
fi

# The scopes of the roles postdeploy granted (app/captures-access.bicep), and before 0.4 the
# account itself.
container_id="$account_id/blobServices/default/containers/$CAPTURES_CONTAINER_NAME"
poison_queue_id="$account_id/queueServices/default/queues/webjobs-blobtrigger-poison"

wanted=$(lower "$account_id")
# Other nwcap environments still subscribed to the account (their subscriptions' names).
others=
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
    remaining=$(azs eventgrid system-topic event-subscription list \
        --resource-group "$group" --system-topic-name "$name" --query "[].name" --output tsv)
    for subscription in $remaining; do
        case $subscription in
            evgs-nwcap-* | evgs-process-capture) others="$others $subscription" ;;
        esac
    done
    if [ -z "$creator" ] || [ "$creator" = "None" ]; then
        continue
    fi
    if [ -n "$remaining" ]; then
        echo "predown: keeping system topic $name, still used by: $(printf '%s' "$remaining" | tr '\n' ' ')"
    else
        echo "predown: removing system topic $name, created by nwcap and now unused"
        azs eventgrid system-topic delete --name "$name" --resource-group "$group" --yes --output none
    fi
done <<EOF2
$topics
EOF2

# One principal's role assignments at each of the scopes (one id a line).
assignments_of() {
    principal=$1
    shift
    for scope in "$@"; do
        azs role assignment list --scope "$scope" \
            --query "[?principalId=='$principal'].id" --output tsv
    done
}

assignments=$(assignments_of "$PROCESSOR_PRINCIPAL_ID" "$container_id" "$poison_queue_id" "$account_id")
if [ -n "$assignments" ]; then
    echo "predown: removing the app identity's roles on $CAPTURES_STORAGE_ACCOUNT_NAME"
    # Word splitting is intended: one assignment id per word.
    # shellcheck disable=SC2086
    azs role assignment delete --ids $assignments --output none
fi

# The deployer's roles there (granted by postdeploy for nwcap reconcile and nwcap status) are
# shared by every environment this person deployed on the account: the last one removes them.
if [ -n "${DEPLOYER_PRINCIPAL_ID:-}" ]; then
    if [ -n "$others" ]; then
        echo "predown: keeping the deployer's roles on $CAPTURES_STORAGE_ACCOUNT_NAME, still used by the nwcap environments of:$others"
    else
        deployer=$(assignments_of "$DEPLOYER_PRINCIPAL_ID" "$container_id" "$poison_queue_id")
        if [ -n "$deployer" ]; then
            echo "predown: removing the deployer's roles on $CAPTURES_STORAGE_ACCOUNT_NAME, no other nwcap environment uses it"
            # shellcheck disable=SC2086
            azs role assignment delete --ids $deployer --output none
        fi
    fi
fi
