// Wires a capture storage account to the function app: read access for the app's identity, and
// the Event Grid system topic that publishes the account's BlobCreated events (the subscription
// itself is created by infra/hooks/postdeploy, which needs the function's blobs_extension key).
//
// main.bicep deploys this module for a capture account it creates. For an existing account the
// postdeploy hook deploys this file into that account's resource group with
// `az deployment group create`: azd's own deployment must not touch that resource group, because
// `azd down` deletes every resource group its deployment touched.
param storageAccountName string

@description('Object id of the function app identity.')
param principalId string

@description('Object id of an operator (the deployer) who runs nwcap reconcile and nwcap status from their machine; empty for none.')
param operatorPrincipalId string = ''

@description('Name of the Event Grid system topic on the account.')
param systemTopicName string

@description('False when the account already has a system topic (Azure allows one per source): it is reused.')
param createSystemTopic bool = true

param tags object = {}

resource capturesAccount 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

// Read the .cap blobs; the blob trigger's poison queue (written by the host after its last retry,
// drained by the reconciler). Named per principal: environments sharing this account's resource
// group must not overwrite each other's deployment, and names stay within 64 characters.
module access 'rbac.bicep' = {
  name: 'captures-access-${uniqueString(principalId)}'
  params: {
    storageAccountName: capturesAccount.name
    principalId: principalId
    storageRoles: [
      'StorageBlobDataReader'
      'StorageQueueDataContributor'
    ]
  }
}

// The operator's copy of the app's rights here, for `nwcap reconcile` (list and read the captures,
// drain the poison queue) and `nwcap status` (the poison queue's length). A user or a service
// principal, so the type is left to Azure. One assignment per principal and role whatever the
// environment (rbac.bicep names it from the account, principal and role), so environments that
// one person deploys on this account share it, and predown leaves it in place.
module operatorAccess 'rbac.bicep' = if (!empty(operatorPrincipalId)) {
  name: 'captures-operator-${uniqueString(operatorPrincipalId)}'
  params: {
    storageAccountName: capturesAccount.name
    principalId: operatorPrincipalId
    principalType: ''
    storageRoles: [
      'StorageBlobDataReader'
      'StorageQueueDataContributor'
    ]
  }
}

// The system-assigned identity writes undeliverable events to the dead-letter container of each
// environment's results account (deadletter-access.bicep grants it that container only).
resource systemTopic 'Microsoft.EventGrid/systemTopics@2022-06-15' = if (createSystemTopic) {
  name: systemTopicName
  location: capturesAccount.location
  tags: tags
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    source: capturesAccount.id
    topicType: 'Microsoft.Storage.StorageAccounts'
  }
}

output systemTopicName string = systemTopicName
@description('Object id of the created topic\'s identity; empty when an existing topic is reused.')
output systemTopicPrincipalId string = createSystemTopic ? systemTopic.identity.principalId : ''
