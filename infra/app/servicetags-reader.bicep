// Lets the app's identity read Azure's service tags (the Service Tag Discovery API, Service Tags -
// List) and nothing else, so that the timer keeps nwcap-config/servicetags.json current. No
// built-in role is that narrow (Reader and Network Contributor read or change every resource), so
// this is a custom role with the one action the call needs, assignable and assigned on the
// subscription only: the API exists at subscription scope alone
// (/subscriptions/{id}/providers/Microsoft.Network/locations/{location}/serviceTags).
// Deployed by main.bicep with scope: subscription(); the deployer needs
// Microsoft.Authorization/roleDefinitions/write there (Owner or User Access Administrator).
targetScope = 'subscription'

@description('Object id of the identity that reads the service tags (the function app\'s).')
param principalId string

// One definition per subscription, shared by every nwcap environment deployed in it: its id is
// derived from the subscription alone, and its name carries the subscription id because custom
// role names are unique in a whole tenant.
var roleDefinitionId = guid(subscription().id, 'nwcap-service-tag-reader')

resource serviceTagReader 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: roleDefinitionId
  properties: {
    roleName: 'nwcap Service Tag Reader (${subscription().subscriptionId})'
    description: 'Lists Azure service tags (Microsoft.Network/locations/serviceTags/read) and nothing else; nwcap refreshes its copy of them with it.'
    type: 'CustomRole'
    permissions: [
      {
        // The only permission: list the service tags of a location (read-only, no resource data).
        actions: [
          'Microsoft.Network/locations/serviceTags/read'
        ]
        notActions: []
        dataActions: []
        notDataActions: []
      }
    ]
    assignableScopes: [
      subscription().id
    ]
  }
}

resource serviceTagReaderAssignment 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(subscription().id, principalId, roleDefinitionId)
  properties: {
    roleDefinitionId: serviceTagReader.id
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

output roleDefinitionId string = serviceTagReader.id
output roleName string = serviceTagReader.properties.roleName
