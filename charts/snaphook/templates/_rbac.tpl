{{/*
RBAC. Every rule comes from files/rbac.yaml, generated from `snaphook rbac` (the functions'
declared needs and the dispatcher's own): the mapping from a function or a feature to its
permissions lives there and nowhere else. The helpers below only select from it, the way
`snaphook rbac` selects for the same config.
*/}}
{{- define "snaphook.rbacCatalog" -}}
{{- .Files.Get "files/rbac.yaml" }}
{{- end }}

{{/* A list setting of the config file, given as a list or as "a,b". */}}
{{- define "snaphook.listSetting" -}}
{{- $value := .value }}
{{- if kindIs "string" $value }}
{{- $value = splitList "," $value | compact }}
{{- end }}
{{- toJson (dict "items" ($value | default list)) }}
{{- end }}

{{/* Functions the blueprints call (steps and lease releases), as JSON {names: [...]}. */}}
{{- define "snaphook.blueprintFunctions" -}}
{{- $names := list }}
{{- range $key, $blueprint := .Values.blueprints }}
{{- $doc := $blueprint }}
{{- if kindIs "string" $blueprint }}
{{- $doc = fromYaml $blueprint }}
{{- end }}
{{- range $action, $steps := (($doc.spec | default dict).actions | default dict) }}
{{- range $step := $steps }}
{{- with $step.function }}
{{- $names = append $names . }}
{{- end }}
{{- $release := ($step.lease | default dict).release }}
{{- if kindIs "string" $release }}
{{- $names = append $names $release }}
{{- else if kindIs "map" $release }}
{{- $names = append $names ($release.function | default "") }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson (dict "names" ($names | compact | uniq | sortAlpha)) }}
{{- end }}

{{/* Whether function $fn is named by $entries (names or families), as "true" or "". */}}
{{- define "snaphook.matchesFunction" -}}
{{- range $entry := .entries }}
{{- if or (eq $entry $.fn) (hasPrefix (printf "%s." $entry) $.fn) }}true{{ end }}
{{- end }}
{{- end }}

{{/*
Functions the dispatcher runs itself, as JSON {names: [...]}: rbac.functions, plus (with
rbac.fromBlueprints) those its blueprints call, minus those function hosts serve for it.
*/}}
{{- define "snaphook.dispatcherFunctions" -}}
{{- $names := .Values.rbac.functions }}
{{- if .Values.rbac.fromBlueprints }}
{{- $names = concat $names (fromJson (include "snaphook.blueprintFunctions" .)).names }}
{{- end }}
{{- $hosted := list }}
{{- if and .Values.functionHost.enabled .Values.functionHost.route }}
{{- range .Values.functionHost.hosts }}
{{- $hosted = concat $hosted .functions }}
{{- end }}
{{- end }}
{{- $own := list }}
{{- range $fn := $names | uniq }}
{{- if not (include "snaphook.matchesFunction" (dict "fn" $fn "entries" $hosted)) }}
{{- $own = append $own $fn }}
{{- end }}
{{- end }}
{{- toJson (dict "names" ($own | sortAlpha)) }}
{{- end }}

{{/*
Rules of some functions, as YAML {rules: [...]}. Argument: dict "root" $ "functions" list
"what" "rbac.functions". A name is a function (kube.exec) or a family (kube); unknown names
fail the render.
*/}}
{{- define "snaphook.functionRules" -}}
{{- $catalog := fromYaml (include "snaphook.rbacCatalog" .root) }}
{{- $known := $catalog.functions | default dict }}
{{- $rules := list }}
{{- range $fn := .functions }}
{{- if hasKey $known $fn }}
{{- $rules = concat $rules (get $known $fn | default list) }}
{{- else }}
{{- $found := false }}
{{- range $name, $fnRules := $known }}
{{- if hasPrefix (printf "%s." $fn) $name }}
{{- $found = true }}
{{- $rules = concat $rules ($fnRules | default list) }}
{{- end }}
{{- end }}
{{- if not $found }}
{{- fail (printf "%s: unknown function or family %q (known: %s)" $.what $fn (keys $known | sortAlpha | join ", ")) }}
{{- end }}
{{- end }}
{{- end }}
{{- toYaml (dict "rules" (uniq $rules)) }}
{{- end }}

