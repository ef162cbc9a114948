// Data-plane role assignments for one principal: on one storage account and, optionally, on the
// Application Insights component. Access is granted by role, never by key. Deploy this module in
// the resource group of the account it grants access to.
param storageAccountName string

@description('Names of the roles to grant on the storage account (keys of roleIds below).')
@allowed([
  'StorageBlobDataOwner'
  'StorageBlobDataContributor'
  'StorageBlobDataReader'
  'StorageQueueDataContributor'
  'StorageQueueDataMessageSender'
  'StorageTableDataContributor'
])
param storageRoles array

@description('Object id of the identity receiving the roles.')
param principalId string

@description('ServicePrincipal for managed identities; empty lets Azure resolve it (the deployer may be a user or a service principal).')
@allowed([
  'ServicePrincipal'
  'User'
  ''
])
param principalType string = 'ServicePrincipal'

@description('Application Insights component that accepts telemetry from this principal; empty for none.')
param applicationInsightsName string = ''

// Built-in role definition ids, identical in every tenant (az role definition list --name "<role>").
var roleIds = {
  // Read, write and delete blobs, containers and leases: the Functions host's own storage
  // (keys, leases, blob receipts, the deployment package).
  StorageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  // Read and write blobs: the deployer uploading the policy and service-tags files to nwcap-config,
  // and reading dead-lettered events.
  StorageBlobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
  // Read blobs: the policy and service-tags files of the results account. (The captures are read
  // under the same role scoped to the capture container: captures-access.bicep.)
  StorageBlobDataReader: '2a2b9908-6ea1-4ae2-8e65-a410df84e7d1'
  // Create queues and add, read and delete their messages: the host's own blob-trigger queues in
  // its storage. (On the capture account the same role is scoped to the poison queue alone:
  // captures-access.bicep.)
  StorageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  // Add messages only (no peek, read, delete or queue management): the app (and the operator's
  // nwcap reconcile) putting one message per alert on the alerts queue, which Bicep creates, so
  // neither ever needs to create it.
  StorageQueueDataMessageSender: 'c6a89b2d-59bc-44d0-9896-0f6e12d7b80a'
  // Read and write table entities: the results tables (written by the app and by the operator's
  // nwcap reconcile), and the host's diagnostic events.
  StorageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
}

// Publish telemetry to an Application Insights component whose local (key) auth is disabled.
var monitoringMetricsPublisherRoleId = '3913510d-42f4-4e42-8a64-420c390055eb'

resource storageAccount 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = if (!empty(applicationInsightsName)) {
  name: applicationInsightsName
}

resource storageRoleAssignments 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for role in storageRoles: {
  name: guid(storageAccount.id, principalId, roleIds[role])
  scope: storageAccount
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roleIds[role])
    principalId: principalId
    principalType: empty(principalType) ? null : principalType
  }
}]

resource monitoringRoleAssignment 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(applicationInsightsName)) {
  name: guid(applicationInsights.id, principalId, monitoringMetricsPublisherRoleId)
  scope: applicationInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', monitoringMetricsPublisherRoleId)
    principalId: principalId
    principalType: empty(principalType) ? null : principalType
  }
}
