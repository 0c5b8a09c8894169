{{/* Names, labels and the pieces the Deployment and the migration Job share. */}}

{{- define "jit-broker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "jit-broker.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "jit-broker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "jit-broker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "jit-broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "jit-broker.labels" -}}
helm.sh/chart: {{ include "jit-broker.chart" . }}
{{ include "jit-broker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "jit-broker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "jit-broker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "jit-broker.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "jit-broker.policyConfigMap" -}}
{{- default (printf "%s-policy" (include "jit-broker.fullname" .)) .Values.policy.existingConfigMap }}
{{- end }}

{{- define "jit-broker.issuer" -}}
{{- default (printf "http://%s.%s.svc.cluster.local:%v" (include "jit-broker.fullname" .) .Release.Namespace .Values.service.port) .Values.broker.issuer }}
{{- end }}

{{/* An env entry read from a Secret: (dict "env" NAME "item" .Values.secrets.x "root" .) */}}
{{- define "jit-broker.secretEnv" -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ default .root.Values.secrets.existingSecret .item.name | quote }}
      key: {{ .item.key | quote }}
      {{- if .item.optional }}
      optional: true
      {{- end }}
{{- end }}

{{- define "jit-broker.databaseEnv" -}}
{{ include "jit-broker.secretEnv" (dict "env" "BROKER_DATABASE_URL" "item" .Values.secrets.databaseUrl "root" .) }}
{{- end }}

{{/* The broker pods alone: the migration Job and test pods carry another component. */}}
{{- define "jit-broker.serverSelectorLabels" -}}
{{ include "jit-broker.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}
