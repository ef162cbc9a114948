// The Flex Consumption (FC1) plan and the Linux Python function app hosting process_capture.
// Every connection is identity-based: the host's own storage (AzureWebJobsStorage__*), the
// deployment package container, Application Insights (Entra auth) and the app's connections
// passed in appSettings.
param name string
param planName string
param location string = resourceGroup().location
param tags object = {}

@description('Resource id of the user-assigned identity the app runs as.')
param identityId string

@description('Client id of that identity, selected by every __clientId setting.')
param identityClientId string

@description('The Functions host storage account (AzureWebJobsStorage and the deployment package).')
param hostStorageAccountName string

@description('Blob container holding the deployment package.')
param deploymentContainerName string

param applicationInsightsName string

@description('App settings added to the host ones.')
param appSettings object = {}

@description('Subnet (delegated to Microsoft.App/environments) for VNet integration; empty for none.')
param virtualNetworkSubnetId string = ''

@description('Python versions Flex Consumption runs and nwcap supports.')
@allowed([
  '3.10'
  '3.11'
  '3.12'
])
param pythonVersion string = '3.11'

@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Most instances each per-function scale group scales out to; Flex Consumption accepts 1 to 1000.')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 25

@description('Application (client) id of the Microsoft Entra app registration people sign in with (App Service Authentication in front of every route but the blob webhook); empty for none, function keys only.')
param authClientId string = ''

@description('Tenant of that app registration.')
param authTenantId string = tenant().tenantId

@description('Addresses (CIDR) allowed to reach the app besides Event Grid (the AzureEventGrid service tag); empty for no inbound restriction.')
param inboundAllowedRanges array = []

resource hostStorage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: hostStorageAccountName
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  // checkov:skip=CKV_AZURE_225: zone redundancy is offered in few regions and fails the deployment elsewhere; during a zone outage Event Grid keeps retrying delivery for 24 hours
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
  }
}

var hostSettings = [
  {
    name: 'AzureWebJobsStorage__blobServiceUri'
    value: hostStorage.properties.primaryEndpoints.blob
  }
  {
    name: 'AzureWebJobsStorage__queueServiceUri'
    value: hostStorage.properties.primaryEndpoints.queue
  }
  {
    name: 'AzureWebJobsStorage__tableServiceUri'
    value: hostStorage.properties.primaryEndpoints.table
  }
  {
    name: 'AzureWebJobsStorage__credential'
    value: 'managedidentity'
  }
  {
    name: 'AzureWebJobsStorage__clientId'
    value: identityClientId
  }
  {
    name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
    value: applicationInsights.properties.ConnectionString
  }
  {
    name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING'
    value: 'ClientId=${identityClientId};Authorization=AAD'
  }
  {
    // Lets DefaultAzureCredential in the app code pick the user-assigned identity.
    name: 'AZURE_CLIENT_ID'
    value: identityClientId
  }
]
// Inbound access restrictions, when ranges are given: Event Grid (its service tag, for the blob
// webhook and its validation handshake) and the ranges; everything else is refused (403) before
// it reaches the host. The scm site (deployments) keeps its own, unrestricted rules.
var restrictInbound = !empty(inboundAllowedRanges)
var eventGridRule = [
  {
    name: 'AzureEventGrid'
    description: 'Event Grid delivering BlobCreated events to the blobs_extension webhook'
    action: 'Allow'
    tag: 'ServiceTag'
    ipAddress: 'AzureEventGrid'
    priority: 100
  }
]
var allowedRangeRules = [for (cidr, i) in inboundAllowedRanges: {
  name: 'allowed-${i + 1}'
  description: 'INBOUND_ALLOWED_RANGES'
  action: 'Allow'
  tag: 'Default'
  ipAddress: cidr
  priority: 200 + i
}]

