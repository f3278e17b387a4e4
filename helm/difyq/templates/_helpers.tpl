{{/*
Names, labels and the pieces every difyq pod shares (env, volumes, security contexts, checksums).
*/}}

{{- define "difyq.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "difyq.fullname" -}}
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

{{- define "difyq.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels; call with (dict "root" $ "component" "api"), component optional. */}}
{{- define "difyq.selectorLabels" -}}
app.kubernetes.io/name: {{ include "difyq.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{/* All labels; call with (dict "root" $ "component" "api"), component optional. */}}
{{- define "difyq.labels" -}}
helm.sh/chart: {{ include "difyq.chart" .root }}
{{ include "difyq.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: difyq
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "difyq.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "difyq.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "difyq.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret the chart creates for env vars: secrets.env and, for redis.url, REDIS_URL and REDIS_PASSWORD. */}}
{{- define "difyq.envSecretName" -}}
{{- printf "%s-env" (include "difyq.fullname" .) }}
{{- end }}

{{- define "difyq.envSecretCreated" -}}
{{- if or (and .Values.secrets.env (not .Values.secrets.existingSecret)) .Values.redis.url }}true{{ end }}
{{- end }}

{{- define "difyq.redisName" -}}
{{- printf "%s-redis" (include "difyq.fullname" .) }}
{{- end }}

{{- define "difyq.redisPasswordSecretName" -}}
{{- default (include "difyq.redisName" .) .Values.redis.bundled.auth.existingSecret }}
{{- end }}

{{/* The password part of redis.url ("" when the URL has none). */}}
{{- define "difyq.redisUrlPassword" -}}
{{- $userinfo := (urlParse .Values.redis.url).userinfo }}
{{- if contains ":" $userinfo }}{{ regexReplaceAll "^[^:]*:" $userinfo "" }}{{ end }}
{{- end }}

{{/* The Prometheus job label of a component's targets: contains "difyq" and the component, as the alert rules
and the dashboard expect. Call with (dict "root" $ "component" "worker"). */}}
{{- define "difyq.scrapeJob" -}}
{{- $name := printf "%s-%s" (include "difyq.fullname" .root) .component }}
{{- if not (contains "difyq" $name) }}{{ $name = printf "difyq-%s" $name }}{{ end }}
{{- $name }}
{{- end }}

{{/* Whether the REDIS_PASSWORD env var exists in the difyq containers (KEDA reads it from there). */}}
{{- define "difyq.redisPasswordInEnv" -}}
{{- if .Values.redis.bundled.enabled }}
{{- if .Values.redis.bundled.auth.enabled }}true{{ end }}
{{- else if .Values.redis.url }}
{{- if include "difyq.redisUrlPassword" . }}true{{ end }}
{{- else if .Values.redis.existingSecretPasswordKey }}true{{ end }}
{{- end }}

{{/* Env shared by every difyq container: config path, logging, Redis. */}}
{{- define "difyq.env" -}}
- name: DIFYQ_CONFIG
  value: /etc/difyq/difyq.yaml
- name: DIFYQ_LOG_FORMAT
  value: {{ .Values.log.format | quote }}
- name: DIFYQ_LOG_LEVEL
  value: {{ .Values.log.level | quote }}
{{- if .Values.redis.bundled.enabled }}
{{- if .Values.redis.bundled.auth.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "difyq.redisPasswordSecretName" . }}
      key: {{ .Values.redis.bundled.auth.existingSecretPasswordKey }}
- name: REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:6379/0" (include "difyq.redisName" .) | quote }}
{{- else }}
- name: REDIS_URL
  value: {{ printf "redis://%s:6379/0" (include "difyq.redisName" .) | quote }}
{{- end }}
{{- else if .Values.redis.existingSecret }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.existingSecretUrlKey }}
{{- with .Values.redis.existingSecretPasswordKey }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.redis.existingSecret }}
      key: {{ . }}
{{- end }}
{{- end }}
{{- with .Values.redis.sentinel.nodes }}
- name: REDIS_SENTINELS
  value: {{ join "," . | quote }}
- name: REDIS_SENTINEL_MASTER
  value: {{ $.Values.redis.sentinel.master | quote }}
{{- with $.Values.redis.sentinel.existingSecret }}
- name: REDIS_SENTINEL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.redis.sentinel.existingSecretPasswordKey }}
{{- end }}
{{- end }}
{{- with .Values.tracing.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ $.Values.tracing.serviceName | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $.Values.tracing.sampler | quote }}
{{- with $.Values.tracing.samplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ . | quote }}
{{- end }}
{{- with $.Values.tracing.headersSecret }}
- name: OTEL_EXPORTER_OTLP_HEADERS
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.tracing.headersSecretKey }}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "difyq.envFrom" -}}
{{- if include "difyq.envSecretCreated" . }}
- secretRef:
    name: {{ include "difyq.envSecretName" . }}
{{- end }}
{{- with .Values.secrets.existingSecret }}
- secretRef:
    name: {{ . }}
{{- end }}
{{- with .Values.extraEnvFrom }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Checksums of the config and secrets, so that changing either rolls the pods. */}}
{{- define "difyq.podAnnotations" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- if .Values.redis.bundled.enabled }}
checksum/redis-secret: {{ include (print .Template.BasePath "/redis-secret.yaml") . | sha256sum }}
{{- end }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Pod spec fields shared by api, worker and scheduler; call with (dict "root" $ "component" "api" "values" .Values.api). */}}
{{- define "difyq.podCommon" -}}
serviceAccountName: {{ include "difyq.serviceAccountName" .root }}
automountServiceAccountToken: false
enableServiceLinks: false
shareProcessNamespace: false
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .values.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml .values.topologySpreadConstraints | nindent 2 }}
{{- else if .root.Values.topologySpread }}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "difyq.selectorLabels" (dict "root" .root "component" .component) | nindent 8 }}
{{- end }}
{{- end }}

