{{/*
Names and labels.
*/}}
{{- define "snaphook.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "snaphook.fullname" -}}
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

{{- define "snaphook.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels; argument: dict "root" $ "component" "dispatcher" ("host" for hosts). */}}
{{- define "snaphook.selectorLabels" -}}
app.kubernetes.io/name: {{ include "snaphook.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- with .host }}
snaphook.io/function-host: {{ . }}
{{- end }}
{{- end }}

{{- define "snaphook.labels" -}}
helm.sh/chart: {{ include "snaphook.chart" .root }}
{{ include "snaphook.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: snaphook
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}

{{- define "snaphook.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "snaphook.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "snaphook.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Name of function host $host (argument: dict "root" $ "host" $host). */}}
{{- define "snaphook.hostName" -}}
{{- printf "%s-fn-%s" (include "snaphook.fullname" .root) .host.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The in-cluster URL of function host $host. */}}
{{- define "snaphook.hostUrl" -}}
{{- if .root.Values.knative.enabled }}
{{- printf "http://%s.%s.svc.cluster.local" (include "snaphook.hostName" .) .root.Release.Namespace }}
{{- else }}
{{- printf "http://%s.%s.svc:%v" (include "snaphook.hostName" .) .root.Release.Namespace .root.Values.service.port }}
{{- end }}
{{- end }}

{{/*
The dispatcher's config file (kind: Config), from .Values.config.
*/}}
{{- define "snaphook.configFile" -}}
{{- $config := deepCopy .Values.config }}
{{- if and .Values.functionHost.enabled .Values.functionHost.route }}
{{- /* Each host's functions go to it; what config.remote_functions names itself wins. */}}
{{- $routes := dict }}
{{- range $host := .Values.functionHost.hosts }}
{{- range $entry := $host.functions }}
{{- $_ := set $routes (ternary $entry (printf "%s.*" $entry) (contains "." $entry)) (include "snaphook.hostUrl" (dict "root" $ "host" $host)) }}
{{- end }}
{{- end }}
{{- $_ := set $config "remote_functions" (merge (get $config "remote_functions" | default dict) $routes) }}
{{- end }}
apiVersion: snaphook.io/v1
kind: Config
{{- with $config }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Container security context. Knative accepts only part of it (no pod-level context without
its podspec-securitycontext feature flag), so everything the pod needs is set per container.
*/}}
{{- define "snaphook.containerSecurityContext" -}}
{{- toYaml .Values.securityContext }}
{{- end }}

{{/* HTTP probe handler; argument: dict "path" "/healthz" "port" true|false "https" true|false.
Knative probes name no port: its queue-proxy probes the one serving port. */}}
{{- define "snaphook.httpGet" -}}
httpGet:
  path: {{ .path }}
  {{- if .port }}
  port: http
  {{- end }}
  scheme: {{ ternary "HTTPS" "HTTP" .https }}
{{- end }}
