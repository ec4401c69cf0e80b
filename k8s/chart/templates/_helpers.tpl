{{- define "stepaudio2.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "stepaudio2.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "stepaudio2.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "stepaudio2.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "stepaudio2.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stepaudio2.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "stepaudio2.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "stepaudio2.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "stepaudio2.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "stepaudio2.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "stepaudio2.checkpointPath" -}}
{{- if eq .Values.checkpoint.source "tiny" -}}/runtime/tiny{{- else -}}/checkpoint{{- end -}}
{{- end -}}

{{/* restricted Pod Security Standard, container level */}}
{{- define "stepaudio2.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* resources with the GPU count added to requests and limits; args: resources, gpus, root */}}
{{- define "stepaudio2.resources" -}}
{{- $req := deepCopy (default dict .resources.requests) -}}
{{- $lim := deepCopy (default dict .resources.limits) -}}
{{- if gt .gpus 0 -}}
{{- $_ := set $req .root.Values.gpu.resourceName .gpus -}}
{{- $_ := set $lim .root.Values.gpu.resourceName .gpus -}}
{{- end -}}
requests:
  {{- toYaml $req | nindent 2 }}
limits:
  {{- toYaml $lim | nindent 2 }}
{{- end -}}

{{/* The session store URL of the front stages: from a Secret (it may carry a password), the values, or the
chart's own Redis. Kubernetes expands $(STEPAUDIO2_SESSION_STORE) in the container args. */}}
{{- define "stepaudio2.sessionStoreEnv" -}}
{{- $redis := .Values.sessionStore.redis -}}
- name: STEPAUDIO2_SESSION_STORE
{{- if $redis.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ $redis.existingSecret }}
      key: {{ $redis.existingSecretKey }}
{{- else if $redis.url }}
  value: {{ $redis.url | quote }}
{{- else if $redis.deploy }}
  value: {{ printf "redis://%s-redis:6379/0" (include "stepaudio2.fullname" .) | quote }}
{{- else }}
{{- fail "sessionStore.type redis needs sessionStore.redis.existingSecret, .url or .deploy" }}
{{- end }}
{{- end -}}

{{/* Names of the stages marked internal, as a JSON list. */}}
{{- define "stepaudio2.internalStages" -}}
{{- $names := list -}}
{{- range .Values.stages }}{{ if .internal }}{{ $names = append $names .name }}{{ end }}{{ end -}}
{{- toJson $names -}}
{{- end -}}
