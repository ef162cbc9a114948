// The user-assigned identity the function app runs as: every storage connection, the deployment
// package download and telemetry authenticate with it, so no account key or connection string
// is ever stored in app settings.
param name string
param location string = resourceGroup().location
param tags object = {}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: name
  location: location
  tags: tags
}

output resourceId string = identity.id
output name string = identity.name
output clientId string = identity.properties.clientId
output principalId string = identity.properties.principalId
