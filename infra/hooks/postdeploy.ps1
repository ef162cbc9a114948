# azd postdeploy hook (Windows twin of postdeploy.sh): subscribe process_capture to the capture
# account's BlobCreated events.
#
# The Event Grid subscription cannot live in Bicep: its webhook URL carries the function app's
# blobs_extension system key, which exists only once the code is deployed. For an existing capture
# account this hook first wires the account (roles, system topic) with app/captures.bicep, so that
# azd's own deployment never touches that account's resource group (see docs/deploy.md).
# Safe to re-run: `azd hooks run postdeploy`. Never prints the key.
$ErrorActionPreference = 'Stop'
Set-StrictMode -Version Latest

if (-not (Get-Command az -ErrorAction SilentlyContinue)) {
    throw 'postdeploy: the Azure CLI (az) is required, see docs/deploy.md'
}
$required = @(
    'AZURE_ENV_NAME', 'AZURE_SUBSCRIPTION_ID', 'AZURE_RESOURCE_GROUP', 'AZURE_FUNCTION_APP_NAME',
    'AZURE_FUNCTION_APP_HOSTNAME', 'PROCESSOR_PRINCIPAL_ID', 'CAPTURES_STORAGE_ACCOUNT_NAME',
    'CAPTURES_IS_EXISTING', 'CAPTURES_CONTAINER_NAME', 'CAPTURES_SYSTEM_TOPIC_NAME',
    'CAPTURES_EVENT_SUBSCRIPTION_NAME'
)
foreach ($name in $required) {
    if (-not [Environment]::GetEnvironmentVariable($name)) {
        throw "postdeploy: $name is set by azd from the provisioning outputs: run 'azd up' or 'azd hooks run postdeploy'"
    }
}

# Every call targets azd's subscription, whatever the Azure CLI's default is; a failing call stops the hook.
function Invoke-Az {
    $output = & az @args --subscription $env:AZURE_SUBSCRIPTION_ID
    if ($LASTEXITCODE -ne 0) { throw "postdeploy: az $($args[0..2] -join ' ') failed" }
    return $output
}

$topicGroup = $env:AZURE_RESOURCE_GROUP
$topicName = $env:CAPTURES_SYSTEM_TOPIC_NAME

if ($env:CAPTURES_IS_EXISTING -ieq 'true') {
    $accountId = Invoke-Az storage account list `
        --query "[?name=='$($env:CAPTURES_STORAGE_ACCOUNT_NAME)'].id | [0]" --output tsv
    if (-not $accountId) {
        throw "postdeploy: no storage account '$($env:CAPTURES_STORAGE_ACCOUNT_NAME)' in the current subscription"
    }
    $capturesGroup = $accountId.Split('/')[4]

    # Azure allows one system topic per source: reuse the account's topic if it already has one.
    $createTopic = 'true'
    $topicGroup = $capturesGroup
    $topics = (Invoke-Az eventgrid system-topic list --output json) -join "`n" | ConvertFrom-Json
    foreach ($topic in $topics) {
        if ($topic.source -ieq $accountId) {
            $topicName = $topic.name
            $topicGroup = $topic.resourceGroup
            $createTopic = 'false'
        }
    }

    Write-Host "postdeploy: granting the app read access to $($env:CAPTURES_STORAGE_ACCOUNT_NAME) (resource group $capturesGroup)"
    $template = Join-Path $PSScriptRoot '..' 'app' 'captures.bicep'
    $parametersFile = New-TemporaryFile
    try {
        # A parameters file sidesteps quoting JSON on the az.cmd command line.
        @{
            '$schema'      = 'https://schema.management.azure.com/schemas/2019-04-01/deploymentParameters.json#'
            contentVersion = '1.0.0.0'
            parameters     = @{
                storageAccountName = @{ value = $env:CAPTURES_STORAGE_ACCOUNT_NAME }
                principalId        = @{ value = $env:PROCESSOR_PRINCIPAL_ID }
                systemTopicName    = @{ value = $topicName }
                createSystemTopic  = @{ value = ($createTopic -eq 'true') }
                tags               = @{ value = @{ 'nwcap-env-name' = $env:AZURE_ENV_NAME } }
            }
        } | ConvertTo-Json -Depth 5 | Set-Content -Path $parametersFile -Encoding utf8
        Invoke-Az deployment group create `
            --name "nwcap-captures-$($env:AZURE_ENV_NAME)" `
            --resource-group $capturesGroup `
            --template-file $template `
            --parameters "@$parametersFile" `
            --output none | Out-Null
    }
    finally {
        Remove-Item $parametersFile -ErrorAction SilentlyContinue
    }
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

$endpoint = "https://$($env:AZURE_FUNCTION_APP_HOSTNAME)/runtime/webhooks/blobs?functionName=Host.Functions.process_capture&code=$key"
if ($PSVersionTable.PSEdition -eq 'Desktop' -or $IsWindows) {
    # az is a .cmd script on Windows: without quotes cmd.exe would cut the URL at '&'.
    $endpoint = '"' + $endpoint + '"'
}
Write-Host "postdeploy: subscribing process_capture to *.cap blobs in $($env:CAPTURES_CONTAINER_NAME) (topic $topicName)"
Invoke-Az eventgrid system-topic event-subscription create `
    --name $env:CAPTURES_EVENT_SUBSCRIPTION_NAME `
    --resource-group $topicGroup `
    --system-topic-name $topicName `
    --endpoint-type webhook `
    --endpoint $endpoint `
    --included-event-types Microsoft.Storage.BlobCreated `
    --subject-begins-with "/blobServices/default/containers/$($env:CAPTURES_CONTAINER_NAME)/" `
    --subject-ends-with .cap `
    --subject-case-sensitive false `
    --output none | Out-Null
Write-Host "postdeploy: done; new captures in $($env:CAPTURES_STORAGE_ACCOUNT_NAME)/$($env:CAPTURES_CONTAINER_NAME) are now processed"
