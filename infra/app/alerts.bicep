// Azure Monitor alerts on the app's structured log records in Application Insights (traces
// whose message is "nwcap.<event> {json}"): a high-severity nwcap alert, and a capture that failed or
// is stuck. With an e-mail address, an action group mails each firing; without one the rules still
// fire and show in the portal's Alerts blade, and any action group can be attached later.
param applicationInsightsName string
param location string = resourceGroup().location
param tags object = {}

@description('Name prefix of the rules and the action group.')
param namePrefix string

@description('E-mail address notified when a rule fires; empty creates no action group.')
param alertEmailAddress string = ''

@description('How often each rule runs its query (ISO 8601 duration).')
param evaluationFrequency string = 'PT5M'

@description('Time span each query looks back over; longer than evaluationFrequency so late-ingested records still count.')
param windowSize string = 'PT15M'

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (!empty(alertEmailAddress)) {
  name: '${namePrefix}-operators'
  location: 'Global'
  tags: tags
  properties: {
    groupShortName: 'nwcap'
    enabled: true
    emailReceivers: [
      {
        name: 'operator'
        emailAddress: alertEmailAddress
        useCommonAlertSchema: true
      }
    ]
  }
}

var actionGroups = empty(alertEmailAddress) ? [] : [
  actionGroup.id
]

// The app writes one trace per stored alert ("nwcap.alert {json}"), per capture outcome
// ("nwcap.capture {json}") and per reconcile run ("nwcap.reconcile {json}"). The Python worker
// forwards log records without their `extra` fields (azure-functions-python-worker#1327), so the
// queries read the JSON after the event name instead of customDimensions.
var highSeverityQuery = '''
traces
| where message startswith "nwcap.alert {"
| extend d = parse_json(substring(message, strlen("nwcap.alert ")))
| where tostring(d.severity) == "high"
| project timestamp, rule = tostring(d.rule), peer = tostring(d.peer), vm = tostring(d.vm), capture_id = tostring(d.capture_id), message
'''

var capturesFailedOrStuckQuery = '''
traces
| where message startswith "nwcap.capture {" or message startswith "nwcap.reconcile {"
| extend event = tostring(split(message, " ")[0]), d = parse_json(substring(message, indexof(message, "{")))
| where (event == "nwcap.capture" and tostring(d.status) == "failed")
    or (event == "nwcap.reconcile" and toint(d.stuck) > 0)
| project timestamp, event, status = tostring(d.status), stuck = toint(d.stuck), vm = tostring(d.vm), capture_id = tostring(d.capture_id), message
'''

var rules = [
  {
    name: '${namePrefix}-high-severity-alert'
    displayName: 'nwcap: high-severity alert in a packet capture'
    description: 'A capture produced at least one high-severity alert (e.g. traffic to a storage account outside the policy). The alerts table and the nwcap-alerts queue hold the details.'
    severity: 1
    query: highSeverityQuery
  }
  {
    name: '${namePrefix}-capture-failed-or-stuck'
    displayName: 'nwcap: capture failed or stuck'
    description: 'A capture was recorded failed, or a reconcile run found captures left unfinished. Run nwcap status, then nwcap reconcile, and read the failure detail in the captures table.'
    severity: 2
    query: capturesFailedOrStuckQuery
  }
]

resource queryRules 'Microsoft.Insights/scheduledQueryRules@2022-06-15' = [for rule in rules: {
  name: rule.name
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: rule.displayName
    description: rule.description
    severity: rule.severity
    enabled: true
    scopes: [
      applicationInsights.id
    ]
    evaluationFrequency: evaluationFrequency
    windowSize: windowSize
    criteria: {
      allOf: [
        {
          query: rule.query
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    // Each firing is a new event to look at; nothing resolves it by itself.
    autoMitigate: false
    actions: {
      actionGroups: actionGroups
    }
  }
}]

output ruleNames array = [for (rule, i) in rules: queryRules[i].name]
output actionGroupName string = empty(alertEmailAddress) ? '' : actionGroup.name
