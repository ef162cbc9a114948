// Azure Monitor alerts on the app's structured log records in Application Insights (traces
// whose message is "nwcap.<event> {json}"): a high-severity nwcap alert, a capture that failed or
// is stuck, and a reconciler that stopped running. With an e-mail address, an action group mails each firing; without one the rules still
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

@description('How often the reconciler-silence rule runs; about one reconcile period (RECONCILE_SCHEDULE).')
param reconcileSilenceEvaluationFrequency string = 'PT10M'

@description('Time span without any reconcile run after which the reconciler-silence rule fires: at least three reconcile periods, so one slow or late run does not page anyone.')
param reconcileSilenceWindowSize string = 'PT30M'

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

// A capture recorded failed for good logs "nwcap.capture" with status failed. A transient failure
// (storage outage, a 403 while roles propagate) logs no capture record: it raises, and the
// reconciler retries it; a reconcile run that could not bring a capture to an end counts it in
// `failed`, and one that found runs dead in `processing` counts them in `stuck`.
var capturesFailedOrStuckQuery = '''
traces
| where message startswith "nwcap.capture {" or message startswith "nwcap.reconcile {"
| extend event = tostring(split(message, " ")[0]), d = parse_json(substring(message, indexof(message, "{")))
| where (event == "nwcap.capture" and tostring(d.status) == "failed")
    or (event == "nwcap.reconcile" and (toint(d.stuck) > 0 or toint(d.failed) > 0))
| project timestamp, event, status = tostring(d.status), stuck = toint(d.stuck), failed = toint(d.failed), vm = tostring(d.vm), capture_id = tostring(d.capture_id), message
'''

// A row only when no reconcile run logged anything in the window. `summarize count()` without
// `by` returns one row even over no input, so the rule counts rows (GreaterThan 0) of a query
// that yields a row exactly when n == 0: a query that returned no rows at all would never fire.
// A run that raises logs no "nwcap.reconcile {" trace, so a reconciler that fails every time
// fires this rule as well as one that never starts.
var reconcilerSilentQuery = '''
traces
| where message startswith "nwcap.reconcile {"
| summarize n = count()
| where n == 0
'''

var rules = [
  {
    name: '${namePrefix}-high-severity-alert'
    displayName: 'nwcap: high-severity alert in a packet capture'
    description: 'A capture produced at least one high-severity alert (e.g. traffic to a storage account outside the policy). The alerts table and the nwcap-alerts queue hold the details.'
    severity: 1
    query: highSeverityQuery
    evaluationFrequency: evaluationFrequency
    windowSize: windowSize
    autoMitigate: false
  }
  {
    name: '${namePrefix}-capture-failed-or-stuck'
    displayName: 'nwcap: capture failed or stuck'
    description: 'A capture was recorded failed, or a reconcile run could not process a capture (failed, including transient errors it will retry) or found runs that died in processing (stuck). Run nwcap status, then nwcap reconcile, and read the failure detail in the captures table.'
    severity: 2
    query: capturesFailedOrStuckQuery
    evaluationFrequency: evaluationFrequency
    windowSize: windowSize
    autoMitigate: false
  }
  {
    name: '${namePrefix}-reconciler-silent'
    displayName: 'nwcap: the reconciler stopped running'
    description: 'No reconcile run logged nwcap.reconcile in the window: captures whose event was lost, failed or stuck are no longer recovered. Check that the function app is running and read the errors of reconcile_captures in Application Insights; run nwcap reconcile from your machine meanwhile.'
    severity: 1
    query: reconcilerSilentQuery
    evaluationFrequency: reconcileSilenceEvaluationFrequency
    windowSize: reconcileSilenceWindowSize
    // A condition, not an event: resolved by itself once runs are logged again.
    autoMitigate: true
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
    evaluationFrequency: rule.evaluationFrequency
    windowSize: rule.windowSize
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
    // An alert or a failed capture is a new event to look at each time: nothing resolves it.
    autoMitigate: rule.autoMitigate
    actions: {
      actionGroups: actionGroups
    }
  }
}]

output ruleNames array = [for (rule, i) in rules: queryRules[i].name]
output actionGroupName string = empty(alertEmailAddress) ? '' : actionGroup.name
