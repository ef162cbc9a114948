// nwcap on Azure: a Flex Consumption function app that summarises every Network Watcher packet
// capture (.cap blob) into the results tables. Deployed by `azd up`; see docs/deploy.md.
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('Name of the azd environment: seeds the resource token and tags every resource.')
param environmentName string

@minLength(1)
@description('Region of the new resources; it must offer Flex Consumption (az functionapp list-flexconsumption-locations).')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Object id of the deployer (azd sets AZURE_PRINCIPAL_ID): gets the rights nwcap reconcile and nwcap status need from an operator machine (results: tables, nwcap-config, alert messages; capture account: read blobs, drain the poison queue). Empty for none.')
param principalId string = ''

@description('Give the deployer the app\'s rights on the capture account too (read the capture container, drain the poison queue), for nwcap reconcile and nwcap status from their machine; predown removes them with the last environment on that account.')
param capturesDeployerAccess bool = true

@description('Integrate the function app with a new VNet and reach the host and results storage through private endpoints.')
param vnetEnabled bool = false

@description('With vnetEnabled: a public IPv4 address let through the results account firewall, to query summaries from your machine.')
param clientIpAddress string = ''

@description('Name of an existing storage account (same subscription) that Network Watcher writes captures to; empty creates one.')
param existingCapturesAccountName string = ''

@description('For a created capture account: days after which captures are deleted; 0 keeps them.')
@minValue(0)
param captureRetentionDays int = 30

@description('Name of a policy blob in the results container nwcap-config (e.g. policy.yaml); empty for the built-in policy.')
param policyBlobName string = ''

@description('Name of a ServiceTags_Public JSON blob in nwcap-config; empty for none. When set, it wins over the refreshed tags.')
param serviceTagsBlobName string = ''

@description('Keep service tags current from the Service Tag Discovery API (timer, into nwcap-config/servicetags.json). Creates a custom role with Microsoft.Network/locations/serviceTags/read on the subscription for the app, which needs Owner or User Access Administrator to deploy; false for neither.')
param serviceTagsRefresh bool = true

@minLength(3)
@maxLength(63)
@description('Container of the capture account that Network Watcher writes to (its --storage-path); the app processes .cap blobs there only.')
param capturesContainerName string = 'network-watcher-logs'

@description('With an existing capture account whose dnsEndpointType is AzureDnsZone: its blob endpoint (az storage account show --query primaryEndpoints.blob). Empty for the standard endpoint.')
param existingCapturesBlobEndpoint string = ''

@description('Same as existingCapturesBlobEndpoint, for the queue endpoint (primaryEndpoints.queue).')
param existingCapturesQueueEndpoint string = ''

@minLength(3)
@maxLength(63)
@description('Queue in the results account receiving one message per alert.')
param alertsQueueName string = 'nwcap-alerts'

@description('E-mail address the Azure Monitor alert rules notify; empty creates the rules without an action group.')
param alertEmailAddress string = ''

@description('NCRONTAB schedule of the reconcile timer function (six fields, seconds first).')
param reconcileSchedule string = '0 */10 * * * *'

@description('How far back the reconciler lists capture blobs, e.g. 48h.')
param reconcileLookback string = '48h'

@description('ISO 8601 duration the reconcile alert rules look back over: no run in it fires the reconciler-silence rule, transient failures in every run of it fire the failed-or-stuck rule; keep it at least three RECONCILE_SCHEDULE periods (at most P2D).')
param reconcileAlertWindow string = 'PT30M'

@description('Most instances each of the app\'s scale groups (blob trigger, fan-out queue trigger, HTTP) scales out to (Flex Consumption: 1 to 1000). With host.json\'s two captures per instance and group, 25 keeps a burst within the results account\'s 20,000 requests/s: docs/reliability.md, "Scale-out and the storage targets".')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 25

@description('Application (client) id of a Microsoft Entra app registration: people sign in with it in front of /api/ui and the query API (App Service Authentication); empty keeps function keys only. docs/deploy.md, "Signing in".')
param authClientId string = ''

