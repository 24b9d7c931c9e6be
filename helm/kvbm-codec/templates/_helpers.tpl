{{- define "kvbm-codec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kvbm-codec.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kvbm-codec.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvbm-codec.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kvbm-codec.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "kvbm-codec.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: kv-cache-tier
{{- end -}}

{{- define "kvbm-codec.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kvbm-codec.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kvbm-codec.image" -}}
{{- $flavor := ternary "cuda" "cpu" .Values.gpu.enabled -}}
{{- printf "%s:%s-%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) $flavor -}}
{{- end -}}

{{/* Where secrets and the cache are mounted; the config file points at these paths. */}}
{{- define "kvbm-codec.tlsDir" -}}/etc/kvbm-codec/tls{{- end -}}
{{- define "kvbm-codec.authDir" -}}/etc/kvbm-codec/auth{{- end -}}
{{- define "kvbm-codec.cacheDir" -}}
{{- if .Values.persistence.enabled -}}{{ .Values.persistence.mountPath }}/cache{{- else -}}/var/cache/kvbm-codec{{- end -}}
{{- end -}}

{{/*
The service config as written into the ConfigMap: .Values.config with the paths this chart mounts
filled in (disk tier on the PVC, TLS and token secrets).
*/}}
{{- define "kvbm-codec.config" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- if and .Values.persistence.enabled (not $cfg.disk_path) -}}
{{- $_ := set $cfg "disk_path" (printf "%s/disk" .Values.persistence.mountPath) -}}
{{- end -}}
{{- if .Values.tls.secretName -}}
{{- $tls := $cfg.tls -}}
{{- $_ := set $tls "enabled" true -}}
{{- $_ := set $tls "cert_file" (printf "%s/tls.crt" (include "kvbm-codec.tlsDir" .)) -}}
{{- $_ := set $tls "key_file" (printf "%s/tls.key" (include "kvbm-codec.tlsDir" .)) -}}
{{- if .Values.tls.requireClientCert -}}
{{- $_ := set $tls "client_ca_file" (printf "%s/ca.crt" (include "kvbm-codec.tlsDir" .)) -}}
{{- $_ := set $tls "require_client_cert" true -}}
{{- end -}}
{{- end -}}
{{- if .Values.auth.tokenSecret.name -}}
{{- $_ := set $cfg.auth "mode" "token" -}}
{{- $_ := set $cfg.auth "tokens_file" (printf "%s/tokens" (include "kvbm-codec.authDir" .)) -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}
