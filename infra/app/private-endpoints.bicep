// Private endpoints (and their privatelink DNS zones) through which the VNet-integrated function
// app reaches the host and results storage accounts when vnetEnabled.
param location string = resourceGroup().location
param tags object = {}
param virtualNetworkId string
param subnetId string

@description('One entry per endpoint: { accountName: string, service: \'blob\' | \'queue\' | \'table\' }.')
param endpoints array

var abbrs = loadJsonContent('../abbreviations.json')

var services = [
  'blob'
  'queue'
  'table'
]

resource dnsZones 'Microsoft.Network/privateDnsZones@2020-06-01' = [for service in services: {
  name: 'privatelink.${service}.${environment().suffixes.storage}'
  location: 'global'
  tags: tags
}]

resource dnsZoneLinks 'Microsoft.Network/privateDnsZones/virtualNetworkLinks@2020-06-01' = [for (service, i) in services: {
  parent: dnsZones[i]
  name: '${service}-link'
  location: 'global'
  tags: tags
  properties: {
    registrationEnabled: false
    virtualNetwork: {
      id: virtualNetworkId
    }
  }
}]

resource privateEndpoints 'Microsoft.Network/privateEndpoints@2024-05-01' = [for endpoint in endpoints: {
  name: '${abbrs.networkPrivateEndpoints}${endpoint.accountName}-${endpoint.service}'
  location: location
  tags: tags
  properties: {
    subnet: {
      id: subnetId
    }
    privateLinkServiceConnections: [
      {
        name: '${endpoint.accountName}-${endpoint.service}'
        properties: {
          privateLinkServiceId: resourceId('Microsoft.Storage/storageAccounts', endpoint.accountName)
          groupIds: [
            endpoint.service
          ]
        }
      }
    ]
  }
}]

resource dnsZoneGroups 'Microsoft.Network/privateEndpoints/privateDnsZoneGroups@2024-05-01' = [for (endpoint, i) in endpoints: {
  parent: privateEndpoints[i]
  name: 'default'
  properties: {
    privateDnsZoneConfigs: [
      {
        name: endpoint.service
        properties: {
          privateDnsZoneId: resourceId('Microsoft.Network/privateDnsZones', 'privatelink.${endpoint.service}.${environment().suffixes.storage}')
        }
      }
    ]
  }
  dependsOn: [
    dnsZones
  ]
}]
