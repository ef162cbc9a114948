# azd postdeploy hook (Windows twin of postdeploy.sh): subscribe process_capture to the capture
# account's BlobCreated events.
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
$ErrorActionPreference = 'Stop'
Set-StrictMode -Version Latest

if (-not (Get-Command az -ErrorAction SilentlyContinue)) {
    throw 'postdeploy: the Azure CLI (az) is required, see docs/deploy.md'
}
$required = @(
    'AZURE_ENV_NAME', 'AZURE_SUBSCRIPTION_ID', 'AZURE_RESOURCE_GROUP', 'AZURE_FUNCTION_APP_NAME',
    'AZURE_FUNCTION_APP_HOSTNAME', 'PROCESSOR_PRINCIPAL_ID', 'CAPTURES_STORAGE_ACCOUNT_NAME',
    'CAPTURES_IS_EXISTING', 'CAPTURES_CONTAINER_NAME', 'CAPTURES_BLOB_ENDPOINT',
    'CAPTURES_QUEUE_ENDPOINT', 'CAPTURES_SYSTEM_TOPIC_NAME', 'CAPTURES_EVENT_SUBSCRIPTION_NAME',
    'RESULTS_STORAGE_ACCOUNT_ID', 'RESULTS_DEADLETTER_CONTAINER_NAME'
)
foreach ($name in $required) {
    if (-not [Environment]::GetEnvironmentVariable($name)) {
        throw "postdeploy: $name is set by azd from the provisioning outputs: run 'azd up' or 'azd hooks run postdeploy'"
    }
}

# Built-in role definition ids (the same in every tenant), as in infra/app/rbac.bicep.
$storageBlobDataReader = '2a2b9908-6ea1-4ae2-8e65-a410df84e7d1'
$storageQueueDataContributor = '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
$storageBlobDataContributor = 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
# The blob trigger's poison queue, in the account it watches (app/captures.bicep creates it).
$poisonQueue = 'webjobs-blobtrigger-poison'

# Every call targets azd's subscription, whatever the Azure CLI's default is; a failing call stops the hook.
function Invoke-Az {
    $output = & az @args --subscription $env:AZURE_SUBSCRIPTION_ID
    if ($LASTEXITCODE -ne 0) { throw "postdeploy: az $($args[0..2] -join ' ') failed" }
    return $output
}
# Deployment names are unique per environment (the app name carries the resource token) and
# within ARM's 64 characters, however long the environment name.
function Get-DeploymentName([string]$prefix) {
    $name = "$prefix-$($env:AZURE_FUNCTION_APP_NAME)"
    return $name.Substring(0, [Math]::Min(64, $name.Length))
}
function Test-SameUrl([string]$a, [string]$b) {
    return $a.TrimEnd('/') -ieq $b.TrimEnd('/')
}