// appSettings is a parameter, hence known when this deployment starts, as a loop requires.
var passedSettings = [for setting in items(appSettings): {
  name: setting.key
  value: setting.value
}]

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  // checkov:skip=CKV_AZURE_222: Event Grid delivers BlobCreated events to the blobs_extension webhook over the public endpoint; every route requires a key, people sign in with Entra ID (authClientId) and inboundAllowedRanges restricts the rest
  // checkov:skip=CKV_AZURE_17: client certificates would make Event Grid's webhook delivery fail (it presents none)
  // checkov:skip=CKV_AZURE_212: Flex Consumption scales from zero per event; a minimum instance count would bill an idle capture pipeline around the clock
  // checkov:skip=CKV_AZURE_213: every route requires a function key, so there is no anonymous path to probe, and Flex Consumption replaces instances per event rather than keeping a pool
  name: name
  location: location
  tags: union(tags, {
    'azd-service-name': 'processor'
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    clientCertEnabled: false
    virtualNetworkSubnetId: empty(virtualNetworkSubnetId) ? null : virtualNetworkSubnetId
    siteConfig: {
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
      remoteDebuggingEnabled: false
      ipSecurityRestrictions: restrictInbound ? concat(eventGridRule, allowedRangeRules) : []
      ipSecurityRestrictionsDefaultAction: restrictInbound ? 'Deny' : 'Allow'
      scmIpSecurityRestrictionsUseMain: false
      appSettings: concat(passedSettings, hostSettings)
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${hostStorage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      scaleAndConcurrency: {
        instanceMemoryMB: instanceMemoryMB
        maximumInstanceCount: maximumInstanceCount
      }
      runtime: {
        name: 'python'
        version: pythonVersion
      }
    }
  }
}

// App Service Authentication (Easy Auth) with Microsoft Entra ID: every request but the blob
// webhook's needs a signed-in user (browsers are sent to the sign-in page) or an Entra access
// token for the app (automation), before the function's own key check. The webhook is excluded:
// Event Grid presents no Entra token, only the blobs_extension key in its URL. Without a client
// secret the sign-in uses the implicit flow (an ID token; enable ID tokens on the registration),
// so no secret is stored anywhere. Who may sign in is decided in Entra ID: "Assignment required"
// on the app's enterprise application, and an app role assigned to a group (docs/deploy.md).
resource authSettings 'Microsoft.Web/sites/config@2024-04-01' = if (!empty(authClientId)) {
  // checkov:skip=CKV_AZURE_13: checkov reads the V1 authsettings property enabled; this is authsettingsV2, enabled by platform.enabled = true below
  // checkov:skip=CKV_AZURE_63: checkov applies the site configuration checks to every Microsoft.Web/sites/config; this one is authsettingsV2, which has no such setting (the function app resource carries it)
  // checkov:skip=CKV_AZURE_65: checkov applies the site configuration checks to every Microsoft.Web/sites/config; this one is authsettingsV2, which has no such setting (the function app resource carries it)
  // checkov:skip=CKV_AZURE_66: checkov applies the site configuration checks to every Microsoft.Web/sites/config; this one is authsettingsV2, which has no such setting (the function app resource carries it)
  // checkov:skip=CKV_AZURE_80: checkov applies the site configuration checks to every Microsoft.Web/sites/config; this one is authsettingsV2, which has no such setting (the function app resource carries it)
  // checkov:skip=CKV_AZURE_88: checkov applies the site configuration checks to every Microsoft.Web/sites/config; this one is authsettingsV2, which has no such setting (the function app resource carries it)
  // checkov:skip=CKV_AZURE_222: checkov applies the site configuration checks to every Microsoft.Web/sites/config; this one is authsettingsV2, which has no such setting (the function app resource carries it)
  parent: functionApp
  name: 'authsettingsV2'
  properties: {
    platform: {
      enabled: true
    }
    globalValidation: {
      requireAuthentication: true
      unauthenticatedClientAction: 'RedirectToLoginPage'
      redirectToProvider: 'azureactivedirectory'
      excludedPaths: [
        '/runtime/webhooks/blobs'
      ]
    }
    httpSettings: {
      requireHttps: true
    }
    identityProviders: {
      azureActiveDirectory: {
        enabled: true
        registration: {
          clientId: authClientId
          openIdIssuer: '${environment().authentication.loginEndpoint}${authTenantId}/v2.0'
        }
        validation: {
          allowedAudiences: [
            'api://${authClientId}'
          ]
        }
      }
    }
    login: {
      // Flex Consumption has no shared file system for a token store, and the app needs no
      // tokens: the session cookie carries the signed-in user.
      tokenStore: {
        enabled: false
      }
    }
  }
}

output name string = functionApp.name
output defaultHostName string = functionApp.properties.defaultHostName
