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
{{- define "kvbm-codec.metricsAuthDir" -}}/etc/kvbm-codec/metrics-auth{{- end -}}
{{- define "kvbm-codec.cacheDir" -}}
{{- if .Values.persistence.enabled -}}{{ .Values.persistence.mountPath }}/cache{{- else -}}/var/cache/kvbm-codec{{- end -}}
{{- end -}}

{{/*
The service config as written into the ConfigMap: .Values.config with what this chart manages filled in:
the disk tier on the PVC (capacity 90% of the volume unless set), TLS files, the auth mode and token file.
Only paths reach the ConfigMap; secrets stay in Secrets mounted as files.
*/}}
{{- define "kvbm-codec.config" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- if .Values.persistence.enabled -}}
{{- if not $cfg.disk_path -}}
{{- $_ := set $cfg "disk_path" (printf "%s/disk" .Values.persistence.mountPath) -}}
{{- end -}}
{{- if kindIs "invalid" $cfg.disk_capacity_bytes -}}
{{- $size := include "kvbm-codec.bytes" (dict "v" .Values.persistence.size "name" "persistence.size") | int64 -}}
{{- $_ := set $cfg "disk_capacity_bytes" (div (mul $size 9) 10) -}}
{{- end -}}
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
{{- else if and .Values.tls.secretName .Values.tls.requireClientCert -}}
{{- $_ := set $cfg.auth "mode" "mtls" -}}
{{- end -}}
{{- if .Values.metricsAuth.tokenSecret.name -}}
{{- $_ := set $cfg "metrics_token_file" (printf "%s/token" (include "kvbm-codec.metricsAuthDir" .)) -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* Pod labels: selector labels, Dynamo's metrics labels, user labels. */}}
{{- define "kvbm-codec.podLabels" -}}
{{ include "kvbm-codec.labels" . }}
{{- if .Values.dynamoLabels.enabled }}
nvidia.com/metrics-enabled: "true"
nvidia.com/dynamo-namespace: {{ .Values.config.dynamo.namespace | quote }}
nvidia.com/dynamo-component: {{ .Values.config.dynamo.component | quote }}
{{- end }}
{{- with .Values.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}
