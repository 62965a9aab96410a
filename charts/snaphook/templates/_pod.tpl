{{/*
The dispatcher's pod, shared by the Deployment and the Knative Service. Argument: dict
"root" $ "knative" true|false. Knative accepts a subset of the PodSpec: one port named
http1, probes without a port, no startupProbe, no pod-level securityContext (without a
feature flag), and automountServiceAccountToken only as false.
*/}}
{{- define "snaphook.dispatcherPodSpec" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $knative := .knative }}
{{- $needsApi := include "snaphook.needsApi" $root | eq "true" }}
{{- $https := not (empty $v.tls.secretName) }}
serviceAccountName: {{ include "snaphook.serviceAccountName" $root }}
{{- if not $knative }}
automountServiceAccountToken: {{ $needsApi }}
{{- else if not $needsApi }}
automountServiceAccountToken: false
{{- end }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if not $knative }}
securityContext:
  {{- toYaml $v.podSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
containers:
  - name: snaphook
    image: {{ include "snaphook.image" $root }}
    imagePullPolicy: {{ $v.image.pullPolicy }}
    args: [serve, --config, /etc/snaphook/config/snaphook.yaml]
    ports:
      - name: {{ ternary "http1" "http" $knative }}
        containerPort: 8080
        protocol: TCP
    env:
      - name: SNAPHOOK_HOST
        value: 0.0.0.0
      - name: SNAPHOOK_STATE_DIR
        value: /var/lib/snaphook
      - name: SNAPHOOK_HOOKS
        value: /etc/snaphook/hooks
      - name: SNAPHOOK_BACKEND
        value: {{ $v.backend }}
      {{- if $knative }}
      - name: TMPDIR
        value: /var/tmp
      {{- end }}
      {{- if eq $v.backend "nats" }}
      - name: SNAPHOOK_NATS_URL
        value: {{ $v.nats.url | quote }}
      - name: SNAPHOOK_NATS_PREFIX
        value: {{ $v.nats.prefix | quote }}
      - name: SNAPHOOK_NATS_REPLICAS
        value: {{ $v.nats.streamReplicas | quote }}
      {{- end }}
      {{- if $v.tls.secretName }}
      - name: SNAPHOOK_TLS_CERT
        value: /etc/snaphook/tls/tls.crt
      - name: SNAPHOOK_TLS_KEY
        value: /etc/snaphook/tls/tls.key
      {{- end }}
      {{- if and $knative $v.knative.replies }}
      - name: SNAPHOOK_SINK_URL
        value: {{ printf "%s/%s/%s" (trimSuffix "/" $v.knative.brokerIngress) $root.Release.Namespace $v.knative.broker | quote }}
      {{- end }}
      {{- range $name, $value := $v.env }}
      - name: {{ $name }}
        value: {{ $value | toString | quote }}
      {{- end }}
      {{- with $v.extraEnv }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- with $v.existingSecret }}
    envFrom:
      - secretRef:
          name: {{ . }}
    {{- end }}
    volumeMounts:
      - name: config
        mountPath: /etc/snaphook/config
        readOnly: true
      - name: blueprints
        mountPath: /etc/snaphook/hooks
        readOnly: true
      - name: state
        mountPath: /var/lib/snaphook
      - name: tmp
        {{- /* Knative reserves /tmp as a mount path; TMPDIR points there instead. */}}
        mountPath: {{ ternary "/var/tmp" "/tmp" $knative }}
      {{- if $v.tls.secretName }}
      - name: tls
        mountPath: /etc/snaphook/tls
        readOnly: true
      {{- end }}
    {{- if not $knative }}
    startupProbe:
      {{- include "snaphook.httpGet" (dict "https" $https "path" "/healthz" "port" true) | nindent 6 }}
      {{- with $v.startupProbe }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- end }}
    livenessProbe:
      {{- include "snaphook.httpGet" (dict "https" $https "path" "/healthz" "port" (not $knative)) | nindent 6 }}
      {{- with $v.livenessProbe }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    readinessProbe:
      {{- include "snaphook.httpGet" (dict "https" $https "path" "/readyz" "port" (not $knative)) | nindent 6 }}
      {{- with $v.readinessProbe }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    resources:
      {{- toYaml $v.resources | nindent 6 }}
    securityContext:
      {{- include "snaphook.containerSecurityContext" $root | nindent 6 }}
volumes:
  - name: config
    configMap:
      name: {{ include "snaphook.fullname" $root }}-config
  - name: blueprints
    configMap:
      name: {{ include "snaphook.fullname" $root }}-blueprints
  - name: state
    {{- if and (not $knative) (eq $v.backend "sqlite") $v.persistence.enabled }}
    persistentVolumeClaim:
      claimName: {{ $v.persistence.existingClaim | default (printf "%s-state" (include "snaphook.fullname" $root)) }}
    {{- else }}
    emptyDir:
      sizeLimit: {{ $v.stateSizeLimit }}
    {{- end }}
  - name: tmp
    emptyDir:
      sizeLimit: {{ $v.tmpSizeLimit }}
  {{- if $v.tls.secretName }}
  - name: tls
    secret:
      secretName: {{ $v.tls.secretName }}
      {{- /* Owned by root: group-readable through fsGroup, or world-readable without one (Knative). */}}
      defaultMode: {{ ternary 0444 0440 $knative }}
  {{- end }}
{{- end }}

{{/* Pod template annotations: a changed config or blueprint rolls the pods. */}}
{{- define "snaphook.checksums" -}}
checksum/config: {{ include "snaphook.configFile" . | trim | sha256sum }}
checksum/blueprints: {{ toYaml .Values.blueprints | sha256sum }}
{{- end }}

{{/*
A function host's pod: `snaphook function serve --functions ...` on port 8080 (Knative's
PORT), the same image and security context as the dispatcher, its own service account.
Argument: dict "root" $ "host" $host "knative" true|false.
*/}}
{{- define "snaphook.hostPodSpec" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $host := .host }}
{{- $knative := .knative }}
{{- $needsApi := include "snaphook.hostNeedsApi" (dict "root" $root "host" $host) | eq "true" }}
serviceAccountName: {{ include "snaphook.hostName" (dict "root" $root "host" $host) }}
{{- if not $knative }}
automountServiceAccountToken: {{ $needsApi }}
{{- else if not $needsApi }}
automountServiceAccountToken: false
{{- end }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if not $knative }}
securityContext:
  {{- toYaml $v.podSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
containers:
  - name: function-host
    image: {{ include "snaphook.image" $root }}
    imagePullPolicy: {{ $v.image.pullPolicy }}
    {{- /* The dispatcher's config file too: S3, AWS and outbound HTTP settings apply alike. */}}
    args: [function, serve, --functions, {{ join "," $host.functions | quote }}, --config, /etc/snaphook/config/snaphook.yaml]
    ports:
      - name: {{ ternary "http1" "http" $knative }}
        containerPort: 8080
        protocol: TCP
    env:
      - name: SNAPHOOK_HOST
        value: 0.0.0.0
      - name: TMPDIR
        value: {{ ternary "/var/tmp" "/tmp" $knative }}
      {{- range $name, $value := $host.env }}
      - name: {{ $name }}
        value: {{ $value | toString | quote }}
      {{- end }}
    {{- with $host.existingSecret }}
    envFrom:
      - secretRef:
          name: {{ . }}
    {{- end }}
    volumeMounts:
      - name: config
        mountPath: /etc/snaphook/config
        readOnly: true
      - name: tmp
        mountPath: {{ ternary "/var/tmp" "/tmp" $knative }}
    livenessProbe:
      {{- include "snaphook.httpGet" (dict "https" false "path" "/healthz" "port" (not $knative)) | nindent 6 }}
      {{- with $v.livenessProbe }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    readinessProbe:
      {{- include "snaphook.httpGet" (dict "https" false "path" "/readyz" "port" (not $knative)) | nindent 6 }}
      {{- with $v.readinessProbe }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    resources:
      {{- toYaml ($host.resources | default $v.resources) | nindent 6 }}
    securityContext:
      {{- include "snaphook.containerSecurityContext" $root | nindent 6 }}
volumes:
  - name: config
    configMap:
      name: {{ include "snaphook.fullname" $root }}-config
  - name: tmp
    emptyDir:
      sizeLimit: {{ $v.tmpSizeLimit }}
{{- end }}