@description('Comma-separated CIDR ranges allowed to reach the function app besides Event Grid (AzureEventGrid service tag), e.g. your offices\' egress; empty for no inbound restriction.')
param inboundAllowedAddressRanges string = ''

var abbrs = loadJsonContent('abbreviations.json')
var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
}

var resourceGroupName = '${abbrs.resourcesResourceGroups}${environmentName}'
var functionAppName = '${abbrs.webSitesFunctions}${resourceToken}'
// Flex Consumption pulls the app package from this container of the host storage.
var deploymentContainerName = 'app-package-${take(functionAppName, 32)}-${take(resourceToken, 7)}'
var configContainerName = 'nwcap-config'
// The service tags the timer refreshes, and the record of its checks beside them
// (analyzer/pipeline/servicetags_refresh.py: DEFAULT_BLOB, state_blob_name).
var serviceTagsRefreshBlobName = 'servicetags.json'
var serviceTagsRefreshStateBlobName = 'servicetags.refresh.json'
// Event Grid writes events it could not deliver here (results account), one blob per event.
var deadLetterContainerName = 'nwcap-deadletter'
// The reconcile timer sends each capture due to this queue, and process_queued_capture takes
// them from it on as many instances as the app scales to (analyzer/pipeline/fanout.py:
// FANOUT_QUEUE); the queue trigger parks a message that keeps failing in its -poison twin.
var fanoutQueueName = 'nwcap-captures'
var fanoutQueues = [
  fanoutQueueName
  '${fanoutQueueName}-poison'
]
var resultsTables = [
  'captures'
  'peers'
  'alerts'
  'peerindex'
  'baseline'
]

var useExistingCaptures = !empty(existingCapturesAccountName)
var capturesAccountName = useExistingCaptures ? existingCapturesAccountName : '${abbrs.storageStorageAccounts}cap${resourceToken}'
var capturesSystemTopicName = '${abbrs.eventGridSystemTopics}${capturesAccountName}'
// One subscription per environment, so that several environments can share a capture account
// (and its single system topic): letters, digits and hyphens, at most 64 characters, and the
// resource token keeps two long environment names with the same beginning apart.
var environmentSlug = toLower(replace(replace(replace(replace(environmentName, '_', '-'), '.', '-'), '(', '-'), ')', '-'))
var capturesEventSubscriptionName = '${abbrs.eventGridEventSubscriptions}nwcap-${take(environmentSlug, 40)}-${take(resourceToken, 8)}'
// Computed from the name (or passed, for an AzureDnsZone account) rather than read from the
// account, so that an existing account's resource group never appears in this deployment (azd
// down deletes every group it touched). infra/hooks/postdeploy compares them with the account's.
var capturesBlobEndpoint = !empty(existingCapturesBlobEndpoint) ? existingCapturesBlobEndpoint : 'https://${capturesAccountName}.blob.${environment().suffixes.storage}/'
var capturesQueueEndpoint = !empty(existingCapturesQueueEndpoint) ? existingCapturesQueueEndpoint : 'https://${capturesAccountName}.queue.${environment().suffixes.storage}/'

var privateEndpointSubnetName = '${abbrs.networkVirtualNetworksSubnets}private-endpoints'
var appSubnetName = '${abbrs.networkVirtualNetworksSubnets}app'

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: resourceGroupName
  location: location
  tags: tags
}

module identity 'app/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: '${abbrs.managedIdentityUserAssignedIdentities}processor-${resourceToken}'
    location: location
    tags: tags
  }
}

module monitoring 'app/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    logAnalyticsName: '${abbrs.operationalInsightsWorkspaces}${resourceToken}'
    applicationInsightsName: '${abbrs.insightsComponents}${resourceToken}'
    location: location
    tags: tags
  }
}

module vnet 'app/vnet.bicep' = if (vnetEnabled) {
  name: 'vnet'
  scope: rg
  params: {
    name: '${abbrs.networkVirtualNetworks}${resourceToken}'
    location: location
    tags: tags
    privateEndpointSubnetName: privateEndpointSubnetName
    appSubnetName: appSubnetName
  }
}