# The capture account as Azure describes it, checked before anything is created.
$accounts = @((Invoke-Az storage account list --output json) -join "`n" | ConvertFrom-Json)
$account = $accounts | Where-Object { $_.name -eq $env:CAPTURES_STORAGE_ACCOUNT_NAME } | Select-Object -First 1
if (-not $account) {
    throw "postdeploy: no storage account '$($env:CAPTURES_STORAGE_ACCOUNT_NAME)' in the current subscription"
}
$accountId = $account.id
$accountName = $env:CAPTURES_STORAGE_ACCOUNT_NAME
if ($account.kind -eq 'BlobStorage') {
    throw ("postdeploy: storage account '$accountName' is of kind BlobStorage: Event Grid publishes its blob events, " +
        'but it has no queue service, and the Functions blob trigger keeps its poison queue (webjobs-blobtrigger-poison) ' +
        "in the account it watches. Upgrade it to StorageV2 (az storage account update --name $accountName " +
        '--set kind=StorageV2 --access-tier Hot) or write the captures to a StorageV2 account.')
}
if ($account.kind -ne 'StorageV2') {
    throw ("postdeploy: storage account '$accountName' is of kind '$($account.kind)': Event Grid publishes blob events " +
        'only for StorageV2 (general-purpose v2) and BlobStorage accounts, and the blob trigger needs a queue service, ' +
        "so it must be StorageV2. Upgrade it (az storage account update --name $accountName --set kind=StorageV2 " +
        '--access-tier Hot) or write the captures to a StorageV2 account.')
}
$blobEndpoint = $account.primaryEndpoints.blob
$queueEndpoint = $account.primaryEndpoints.queue
$dnsType = if ($account.PSObject.Properties['dnsEndpointType'] -and $account.dnsEndpointType) { $account.dnsEndpointType } else { 'Standard' }
if (-not (Test-SameUrl $blobEndpoint $env:CAPTURES_BLOB_ENDPOINT) -or -not (Test-SameUrl $queueEndpoint $env:CAPTURES_QUEUE_ENDPOINT)) {
    throw ("postdeploy: storage account '$accountName' (dnsEndpointType $dnsType) has the endpoints $blobEndpoint " +
        "and $queueEndpoint, but the app was configured with $($env:CAPTURES_BLOB_ENDPOINT) and " +
        "$($env:CAPTURES_QUEUE_ENDPOINT). Accounts with dnsEndpointType AzureDnsZone have endpoints that cannot be " +
        "derived from their name: run 'azd env set CAPTURES_EXISTING_BLOB_ENDPOINT $blobEndpoint', " +
        "'azd env set CAPTURES_EXISTING_QUEUE_ENDPOINT $queueEndpoint', then 'azd up'.")
}

# The two resources the app's (and the deployer's) roles are scoped to (app/captures-access.bicep).
$containerId = "$accountId/blobServices/default/containers/$($env:CAPTURES_CONTAINER_NAME)"
$poisonQueueId = "$accountId/queueServices/default/queues/$poisonQueue"
$deployerAccess = -not $env:CAPTURES_DEPLOYER_ACCESS -or $env:CAPTURES_DEPLOYER_ACCESS -ieq 'true'

# Azure allows one system topic per source: find the account's (created by main.bicep for a new
# account; for an existing one, possibly owned by something else, and then reused).
$topicName = ''
$topicGroup = ''
$topicPrincipal = ''
$topics = @((Invoke-Az eventgrid system-topic list --output json) -join "`n" | ConvertFrom-Json)
foreach ($topic in $topics) {
    if ($topic.source -ieq $accountId) {
        $topicName = $topic.name
        $topicGroup = $topic.resourceGroup
        $topicPrincipal = if ($topic.PSObject.Properties['identity'] -and $topic.identity) { [string]$topic.identity.principalId } else { '' }
    }
}

