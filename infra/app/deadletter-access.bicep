// Lets an Event Grid system topic's identity write undeliverable events (after the subscription's
// last retry or its event time-to-live) to the dead-letter container of the results account, and
// nowhere else: the role is scoped to that one container. Deployed by main.bicep for a topic it
// creates, and by infra/hooks/postdeploy for the topic of an existing capture account.
param resultsAccountName string
param containerName string

@description('Object id of the system topic\'s system-assigned identity.')
param principalId string

// Storage Blob Data Contributor: Event Grid writes each dead-lettered event as a blob.
var storageBlobDataContributorRoleId = 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'

resource resultsAccount 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: resultsAccountName
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' existing = {
  parent: resultsAccount
  name: 'default'
}

resource container 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: blobService
  name: containerName
}

resource deadLetterWriter 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(container.id, principalId, storageBlobDataContributorRoleId)
  scope: container
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataContributorRoleId)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

output containerId string = container.id
