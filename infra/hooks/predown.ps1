# azd predown hook (Windows twin of predown.sh): `azd down` deletes this environment's resource
# group, but never an existing capture account's resource group (postdeploy wires that account
# outside azd's deployment). Before the app's identity is deleted, remove what postdeploy added
# there for this environment: its own event subscription, the identity's roles, the system topic
# only if nwcap created it and no other subscription (another environment's, or anyone else's)
# still uses it, and the deployer's roles when no other nwcap environment is subscribed to the
# account any more. The capture container and the poison queue stay. A capture account created
# by `azd up` lives in the environment's group and goes with it.
$ErrorActionPreference = 'Stop'
Set-StrictMode -Version Latest

if ($env:CAPTURES_IS_EXISTING -ine 'true') { exit 0 }
if (-not (Get-Command az -ErrorAction SilentlyContinue)) {
    throw 'predown: the Azure CLI (az) is required, see docs/deploy.md'
}
$required = @(
    'AZURE_ENV_NAME', 'AZURE_SUBSCRIPTION_ID', 'PROCESSOR_PRINCIPAL_ID',
    'CAPTURES_STORAGE_ACCOUNT_NAME', 'CAPTURES_EVENT_SUBSCRIPTION_NAME', 'CAPTURES_CONTAINER_NAME'
)
foreach ($name in $required) {
    if (-not [Environment]::GetEnvironmentVariable($name)) {
        throw "predown: $name is set by azd from the provisioning outputs: run 'azd down'"
    }
}

# Every call targets azd's subscription, whatever the Azure CLI's default is; a failing call stops the hook.
function Invoke-Az {
    $output = & az @args --subscription $env:AZURE_SUBSCRIPTION_ID
    if ($LASTEXITCODE -ne 0) { throw "predown: az $($args[0..2] -join ' ') failed" }
    return $output
}

$accountId = Invoke-Az storage account list `
    --query "[?name=='$($env:CAPTURES_STORAGE_ACCOUNT_NAME)'].id | [0]" --output tsv
if (-not $accountId) {
    Write-Host "predown: capture account '$($env:CAPTURES_STORAGE_ACCOUNT_NAME)' not found; nothing to remove there"
    exit 0
}

# The scopes of the roles postdeploy granted (app/captures-access.bicep), and before 0.4 the
# account itself.
$containerId = "$accountId/blobServices/default/containers/$($env:CAPTURES_CONTAINER_NAME)"
$poisonQueueId = "$accountId/queueServices/default/queues/webjobs-blobtrigger-poison"
# Other nwcap environments still subscribed to the account (their subscriptions' names).
$others = @()

$topics = @((Invoke-Az eventgrid system-topic list --output json) -join "`n" | ConvertFrom-Json)
foreach ($topic in $topics) {
    if ($topic.source -ine $accountId) { continue }
    Write-Host "predown: removing event subscription $($env:CAPTURES_EVENT_SUBSCRIPTION_NAME) from topic $($topic.name)"
    & az eventgrid system-topic event-subscription delete --name $env:CAPTURES_EVENT_SUBSCRIPTION_NAME `
        --resource-group $topic.resourceGroup --system-topic-name $topic.name `
        --subscription $env:AZURE_SUBSCRIPTION_ID --yes --output none
    if ($LASTEXITCODE -ne 0) {
        Write-Warning ("predown: could not remove $($env:CAPTURES_EVENT_SUBSCRIPTION_NAME) from $($topic.name); " +
            "remove it with 'az eventgrid system-topic event-subscription delete'")
    }
    $remaining = @(Invoke-Az eventgrid system-topic event-subscription list --resource-group $topic.resourceGroup `
            --system-topic-name $topic.name --query '[].name' --output tsv | Where-Object { $_ })
    $others += @($remaining | Where-Object { $_ -like 'evgs-nwcap-*' -or $_ -eq 'evgs-process-capture' })
    # The tag marks a topic nwcap created (its value is the environment that created it).
    $creator = if ($topic.tags -and $topic.tags.PSObject.Properties['nwcap-env-name']) { $topic.tags.'nwcap-env-name' } else { $null }
    if (-not $creator) { continue }
    if ($remaining.Count -gt 0) {
        Write-Host "predown: keeping system topic $($topic.name), still used by: $($remaining -join ' ')"
    }
    else {
        Write-Host "predown: removing system topic $($topic.name), created by nwcap and now unused"
        Invoke-Az eventgrid system-topic delete --name $topic.name --resource-group $topic.resourceGroup --yes --output none | Out-Null
    }
}

# One principal's role assignments at each of the scopes.
function Get-AssignmentsOf([string]$principal, [string[]]$scopes) {
    foreach ($scope in $scopes) {
        Invoke-Az role assignment list --scope $scope --query "[?principalId=='$principal'].id" --output tsv |
            Where-Object { $_ }
    }
}

$assignments = @(Get-AssignmentsOf $env:PROCESSOR_PRINCIPAL_ID @($containerId, $poisonQueueId, $accountId))
if ($assignments.Count -gt 0) {
    Write-Host "predown: removing the app identity's roles on $($env:CAPTURES_STORAGE_ACCOUNT_NAME)"
    Invoke-Az role assignment delete --ids @assignments --output none | Out-Null
}

# The deployer's roles there (granted by postdeploy for nwcap reconcile and nwcap status) are
# shared by every environment this person deployed on the account: the last one removes them.
if ($env:DEPLOYER_PRINCIPAL_ID) {
    if ($others.Count -gt 0) {
        Write-Host "predown: keeping the deployer's roles on $($env:CAPTURES_STORAGE_ACCOUNT_NAME), still used by the nwcap environments of: $($others -join ' ')"
    }
    else {
        $deployer = @(Get-AssignmentsOf $env:DEPLOYER_PRINCIPAL_ID @($containerId, $poisonQueueId))
        if ($deployer.Count -gt 0) {
            Write-Host "predown: removing the deployer's roles on $($env:CAPTURES_STORAGE_ACCOUNT_NAME), no other nwcap environment uses it"
            Invoke-Az role assignment delete --ids @deployer --output none | Out-Null
        }
    }
}
