// Lets the app's identity write the service tags it refreshes into the config container of the
// results account, and no other blob: Storage Blob Data Contributor on that one container, with a
// condition that allows writing, appending and deleting only the tags blob and the record of its
// checks beside it. Your policy file in the same container stays read-only to the app (it keeps
// Storage Blob Data Reader on the account for reading). Deployed by main.bicep when the refresh
// is on.
param resultsAccountName string
param containerName string

@description('Object id of the app\'s identity.')
param principalId string

@description('The refreshed tags (app setting NWCAP_SERVICE_TAGS_REFRESH_BLOB).')
param tagsBlobName string

@description('The record of the refresh\'s checks beside it (analyzer.pipeline.servicetags_refresh.state_blob_name).')
param stateBlobName string

// Storage Blob Data Contributor: read, write and delete blobs; narrowed by the condition below.
var storageBlobDataContributorRoleId = 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'

// Any request that is not a write passes (reads are the Reader role's anyway); a write, append,
// move or delete passes only for the two blobs of the refresh.
var writeCondition = '((!(ActionMatches{\'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/write\'}) AND !(ActionMatches{\'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/add/action\'}) AND !(ActionMatches{\'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/move/action\'}) AND !(ActionMatches{\'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/delete\'})) OR (@Resource[Microsoft.Storage/storageAccounts/blobServices/containers/blobs:path] StringEquals \'${tagsBlobName}\' OR @Resource[Microsoft.Storage/storageAccounts/blobServices/containers/blobs:path] StringEquals \'${stateBlobName}\'))'

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

resource tagsWriter 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(container.id, principalId, storageBlobDataContributorRoleId)
  scope: container
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataContributorRoleId)
    principalId: principalId
    principalType: 'ServicePrincipal'
    condition: writeCondition
    conditionVersion: '2.0'
  }
}