// The Functions host's own storage: keys, leases, blob-trigger queue, deployment package.
module hostStorage 'app/storage.bicep' = {
  name: 'host-storage'
  scope: rg
  params: {
    name: '${abbrs.storageStorageAccounts}${resourceToken}'
    location: location
    tags: tags
    containers: [
      deploymentContainerName
    ]
    vnetEnabled: vnetEnabled
  }
}

// Summaries, peers and alerts (tables) and the optional policy and service-tags files.
module resultsStorage 'app/storage.bicep' = {
  name: 'results-storage'
  scope: rg
  params: {
    name: '${abbrs.storageStorageAccounts}res${resourceToken}'
    location: location
    tags: tags
    containers: [
      configContainerName
      deadLetterContainerName
    ]
    tables: resultsTables
    queues: concat([
      alertsQueueName
    ], fanoutQueues)
    vnetEnabled: vnetEnabled
    allowedIpAddresses: empty(clientIpAddress) ? [] : [
      clientIpAddress
    ]
  }
}

module privateEndpoints 'app/private-endpoints.bicep' = if (vnetEnabled) {
  name: 'private-endpoints'
  scope: rg
  params: {
    location: location
    tags: tags
    virtualNetworkId: vnet.outputs.id
    subnetId: vnet.outputs.privateEndpointSubnetId
    endpoints: [
      {
        accountName: hostStorage.outputs.name
        service: 'blob'
      }
      {
        accountName: hostStorage.outputs.name
        service: 'queue'
      }
      {
        accountName: hostStorage.outputs.name
        service: 'table'
      }
      {
        accountName: resultsStorage.outputs.name
        service: 'blob'
      }
      {
        accountName: resultsStorage.outputs.name
        service: 'table'
      }
      {
        accountName: resultsStorage.outputs.name
        service: 'queue'
      }
    ]
  }
}

// A new capture account, in this resource group, when none is passed. An existing one is wired by
// infra/hooks/postdeploy with app/captures.bicep instead.
module capturesStorage 'app/captures-storage.bicep' = if (!useExistingCaptures) {
  name: 'captures-storage'
  scope: rg
  params: {
    name: capturesAccountName
    location: location
    tags: tags
    containerName: capturesContainerName
    retentionDays: captureRetentionDays
  }
}

module capturesWiring 'app/captures.bicep' = if (!useExistingCaptures) {
  name: 'captures-wiring'
  scope: rg
  params: {
    storageAccountName: capturesAccountName
    containerName: capturesContainerName
    principalId: identity.outputs.principalId
    operatorPrincipalId: capturesDeployerAccess ? principalId : ''
    systemTopicName: capturesSystemTopicName
    tags: tags
  }
  dependsOn: [
    capturesStorage
  ]
}

// The created topic's identity may write undeliverable events to the dead-letter container.
module deadLetterAccess 'app/deadletter-access.bicep' = if (!useExistingCaptures) {
  name: 'deadletter-access'
  scope: rg
  params: {
    resultsAccountName: resultsStorage.outputs.name
    containerName: deadLetterContainerName
    principalId: capturesWiring.outputs.systemTopicPrincipalId
  }
}

// Host storage: blobs (keys, leases, receipts, package), queues (blob trigger), tables
// (diagnostic events); telemetry to the Entra-only Application Insights.
module hostAccess 'app/rbac.bicep' = {
  name: 'host-access'
  scope: rg
  params: {
    storageAccountName: hostStorage.outputs.name
    principalId: identity.outputs.principalId
    storageRoles: [
      'StorageBlobDataOwner'
      'StorageQueueDataContributor'
      'StorageTableDataContributor'
    ]
    applicationInsightsName: monitoring.outputs.applicationInsightsName
  }
}

// Results: write the tables, read the policy and service-tags files, send alert messages (the
// queue exists, so the app needs no right to create or read it).
module resultsAccess 'app/rbac.bicep' = {
  name: 'results-access'
  scope: rg
  params: {
    storageAccountName: resultsStorage.outputs.name
    principalId: identity.outputs.principalId
    storageRoles: [
      'StorageTableDataContributor'
      'StorageBlobDataReader'
      'StorageQueueDataMessageSender'
    ]
  }
}

