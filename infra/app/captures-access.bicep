// One principal's rights on a capture account, each scoped to the one resource it is for: read
// the blobs of the capture container (Storage Blob Data Reader on that container, not the
// account), and add, read and delete the messages of the blob trigger's poison queue (Storage
// Queue Data Contributor on that queue, not the account's other queues). Deployed by
// captures.bicep, in the capture account's resource group, after it declared both.
param storageAccountName string
param containerName string
param poisonQueueName string

@description('Object id of the identity receiving the roles.')
param principalId string

@description('ServicePrincipal for a managed identity; empty lets Azure resolve it (a deployer may be a user or a service principal).')
@allowed([
  'ServicePrincipal'
  ''
])
param principalType string = 'ServicePrincipal'

// Built-in role definition ids, identical in every tenant (as in rbac.bicep).
// Storage Blob Data Reader: read and list blobs (the captures).
var storageBlobDataReaderRoleId = '2a2b9908-6ea1-4ae2-8e65-a410df84e7d1'
// Storage Queue Data Contributor: add messages (the host, after its last retry), read and delete
// them (the reconciler), read the queue's length (nwcap status).
var storageQueueDataContributorRoleId = '974c5e8b-45b9-4653-ba55-5f855dd0fb88'

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' existing = {
  parent: account
  name: 'default'
}

resource container 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: containerName
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' existing = {
  parent: account
  name: 'default'
}

resource poisonQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' existing = {
  parent: queueService
  name: poisonQueueName
}

resource captureReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(container.id, principalId, storageBlobDataReaderRoleId)
  scope: container
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataReaderRoleId)
    principalId: principalId
    principalType: empty(principalType) ? null : principalType
  }
}

resource poisonQueueContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(poisonQueue.id, principalId, storageQueueDataContributorRoleId)
  scope: poisonQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageQueueDataContributorRoleId)
    principalId: principalId
    principalType: empty(principalType) ? null : principalType
  }
}

output containerId string = container.id
output poisonQueueId string = poisonQueue.id
