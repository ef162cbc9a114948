// A new storage account for Network Watcher packet captures, created when no existing account is
// passed. Network Watcher uploads each .cap with a SAS token signed by the account key, so unlike
// the other accounts this one must keep shared-key access. The function app itself reads it with
// its managed identity (see captures.bicep).
param name string
param location string = resourceGroup().location
param tags object = {}

@description('Container Network Watcher writes to (when no --storage-path is given, network-watcher-logs); captures.bicep creates it, beside the poison queue, for new and existing accounts alike.')
param containerName string = 'network-watcher-logs'

@description('Days after which captures are deleted; 0 keeps them forever.')
@minValue(0)
param retentionDays int = 30

resource storageAccount 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_35: the packet-capture agent uploads from the captured VM's own network, which a firewall would have to list VNet by VNet
  // checkov:skip=CKV_AZURE_59: same reason as CKV_AZURE_35: the captured VMs' agents reach the blob endpoint over its public address
  // checkov:skip=CKV_AZURE_206: captures are short-lived diagnostics, deleted after retentionDays; geo-replication would double their cost for no use
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    accessTier: 'Hot'
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    allowSharedKeyAccess: true
    defaultToOAuthAuthentication: true
    dnsEndpointType: 'Standard'
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storageAccount
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 7
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource retention 'Microsoft.Storage/storageAccounts/managementPolicies@2023-05-01' = if (retentionDays > 0) {
  parent: storageAccount
  name: 'default'
  properties: {
    policy: {
      rules: [
        {
          name: 'delete-old-captures'
          enabled: true
          type: 'Lifecycle'
          definition: {
            filters: {
              blobTypes: [
                'blockBlob'
              ]
              prefixMatch: [
                '${containerName}/'
              ]
            }
            actions: {
              baseBlob: {
                delete: {
                  daysAfterModificationGreaterThan: retentionDays
                }
              }
            }
          }
        }
      ]
    }
  }
}

output name string = storageAccount.name
output id string = storageAccount.id
