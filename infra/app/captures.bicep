// Wires a capture storage account to the function app: the capture container and poison queue,
// the app identity's rights on those two only (captures-access.bicep), and
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

@description('Container Network Watcher writes the captures to (CAPTURES_CONTAINER).')
param containerName string

@description('Queue the Functions blob trigger moves a blob\'s message to after its last retry, in the account it watches (analyzer/pipeline/poison.py: POISON_QUEUE).')
param poisonQueueName string = 'webjobs-blobtrigger-poison'

@description('Name of the Event Grid system topic on the account.')
param systemTopicName string

@description('False when the account already has a system topic (Azure allows one per source): it is reused.')
param createSystemTopic bool = true

param tags object = {}

resource capturesAccount 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

// What nwcap needs on the account, declared here so that both exist before any capture (and
// before the roles scoped to them): the container Network Watcher writes to (it would create it
// at its first upload otherwise), and the poison queue the blob trigger writes to after its last
// retry. The host sends there first and creates the queue only when told it does not exist
// (StorageQueueExtensions.AddMessageAndCreateIfNotExistsAsync in the Storage extension), so with
// the queue in place its queue-scoped role is all it needs. The services are referenced, never
// redeployed: an existing account keeps its own service settings.
resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' existing = {
  parent: capturesAccount
  name: 'default'
}

resource capturesContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: containerName
  properties: {
    publicAccess: 'None'
  }
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' existing = {
  parent: capturesAccount
  name: 'default'
}

resource poisonQueue 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = {
  parent: queueService
  name: poisonQueueName
}

// The app reads the captures and drains the poison queue, nothing else of the account. Named per
// principal: environments sharing this account's resource group must not overwrite each other's
// deployment, and names stay within 64 characters.
module access 'captures-access.bicep' = {
  name: 'captures-access-${uniqueString(principalId)}'
  params: {
    storageAccountName: capturesAccount.name
    containerName: capturesContainer.name
    poisonQueueName: poisonQueue.name
    principalId: principalId
  }
}

// The operator's copy of the app's rights here, for `nwcap reconcile` (list and read the captures,
// drain the poison queue) and `nwcap status` (the poison queue's length). A user or a service
// principal, so the type is left to Azure. One assignment per principal and role whatever the
// environment (named from the scope, principal and role), so environments that one person
// deploys on this account share it; predown removes it with the last of them.
module operatorAccess 'captures-access.bicep' = if (!empty(operatorPrincipalId)) {
  name: 'captures-operator-${uniqueString(operatorPrincipalId)}'
  params: {
    storageAccountName: capturesAccount.name
    containerName: capturesContainer.name
    poisonQueueName: poisonQueue.name
    principalId: operatorPrincipalId
    principalType: ''
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
output containerId string = access.outputs.containerId
output poisonQueueId string = access.outputs.poisonQueueId
@description('Object id of the created topic\'s identity; empty when an existing topic is reused.')
output systemTopicPrincipalId string = createSystemTopic ? systemTopic.identity.principalId : ''