// The fan-out queue and its poison queue: the app sends, receives, deletes and reads their length.
module fanoutAccess 'app/queue-access.bicep' = {
  name: 'fanout-access'
  scope: rg
  params: {
    storageAccountName: resultsStorage.outputs.name
    queueNames: fanoutQueues
    principalId: identity.outputs.principalId
  }
}

// Service tags kept current: the app may write the refreshed tags (and only them) in nwcap-config,
// and list service tags on the subscription with a custom role holding that one action (the
// Discovery API exists at subscription scope only, hence the one module deployed there; it
// creates no resource group, so azd down still touches the environment's own group only).
module serviceTagsWriter 'app/servicetags-writer.bicep' = if (serviceTagsRefresh) {
  name: 'servicetags-writer'
  scope: rg
  params: {
    resultsAccountName: resultsStorage.outputs.name
    containerName: configContainerName
    principalId: identity.outputs.principalId
    tagsBlobName: serviceTagsRefreshBlobName
    stateBlobName: serviceTagsRefreshStateBlobName
  }
}

module serviceTagsReader 'app/servicetags-reader.bicep' = if (serviceTagsRefresh) {
  // a subscription-level deployment name: one per environment
  name: 'servicetags-reader-${resourceToken}'
  scope: subscription()
  params: {
    principalId: identity.outputs.principalId
  }
}

// The deployer, as operator, with `--auth-mode login` and no key: query summaries, upload the
// policy, read dead-lettered events, and run `nwcap reconcile` / `nwcap status` from their machine
// (they write the captures table and send pending alerts, as the timer does). The capture
// account's side (the capture container and the poison queue only) is granted by
// app/captures.bicep (operatorPrincipalId) unless capturesDeployerAccess is false, or by the
// postdeploy hook for an existing account.
module deployerAccess 'app/rbac.bicep' = if (!empty(principalId)) {
  name: 'deployer-access'
  scope: rg
  params: {
    storageAccountName: resultsStorage.outputs.name
    principalId: principalId
    principalType: ''
    storageRoles: [
      'StorageTableDataContributor'
      'StorageBlobDataContributor'
      'StorageQueueDataMessageSender'
    ]
  }
}

var connectionSettings = {
  CAPTURES_CONNECTION__blobServiceUri: capturesBlobEndpoint
  CAPTURES_CONNECTION__queueServiceUri: capturesQueueEndpoint
  CAPTURES_CONNECTION__credential: 'managedidentity'
  CAPTURES_CONNECTION__clientId: identity.outputs.clientId
  CAPTURES_CONTAINER: capturesContainerName
  // the dashboard's link to the account in the portal; an existing account's group is not known here
  CAPTURES_ACCOUNT_ID: useExistingCaptures ? '' : '${rg.id}/providers/Microsoft.Storage/storageAccounts/${capturesAccountName}'
  RESULTS_CONNECTION__tableServiceUri: resultsStorage.outputs.tableEndpoint
  RESULTS_CONNECTION__blobServiceUri: resultsStorage.outputs.blobEndpoint
  RESULTS_CONNECTION__queueServiceUri: resultsStorage.outputs.queueEndpoint
  RESULTS_CONNECTION__credential: 'managedidentity'
  RESULTS_CONNECTION__clientId: identity.outputs.clientId
}
// Alert delivery and the reconcile timer. function_app.py reads RECONCILE_SCHEDULE when the host
// indexes the functions and falls back to every 10 minutes when it is absent or empty; it is set
// here so that the schedule in use is the one azd was given.
var operationSettings = {
  ALERTS_QUEUE: alertsQueueName
  RECONCILE_SCHEDULE: reconcileSchedule
  RECONCILE_LOOKBACK: reconcileLookback
}
var policySettings = empty(policyBlobName) ? {} : {
  NWCAP_POLICY: '${resultsStorage.outputs.blobEndpoint}${configContainerName}/${policyBlobName}'
}
var serviceTagsSettings = empty(serviceTagsBlobName) ? {} : {
  NWCAP_SERVICE_TAGS: '${resultsStorage.outputs.blobEndpoint}${configContainerName}/${serviceTagsBlobName}'
}
// The refresh (docs/settings.md): where to ask, and where to keep the tags. NWCAP_SERVICE_TAGS,
// when set above, wins: the refresh then skips and the app reads that file.
var serviceTagsRefreshSettings = {
  NWCAP_SERVICE_TAGS_REFRESH: serviceTagsRefresh ? 'on' : 'off'
  NWCAP_SERVICE_TAGS_SUBSCRIPTION: subscription().subscriptionId
  NWCAP_SERVICE_TAGS_LOCATION: location
  NWCAP_SERVICE_TAGS_ENDPOINT: environment().resourceManager
  NWCAP_SERVICE_TAGS_REFRESH_CONTAINER: configContainerName
  NWCAP_SERVICE_TAGS_REFRESH_BLOB: serviceTagsRefreshBlobName
}