if ($env:CAPTURES_IS_EXISTING -ieq 'true') {
    $capturesGroup = $accountId.Split('/')[4]
    $createTopic = $false
    if (-not $topicName) {
        $createTopic = $true
        $topicName = $env:CAPTURES_SYSTEM_TOPIC_NAME
        $topicGroup = $capturesGroup
    }
    Write-Host "postdeploy: granting the app read access to $($env:CAPTURES_CONTAINER_NAME) and its poison queue in $accountName (resource group $capturesGroup)"
    # The deployer gets the same two roles on the same two resources, for nwcap reconcile and
    # nwcap status (unless CAPTURES_DEPLOYER_ACCESS is false). Azure refuses a second assignment
    # of a role a principal already holds on the same scope under another name, so roles the
    # deployer holds there already (assigned by hand) are not assigned again.
    $operator = ''
    if ($env:DEPLOYER_PRINCIPAL_ID -and $deployerAccess) {
        $lacking = @()
        foreach ($pair in @(@($containerId, $storageBlobDataReader), @($poisonQueueId, $storageQueueDataContributor))) {
            # Before the first wiring the container or queue may not exist yet: nothing is held.
            $held = @(& az role assignment list --scope $pair[0] --subscription $env:AZURE_SUBSCRIPTION_ID `
                    --query "[?principalId=='$($env:DEPLOYER_PRINCIPAL_ID)'].roleDefinitionId" --output tsv 2>$null) -join "`n"
            if ($held -notmatch [regex]::Escape($pair[1])) { $lacking += $pair[1] }
        }
        if ($lacking.Count -eq 2) {
            $operator = $env:DEPLOYER_PRINCIPAL_ID
            Write-Host 'postdeploy: granting the deployer the same rights there, for nwcap reconcile and nwcap status'
        }
        elseif ($lacking.Count -eq 0) {
            Write-Host 'postdeploy: the deployer already holds the rights nwcap reconcile and nwcap status need there'
        }
        else {
            Write-Warning ("postdeploy: the deployer holds only part of the rights nwcap reconcile needs on $accountName; " +
                "grant the rest with: az role assignment create --assignee-object-id $($env:DEPLOYER_PRINCIPAL_ID) " +
                "--role <id> --scope <the container's or the queue's id>, for each id of: $($lacking -join ' ') " +
                "(scopes: $containerId, $poisonQueueId)")
        }
    }
    $parametersFile = New-TemporaryFile
    try {
        # A parameters file sidesteps quoting JSON on the az.cmd command line.
        @{
            '$schema'      = 'https://schema.management.azure.com/schemas/2019-04-01/deploymentParameters.json#'
            contentVersion = '1.0.0.0'
            parameters     = @{
                storageAccountName  = @{ value = $accountName }
                containerName       = @{ value = $env:CAPTURES_CONTAINER_NAME }
                principalId         = @{ value = $env:PROCESSOR_PRINCIPAL_ID }
                operatorPrincipalId = @{ value = $operator }
                systemTopicName     = @{ value = $topicName }
                createSystemTopic   = @{ value = $createTopic }
                tags                = @{ value = @{ 'nwcap-env-name' = $env:AZURE_ENV_NAME } }
            }
        } | ConvertTo-Json -Depth 5 | Set-Content -Path $parametersFile -Encoding utf8
        $createdPrincipal = Invoke-Az deployment group create `
            --name (Get-DeploymentName 'nwcap-captures') `
            --resource-group $capturesGroup `
            --template-file (Join-Path $PSScriptRoot '..' 'app' 'captures.bicep') `
            --parameters "@$parametersFile" `
            --query 'properties.outputs.systemTopicPrincipalId.value' --output tsv
    }
    finally {
        Remove-Item $parametersFile -ErrorAction SilentlyContinue
    }
    if ($createTopic) {
        $topicPrincipal = if ($createdPrincipal -and $createdPrincipal -ne 'None') { [string]$createdPrincipal } else { '' }
    }
    if ($topicPrincipal) {
        Write-Host "postdeploy: letting system topic $topicName dead-letter into $($env:RESULTS_DEADLETTER_CONTAINER_NAME)"
        Invoke-Az deployment group create `
            --name (Get-DeploymentName 'nwcap-deadletter') `
            --resource-group $env:AZURE_RESOURCE_GROUP `
            --template-file (Join-Path $PSScriptRoot '..' 'app' 'deadletter-access.bicep') `
            --parameters "resultsAccountName=$($env:RESULTS_STORAGE_ACCOUNT_ID.Split('/')[-1])" `
            "containerName=$($env:RESULTS_DEADLETTER_CONTAINER_NAME)" "principalId=$topicPrincipal" `
            --output none | Out-Null
    }
}
elseif (-not $topicName) {
    throw "postdeploy: no Event Grid system topic on '$accountName'; run 'azd provision' again"
}

# Before 0.4 the app held Storage Blob Data Reader and Storage Queue Data Contributor on the whole
# account; they are now scoped to the capture container and the poison queue, so the account-wide
# ones (and any other role the app identity holds on the account itself) go.
$wide = @(Invoke-Az role assignment list --scope $accountId `
        --query "[?principalId=='$($env:PROCESSOR_PRINCIPAL_ID)'].id" --output tsv | Where-Object { $_ })
if ($wide.Count -gt 0) {
    Write-Host "postdeploy: removing the app's account-wide roles on $accountName (now scoped to the container and the poison queue)"
    Invoke-Az role assignment delete --ids @wide --output none | Out-Null
}

# Role assignments take a while to show up after a deployment; events sent before the app may
# read the account would fail. Bounded wait with back-off: base, 2x, 4x... capped at 60 s.
$roleAttempts = if ($env:NWCAP_ROLE_WAIT_ATTEMPTS) { [int]$env:NWCAP_ROLE_WAIT_ATTEMPTS } else { 8 }
$roleDelay = if ($env:NWCAP_ROLE_POLL_SECONDS) { [int]$env:NWCAP_ROLE_POLL_SECONDS } else { 5 }
function Wait-ForRoles([string]$what, [string]$scope, [string]$principal, [string[]]$roles) {
    $delay = $roleDelay
    for ($attempt = 1; ; $attempt++) {
        $granted = @(Invoke-Az role assignment list --scope $scope `
                --query "[?principalId=='$principal'].roleDefinitionId" --output tsv) -join "`n"
        $absent = @($roles | Where-Object { $granted -notmatch [regex]::Escape($_) })
        if ($absent.Count -eq 0) { return }
        if ($attempt -ge $roleAttempts) {
            throw ("postdeploy: the role assignments of $what (role ids: $($absent -join ' ') on $scope) are still " +
                "not visible after $roleAttempts attempts; check the deployment, then run 'azd hooks run postdeploy' again")
        }
        Write-Host "postdeploy: waiting for the role assignments of $what to propagate ($attempt/$roleAttempts, ${delay}s)"
        Start-Sleep -Seconds $delay
        $delay = [Math]::Min(60, $delay * 2)
    }
}
Wait-ForRoles "the app on $($env:CAPTURES_CONTAINER_NAME)" $containerId $env:PROCESSOR_PRINCIPAL_ID @($storageBlobDataReader)
Wait-ForRoles "the app on $poisonQueue" $poisonQueueId $env:PROCESSOR_PRINCIPAL_ID @($storageQueueDataContributor)
$deadLetterContainerId = "$($env:RESULTS_STORAGE_ACCOUNT_ID)/blobServices/default/containers/$($env:RESULTS_DEADLETTER_CONTAINER_NAME)"
if ($topicPrincipal) {
    Wait-ForRoles "system topic $topicName on $($env:RESULTS_DEADLETTER_CONTAINER_NAME)" $deadLetterContainerId $topicPrincipal @($storageBlobDataContributor)
}
else {
    Write-Warning ("postdeploy: system topic $topicName (not created by nwcap) has no managed identity, so undeliverable " +
        "events cannot be dead-lettered; see 'Dead-lettered events' in docs/deploy.md")
}
# ARM lists an assignment as soon as it exists; each storage front end enforces it only once its
# cache refreshes, minutes later. An event delivered before then fails with 403 and its capture
# waits for the next reconcile run, so pause a bounded while before subscribing.
$settle = 120
if ($env:NWCAP_ROLE_SETTLE_SECONDS -and (-not [int]::TryParse($env:NWCAP_ROLE_SETTLE_SECONDS, [ref]$settle) -or $settle -lt 0)) {
    throw "postdeploy: NWCAP_ROLE_SETTLE_SECONDS must be a whole number of seconds, not '$($env:NWCAP_ROLE_SETTLE_SECONDS)'"
}
if ($settle -gt 0) {
    Write-Host "postdeploy: giving the role assignments ${settle}s to take effect in storage (NWCAP_ROLE_SETTLE_SECONDS=0 skips this)"
    Start-Sleep -Seconds $settle
}

# The host creates the blobs_extension key when it first indexes a blob trigger, which can take a
# few minutes after a deployment.
$pollSeconds = if ($env:NWCAP_KEY_POLL_SECONDS) { [int]$env:NWCAP_KEY_POLL_SECONDS } else { 10 }
$key = $null
for ($attempt = 1; ; $attempt++) {
    $key = & az functionapp keys list --name $env:AZURE_FUNCTION_APP_NAME `
        --resource-group $env:AZURE_RESOURCE_GROUP --subscription $env:AZURE_SUBSCRIPTION_ID `
        --query 'systemKeys.blobs_extension' --output tsv 2>$null
    if ($LASTEXITCODE -eq 0 -and $key -and $key -ne 'None') { break }
    if ($attempt -ge 30) {
        throw "postdeploy: no blobs_extension key on $($env:AZURE_FUNCTION_APP_NAME) after 30 attempts; check that process_capture is listed by 'az functionapp function list'"
    }
    Write-Host "postdeploy: waiting for the function host to create its blobs_extension key ($attempt/30)"
    Start-Sleep -Seconds $pollSeconds
}

# Before 0.2 every environment used this one name; replace it when it delivers to this app.
$legacy = Invoke-Az eventgrid system-topic event-subscription list `
    --resource-group $topicGroup --system-topic-name $topicName `
    --query "[?name=='evgs-process-capture' && contains(destination.endpointBaseUrl || '', '$($env:AZURE_FUNCTION_APP_HOSTNAME)')].name" `
    --output tsv
if ($legacy -and $legacy -ne $env:CAPTURES_EVENT_SUBSCRIPTION_NAME) {
    Write-Host 'postdeploy: removing the former subscription evgs-process-capture of this app'
    Invoke-Az eventgrid system-topic event-subscription delete --name evgs-process-capture `
        --resource-group $topicGroup --system-topic-name $topicName --yes --output none | Out-Null
}

# The webhook URL carries the key: written to a file of this user's only and handed to az as
# `@file`, so that it never shows in the process list or in EDR telemetry (and cmd.exe, which
# runs az.cmd on Windows, never sees the URL's '&').
$endpointFile = New-TemporaryFile
$subscriptionArgs = @(
    '--name', $env:CAPTURES_EVENT_SUBSCRIPTION_NAME,
    '--resource-group', $topicGroup,
    '--system-topic-name', $topicName,
    '--endpoint-type', 'webhook',
    '--endpoint', "@$endpointFile",
    '--included-event-types', 'Microsoft.Storage.BlobCreated',
    '--subject-begins-with', "/blobServices/default/containers/$($env:CAPTURES_CONTAINER_NAME)/",
    '--subject-ends-with', '.cap',
    '--subject-case-sensitive', 'false',
    # data.api: a blob is complete when one of these calls created it. On an account with a
    # hierarchical namespace, CreateFile raises BlobCreated for the empty file before its
    # content is flushed (FlushWithClose raises it again, complete).
    '--advanced-filter', 'data.api', 'StringIn', 'CopyBlob', 'PutBlob', 'PutBlockList', 'FlushWithClose',
    '--max-delivery-attempts', '30',
    '--event-ttl', '1440'
)
if ($topicPrincipal) {
    $subscriptionArgs += @('--deadletter-identity', 'systemassigned', '--deadletter-identity-endpoint', $deadLetterContainerId)
}
Write-Host "postdeploy: subscribing process_capture to *.cap blobs in $($env:CAPTURES_CONTAINER_NAME) (topic $topicName, subscription $($env:CAPTURES_EVENT_SUBSCRIPTION_NAME))"
try {
    if ($PSVersionTable.PSEdition -ne 'Desktop' -and -not $IsWindows) { & chmod 600 $endpointFile }
    $url = "https://$($env:AZURE_FUNCTION_APP_HOSTNAME)/runtime/webhooks/blobs?functionName=Host.Functions.process_capture&code=$key"
    [System.IO.File]::WriteAllText($endpointFile, $url)
    $key = $null
    $url = $null
    Invoke-Az eventgrid system-topic event-subscription create @subscriptionArgs --output none | Out-Null
}
finally {
    Remove-Item $endpointFile -ErrorAction SilentlyContinue
}
Write-Host "postdeploy: done; new captures in $accountName/$($env:CAPTURES_CONTAINER_NAME) are now processed"
