// Storage Queue Data Contributor for one principal on named queues of an account, each
// assignment scoped to its queue: the fan-out queue the reconcile timer sends to and its queue
// trigger reads, and that trigger's poison queue. Contributor rather than Reader plus Message
// Processor plus Sender: the trigger also reads the queue's length (scaling, the timer's room
// check) and moves a failing message to the poison queue, which it creates if absent. Scoped to
// the queues, the role reaches no other queue of the account (nwcap-alerts keeps its sender
// role only).
param storageAccountName string

@description('Queues of the account, which must exist (storage.bicep creates them).')
param queueNames array

@description('Object id of the identity receiving the role.')
param principalId string

// Built-in role definition id, identical in every tenant (as in rbac.bicep).
var storageQueueDataContributorRoleId = '974c5e8b-45b9-4653-ba55-5f855dd0fb88'

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' existing = {
  parent: account
  name: 'default'
}

resource queues 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' existing = [for name in queueNames: {
  parent: queueService
  name: name
}]

resource contributors 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for (name, i) in queueNames: {
  name: guid(queues[i].id, principalId, storageQueueDataContributorRoleId)
  scope: queues[i]
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageQueueDataContributorRoleId)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}]
