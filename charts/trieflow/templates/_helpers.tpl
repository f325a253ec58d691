{{/* Names and labels shared by the chart's templates. */}}

{{- define "trieflow.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "trieflow.operatorName" -}}
{{- printf "%s-operator" (include "trieflow.fullname" .) -}}
{{- end -}}

{{- define "trieflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "trieflow.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "trieflow.selectorLabels" -}}
app.kubernetes.io/name: trieflow-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "trieflow.labels" -}}
{{ include "trieflow.selectorLabels" . }}
app.kubernetes.io/part-of: trieflow
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "trieflow.image" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) -}}
{{- end -}}

{{/* The operator's permissions on namespaced objects (ClusterRole or per-namespace Role). */}}
{{- define "trieflow.namespacedRules" -}}
- apiGroups: ["trieflow.dev"]
  resources: ["rljobs"]
  verbs: ["get", "list", "watch", "delete"]
- apiGroups: ["trieflow.dev"]
  resources: ["rljobs/status"]
  verbs: ["get", "patch"]
- apiGroups: ["trieflow.dev"]
  resources: ["rljobs/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps", "serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["scheduling.volcano.sh", "scheduling.x-k8s.io"]
  resources: ["podgroups"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}
