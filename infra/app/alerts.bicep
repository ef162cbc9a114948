// Azure Monitor alerts on the app's structured log records in Application Insights (traces
// whose message is "nwcap.<event> {json}"). One rule fires on events (a high-severity nwcap
// alert); three watch states (captures failed or stuck, a silent reconciler, the Python
// fallback of the record walk), fire once when the state begins and resolve themselves when it
// ends. With an e-mail address, an action group mails each firing (and each resolution);
// without one the rules still fire and show in the portal's Alerts blade, and any action group
// can be attached later. tests/test_kql.py runs each query over the records the app writes.
param applicationInsightsName string
param location string = resourceGroup().location
param tags object = {}

@description('Name prefix of the rules and the action group.')
param namePrefix string

@description('E-mail address notified when a rule fires; empty creates no action group.')
param alertEmailAddress string = ''

@description('How often the event rule runs; its query looks back exactly this long, so that each record is counted by one evaluation (Azure Monitor retries an evaluation while ingestion lags).')
param eventEvaluationFrequency string = 'PT5M'

@description('How often the reconcile rules run; about one reconcile period (RECONCILE_SCHEDULE).')
param reconcileEvaluationFrequency string = 'PT10M'

@description('Time span the reconcile rules look back over: at least three reconcile periods, so that one slow or late run does not page anyone, and transient failures page only when every run of the span still had them.')
param reconcileWindowSize string = 'PT30M'

@description('How often the record-walk rule runs.')
param walkEvaluationFrequency string = 'PT15M'

@description('Time span the record-walk rule looks back over for a capture processed by the Python fallback.')
param walkWindowSize string = 'PT1H'

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

// The state of the captures as the last reconcile runs found it (their status_* counts cover
// every capture blob of the lookback window): captures failed for good, runs that died
// (stuck), a poison queue the app could not read, or transient failures that every run of the
// window still counted. A transient failure the next run clears (a storage blip, a 403 while
// roles propagate) pages nobody; one that lasts the window does.
var capturesFailedOrStuckQuery = '''
traces
| where message startswith "nwcap.reconcile {"
| extend d = parse_json(substring(message, strlen("nwcap.reconcile ")))
| summarize runs = count(),
    failed = countif(toint(d.status_failed) > 0),
    stuck = countif(toint(d.stuck) > 0),
    poison_unreadable = countif(isnotempty(tostring(d.poison_error))),
    transient = countif(toint(d.status_failed_transient) > 0)
| where failed > 0 or stuck > 0 or poison_unreadable > 0 or (runs >= 2 and transient == runs)
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

// Each capture record says which record walk ran: "compiled" (analyzer/capture/_walk.c, built by
// the remote build) or "python", possibly followed by why (the fallback, several times slower,
// same results: the build found no compiler, or NWCAP_PURE_PYTHON is set).
var pythonWalkQuery = '''
traces
| where message startswith "nwcap.capture {"
| extend d = parse_json(substring(message, strlen("nwcap.capture ")))
| where tostring(d.record_walk) startswith "python"
| project timestamp, capture_id = tostring(d.capture_id), blob = tostring(d.blob)
'''

// autoMitigate false: stateless, each evaluation that finds records fires, so the query must
// look back exactly one evaluation period or a record would fire once per overlapping window.
// autoMitigate true: stateful, fires once when the condition starts to hold and is resolved by
// Azure Monitor once it has not held for three evaluation periods (frequencies of 5 to 15
// minutes) or two (over 15 minutes).
var rules = [
  {
    name: '${namePrefix}-high-severity-alert'
    displayName: 'nwcap: high-severity alert in a packet capture'
    description: 'A capture produced at least one high-severity alert (e.g. traffic to a storage account outside the policy). One notification per evaluation period that has any; the alerts table and the nwcap-alerts queue hold the details.'
    severity: 1
    query: highSeverityQuery
    evaluationFrequency: eventEvaluationFrequency
    windowSize: eventEvaluationFrequency
    autoMitigate: false
  }
  {
    name: '${namePrefix}-capture-failed-or-stuck'
    displayName: 'nwcap: captures failed or stuck'
    description: 'The last reconcile runs found captures failed for good, runs that died in processing (stuck), a poison queue they could not read, or transient failures that lasted the whole window. Fires once; resolved by itself once the runs find none (a capture failed for good counts until it leaves RECONCILE_LOOKBACK or is processed again). Run nwcap status for the captures and their failure detail, then nwcap reconcile.'
    severity: 2
    query: capturesFailedOrStuckQuery
    evaluationFrequency: reconcileEvaluationFrequency
    windowSize: reconcileWindowSize
    autoMitigate: true
  }
  {
    name: '${namePrefix}-reconciler-silent'
    displayName: 'nwcap: the reconciler stopped running'
    description: 'No reconcile run logged nwcap.reconcile in the window: captures whose event was lost, failed or stuck are no longer recovered. Check that the function app is running and read the errors of reconcile_captures in Application Insights; run nwcap reconcile from your machine meanwhile. Resolved by itself once runs are logged again.'
    severity: 1
    query: reconcilerSilentQuery
    evaluationFrequency: reconcileEvaluationFrequency
    windowSize: reconcileWindowSize
    autoMitigate: true
  }
  {
    name: '${namePrefix}-python-record-walk'
    displayName: 'nwcap: captures processed without the compiled record walk'
    description: 'Captures were processed by the Python fallback of the record walk: the remote build did not compile native/ (no C compiler in the build image) or NWCAP_PURE_PYTHON is set. Results are the same, several times slower. See "The compiled record walk" in docs/deploy.md. Resolved by itself once captures run the compiled walk again.'
    severity: 3
    query: pythonWalkQuery
    evaluationFrequency: walkEvaluationFrequency
    windowSize: walkWindowSize
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
    autoMitigate: rule.autoMitigate
    actions: {
      actionGroups: actionGroups
    }
  }
}]

output ruleNames array = [for (rule, i) in rules: queryRules[i].name]
output actionGroupName string = empty(alertEmailAddress) ? '' : actionGroup.name