module processor 'app/processor.bicep' = {
  name: 'processor'
  scope: rg
  params: {
    name: functionAppName
    planName: '${abbrs.webServerFarms}${resourceToken}'
    location: location
    tags: tags
    identityId: identity.outputs.resourceId
    identityClientId: identity.outputs.clientId
    hostStorageAccountName: hostStorage.outputs.name
    deploymentContainerName: deploymentContainerName
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    virtualNetworkSubnetId: vnetEnabled ? vnet.outputs.appSubnetId : ''
    appSettings: union(connectionSettings, operationSettings, policySettings, serviceTagsSettings, serviceTagsRefreshSettings)
    maximumInstanceCount: maximumInstanceCount
    authClientId: authClientId
    inboundAllowedRanges: empty(inboundAllowedAddressRanges) ? [] : split(replace(inboundAllowedAddressRanges, ' ', ''), ',')
  }
  dependsOn: [
    hostAccess
    privateEndpoints
  ]
}

// Scheduled query rules on the app's structured records (one event rule, three stateful ones),
// and the optional e-mail action group.
module alerts 'app/alerts.bicep' = {
  name: 'alerts'
  scope: rg
  params: {
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    location: location
    tags: tags
    namePrefix: 'nwcap-${resourceToken}'
    alertEmailAddress: alertEmailAddress
    reconcileWindowSize: reconcileAlertWindow
  }
}

// Read by infra/hooks/postdeploy and predown, and by the commands in docs/deploy.md.
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_APP_NAME string = processor.outputs.name
output AZURE_FUNCTION_APP_HOSTNAME string = processor.outputs.defaultHostName
output AZURE_FUNCTION_APP_SIGN_IN bool = !empty(authClientId)
output PROCESSOR_PRINCIPAL_ID string = identity.outputs.principalId
// Not AZURE_PRINCIPAL_ID: an output of that name would be fed back as the next deployment's input.
output DEPLOYER_PRINCIPAL_ID string = principalId
output CAPTURES_DEPLOYER_ACCESS bool = capturesDeployerAccess && !empty(principalId)
output APPLICATIONINSIGHTS_NAME string = monitoring.outputs.applicationInsightsName
output CAPTURES_STORAGE_ACCOUNT_NAME string = capturesAccountName
output CAPTURES_IS_EXISTING bool = useExistingCaptures
output CAPTURES_CONTAINER_NAME string = capturesContainerName
output CAPTURES_BLOB_ENDPOINT string = capturesBlobEndpoint
output CAPTURES_QUEUE_ENDPOINT string = capturesQueueEndpoint
output CAPTURES_SYSTEM_TOPIC_NAME string = capturesSystemTopicName
output CAPTURES_EVENT_SUBSCRIPTION_NAME string = capturesEventSubscriptionName
output RESULTS_STORAGE_ACCOUNT_NAME string = resultsStorage.outputs.name
output RESULTS_STORAGE_ACCOUNT_ID string = resultsStorage.outputs.id
output RESULTS_CONFIG_CONTAINER_NAME string = configContainerName
output RESULTS_DEADLETTER_CONTAINER_NAME string = deadLetterContainerName
output RESULTS_ALERTS_QUEUE_NAME string = alertsQueueName
output AZURE_APP_SUBNET_ID string = vnetEnabled ? vnet.outputs.appSubnetId : ''