{{/*
The dispatcher's own rules, as YAML {cluster: [...], secrets: {namespace: rule}}: TokenReview
(rbac.tokenReview, since auth lives in the Secret), annotation bindings (config kube_bindings,
kube_watch, kube_binding_kinds) and Kubernetes Secrets (config kube_secrets,
kube_secret_allow). Secrets named without a namespace are read in every namespace.
*/}}
{{- define "snaphook.dispatcherRules" -}}
{{- $catalog := fromYaml (include "snaphook.rbacCatalog" .) }}
{{- $own := $catalog.dispatcher }}
{{- $config := .Values.config }}
{{- $cluster := list }}
{{- $secrets := dict }}
{{- if .Values.rbac.tokenReview }}
{{- $cluster = concat $cluster $own.tokenReview }}
{{- end }}
{{- if eq (toString (get $config "kube_bindings")) "true" }}
{{- $watch := $catalog.defaults.kube_watch }}
{{- if hasKey $config "kube_watch" }}
{{- $watch = eq (toString $config.kube_watch) "true" }}
{{- end }}
{{- $byKind := get $own.kubeBindings (ternary "watch" "get" $watch) }}
{{- $kinds := $catalog.defaults.kube_binding_kinds }}
{{- if hasKey $config "kube_binding_kinds" }}
{{- $kinds = (fromJson (include "snaphook.listSetting" (dict "value" $config.kube_binding_kinds))).items }}
{{- end }}
{{- range $kind := $kinds }}
{{- $key := lower (trim $kind) }}
{{- if not (hasKey $byKind $key) }}
{{- fail (printf "config.kube_binding_kinds: unknown kind %q (known: %s)" $kind (keys $byKind | sortAlpha | join ", ")) }}
{{- end }}
{{- $cluster = concat $cluster (get $byKind $key) }}
{{- end }}
{{- end }}
{{- if eq (toString (get $config "kube_secrets")) "true" }}
{{- /* scope ("*" = every namespace) -> names, or "*" for every Secret of the scope */}}
{{- $scopes := dict }}
{{- range $pattern := (fromJson (include "snaphook.listSetting" (dict "value" (get $config "kube_secret_allow")))).items }}
{{- $parts := splitList "/" (trim $pattern) }}
{{- $name := last $parts }}
{{- $scope := ternary (first $parts) "*" (eq (len $parts) 2) }}
{{- if regexMatch "[*?\\[]" $scope }}
{{- $scope = "*" }}
{{- end }}
{{- if regexMatch "[*?\\[]" $name }}
{{- $_ := set $scopes $scope "*" }}
{{- else if not (kindIs "string" (get $scopes $scope | default list)) }}
{{- $_ := set $scopes $scope (append (get $scopes $scope | default list) $name) }}
{{- end }}
{{- end }}
{{- range $scope, $names := $scopes }}
{{- $rule := deepCopy $own.secret }}
{{- if not (kindIs "string" $names) }}
{{- $_ := set $rule "resourceNames" ($names | uniq | sortAlpha) }}
{{- end }}
{{- if eq $scope "*" }}
{{- $cluster = append $cluster $rule }}
{{- else }}
{{- $_ := set $secrets $scope $rule }}
{{- end }}
{{- end }}
{{- end }}
{{- toYaml (dict "cluster" (uniq $cluster) "secrets" $secrets) }}
{{- end }}

{{/*
A ClusterRole holding namespaced rules and its bindings: a RoleBinding in each of
rbac.namespaces, or one ClusterRoleBinding when that list is empty. Argument: dict "root" $
"name" "..." "rules" list "serviceAccount" "..." "labels" "...".
*/}}
{{- define "snaphook.scopedRole" -}}
{{- $root := .root }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: {{ .name }}
  labels:
    {{- .labels | nindent 4 }}
rules:
  {{- toYaml .rules | nindent 2 }}
{{- if $root.Values.rbac.namespaces }}
{{- range $ns := $root.Values.rbac.namespaces }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {{ $.name }}
  namespace: {{ $ns }}
  labels:
    {{- $.labels | nindent 4 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: {{ $.name }}
subjects:
  - kind: ServiceAccount
    name: {{ $.serviceAccount }}
    namespace: {{ $root.Release.Namespace }}
{{- end }}
{{- else }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: {{ .name }}
  labels:
    {{- .labels | nindent 4 }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: {{ .name }}
subjects:
  - kind: ServiceAccount
    name: {{ .serviceAccount }}
    namespace: {{ $root.Release.Namespace }}
{{- end }}
{{- end }}

{{/* "true" when the dispatcher calls the Kubernetes API, else "" (its pods get no token). */}}
{{- define "snaphook.needsApi" -}}
{{- $functions := (fromJson (include "snaphook.dispatcherFunctions" .)).names }}
{{- $rules := (fromYaml (include "snaphook.functionRules" (dict "root" . "functions" $functions "what" "rbac.functions"))).rules }}
{{- $own := fromYaml (include "snaphook.dispatcherRules" .) }}
{{- if or $rules $own.cluster $own.secrets }}true{{ end }}
{{- end }}

{{/* The same for function host $host (argument: dict "root" $ "host" $host). */}}
{{- define "snaphook.hostNeedsApi" -}}
{{- $rules := (fromYaml (include "snaphook.functionRules" (dict "root" .root "functions" .host.functions "what" (printf "functionHost.hosts[%s].functions" .host.name)))).rules }}
{{- if $rules }}true{{ end }}
{{- end }}