{{/* Container fields shared by api, worker and scheduler; call like difyq.podCommon. */}}
{{- define "difyq.containerCommon" -}}
image: {{ include "difyq.image" .root }}
imagePullPolicy: {{ .root.Values.image.pullPolicy }}
securityContext:
  {{- toYaml .root.Values.containerSecurityContext | nindent 2 }}
resources:
  {{- toYaml .values.resources | nindent 2 }}
{{- end }}

{{- define "difyq.volumeMounts" -}}
- name: config
  mountPath: /etc/difyq
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end }}

{{- define "difyq.volumes" -}}
- name: config
  configMap:
    name: {{ include "difyq.fullname" . }}-config
    items:
      - key: difyq.yaml
        path: difyq.yaml
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end }}

{{/*
Checks the schema cannot express, each failing with a message that says what to change.
Rendered from configmap.yaml, which every install renders.
*/}}
{{- define "difyq.validate" -}}
{{- $v := .Values }}
{{- $ref := "^\\$\\{[A-Za-z_][A-Za-z0-9_]*\\}$" }}
{{- $secretFields := list }}
{{- range $name, $app := ($v.config.apps | default dict) }}
{{- $secretFields = append $secretFields (list (printf "config.apps.%s.api_key" $name) (get $app "api_key")) }}
{{- end }}
{{- range $name, $client := ($v.config.clients | default dict) }}
{{- $secretFields = append $secretFields (list (printf "config.clients.%s.token" $name) (get $client "token")) }}
{{- end }}
{{- range $name, $hook := ($v.config.hooks | default dict) }}
{{- with (get $hook "verify") }}
{{- if hasKey . "secret" }}
{{- $secretFields = append $secretFields (list (printf "config.hooks.%s.verify.secret" $name) (get . "secret")) }}
{{- end }}
{{- end }}
{{- end }}
{{- with ($v.config.callbacks | default dict) }}
{{- if hasKey . "signing_secret" }}
{{- $signing := get . "signing_secret" }}
{{- if kindIs "slice" $signing }}
{{- range $index, $secret := $signing }}
{{- $secretFields = append $secretFields (list (printf "config.callbacks.signing_secret[%d]" $index) $secret) }}
{{- end }}
{{- else }}
{{- $secretFields = append $secretFields (list "config.callbacks.signing_secret" $signing) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $name, $user := ((($v.config.console | default dict).users) | default dict) }}
{{- $secretFields = append $secretFields (list (printf "config.console.users.%s.token" $name) (get $user "token")) }}
{{- end }}
{{- with ((($v.config.redis | default dict).sentinel) | default dict) }}
{{- if hasKey . "password" }}
{{- $secretFields = append $secretFields (list "config.redis.sentinel.password" (get . "password")) }}
{{- end }}
{{- end }}
{{- range $secretFields }}
{{- if not (regexMatch $ref (toString (index . 1))) }}
{{- fail (printf "%s must be a ${ENV_NAME} reference (put the value itself in secrets.env or secrets.existingSecret): secrets never go into the ConfigMap" (index . 0)) }}
{{- end }}
{{- end }}
{{- if and $v.secrets.existingSecret $v.secrets.env }}
{{- fail "set either secrets.existingSecret or secrets.env, not both" }}
{{- end }}
{{- if not $v.secrets.existingSecret }}
{{- $provided := keys ($v.secrets.env | default dict) }}
{{- range (concat $v.extraEnv $v.api.extraEnv $v.worker.extraEnv $v.scheduler.extraEnv) }}
{{- $provided = append $provided .name }}
{{- end }}
{{- $missing := list }}
{{- range (regexFindAll "\\$\\{[A-Za-z_][A-Za-z0-9_]*" (toYaml $v.config) -1) }}
{{- $name := trimPrefix "${" . }}
{{- if not (has $name $provided) }}
{{- $missing = append $missing $name }}
{{- end }}
{{- end }}
{{- if $missing }}
{{- fail (printf "config references %s but neither secrets.env nor extraEnv defines it (or name a Secret in secrets.existingSecret)" ($missing | uniq | sortAlpha | join ", ")) }}
{{- end }}
{{- end }}
{{- $modes := 0 }}
{{- if $v.redis.bundled.enabled }}{{ $modes = add1 $modes }}{{ end }}
{{- if $v.redis.url }}{{ $modes = add1 $modes }}{{ end }}
{{- if $v.redis.existingSecret }}{{ $modes = add1 $modes }}{{ end }}
{{- if $v.redis.sentinel.nodes }}
{{- if or $v.redis.bundled.enabled (gt (int $modes) 1) }}
{{- fail "redis.sentinel.nodes needs redis.bundled.enabled=false, and at most one of redis.url and redis.existingSecret (for the servers' password and database)" }}
{{- end }}
{{- else if ne (int $modes) 1 }}
{{- fail "choose one Redis: redis.bundled.enabled=true, or redis.bundled.enabled=false with redis.url or redis.existingSecret (or redis.sentinel.nodes)" }}
{{- end }}
{{- range $name, $app := ($v.config.apps | default dict) }}
{{- $timeout := get $app "timeout_s" | default 600 }}
{{- if gt (float64 $timeout) (float64 $v.worker.jobTimeLimitSeconds) }}
{{- fail (printf "config.apps.%s.timeout_s (%v s) exceeds worker.jobTimeLimitSeconds (%v s): raise worker.jobTimeLimitSeconds so a shutdown lets that app's jobs finish" $name $timeout $v.worker.jobTimeLimitSeconds) }}
{{- end }}
{{- end }}
{{- range $component := list "api" "worker" }}
{{- $auto := (index $v $component).autoscaling }}
{{- if and $auto.enabled (gt (int $auto.minReplicas) (int $auto.maxReplicas)) }}
{{- fail (printf "%s.autoscaling.minReplicas (%v) is above %s.autoscaling.maxReplicas (%v)" $component $auto.minReplicas $component $auto.maxReplicas) }}
{{- end }}
{{- end }}
{{- $scaling := $v.worker.autoscaling }}
{{- if and $scaling.enabled (eq $scaling.type "keda") }}
{{- if and $v.redis.existingSecret (not $v.redis.sentinel.nodes) (not $scaling.keda.redis.address) }}
{{- fail "worker.autoscaling.keda.redis.address is required when the Redis URL comes from redis.existingSecret" }}
{{- end }}
{{- if and $scaling.keda.inFlight.enabled (not $scaling.keda.inFlight.serverAddress) }}
{{- fail "worker.autoscaling.keda.inFlight.serverAddress is required when worker.autoscaling.keda.inFlight.enabled" }}
{{- end }}
{{- end }}
{{- end }}
