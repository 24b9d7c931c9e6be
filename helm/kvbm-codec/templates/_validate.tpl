{{/*
Combinations the schema cannot express but that would render, install and then crash-loop (or run
insecurely) after the model loads. Each failure names the values involved and how to fix them.
Included once, from the StatefulSet.
*/}}
{{- define "kvbm-codec.validate" -}}
{{- $v := .Values -}}
{{- $cfg := $v.config -}}
{{- $mem := include "kvbm-codec.bytes" (dict "v" $cfg.memory_capacity_bytes "name" "config.memory_capacity_bytes") | int64 -}}

{{- /* disk tier vs its volume */ -}}
{{- if $v.persistence.enabled -}}
{{- $size := include "kvbm-codec.bytes" (dict "v" $v.persistence.size "name" "persistence.size") | int64 -}}
{{- if not (kindIs "invalid" $cfg.disk_capacity_bytes) -}}
{{- $disk := include "kvbm-codec.bytes" (dict "v" $cfg.disk_capacity_bytes "name" "config.disk_capacity_bytes") | int64 -}}
{{- if gt (mul $disk 100) (mul $size 95) -}}
{{- fail (printf "config.disk_capacity_bytes (%v = %d bytes) does not fit persistence.size (%v = %d bytes): the disk tier may use at most 95%% of its volume. Lower it, raise persistence.size, or set it to null to use 90%% of the volume." $cfg.disk_capacity_bytes $disk $v.persistence.size $size) -}}
{{- end -}}
{{- end -}}
{{- else if $cfg.disk_path -}}
{{- fail (printf "config.disk_path (%s) is set but persistence.enabled is false: the root filesystem is read-only and an emptyDir would lose the tier. Enable persistence, or set config.disk_path to null." $cfg.disk_path) -}}
{{- end -}}

{{- /* durable mode needs a disk */ -}}
{{- if and (eq $mem 0) (not $v.persistence.enabled) -}}
{{- fail "config.memory_capacity_bytes is 0 (durable mode: every put goes to disk) but persistence.enabled is false, so there is no disk tier. Enable persistence or give the memory tier a capacity." -}}
{{- end -}}

{{- /* memory limit vs memory tier + staging + the process */ -}}
{{- $limit := dig "limits" "memory" "" $v.resources -}}
{{- if not $limit -}}
{{- fail "resources.limits.memory is not set: the memory tier (config.memory_capacity_bytes) needs a bounded, known amount of memory." -}}
{{- end -}}
{{- $limitB := include "kvbm-codec.bytes" (dict "v" $limit "name" "resources.limits.memory") | int64 -}}
{{- $staging := 0 -}}
{{- if $cfg.nixl.enabled -}}
{{- $staging = include "kvbm-codec.bytes" (dict "v" $cfg.nixl.staging_bytes "name" "config.nixl.staging_bytes") | int64 -}}
{{- end -}}
{{- $overhead := include "kvbm-codec.bytes" (dict "v" $v.memoryOverhead "name" "memoryOverhead") | int64 -}}
{{- $need := add $mem $staging $overhead -}}
{{- if lt $limitB $need -}}
{{- fail (printf "resources.limits.memory (%v = %d bytes) is below config.memory_capacity_bytes (%v) + config.nixl.staging_bytes (%d bytes) + memoryOverhead (%v) = %d bytes: the pod would be OOM-killed once the memory tier fills. Raise the limit or lower the memory tier." $limit $limitB $cfg.memory_capacity_bytes $staging $v.memoryOverhead $need) -}}
{{- end -}}

{{- /* drain vs grace period */ -}}
{{- $grace := int64 $v.terminationGracePeriodSeconds -}}
{{- $stop := add (float64 $cfg.drain_timeout_s | ceil | int64) (int64 $v.lifecycle.preStopDelaySeconds) 5 -}}
{{- if gt $stop $grace -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed lifecycle.preStopDelaySeconds (%v) + config.drain_timeout_s (%v) + 5 s = %d s, or SIGKILL cuts the drain short. Raise the grace period or shorten the drain." $grace $v.lifecycle.preStopDelaySeconds $cfg.drain_timeout_s $stop) -}}
{{- end -}}

{{- /* probes need the probe port */ -}}
{{- if kindIs "invalid" $cfg.probes.port -}}
{{- fail "config.probes.port is null: the chart's startup, readiness and liveness probes and the preStop hook use it. Set a port (default 9465)." -}}
{{- end -}}

{{- if le (float64 $cfg.probes.stuck_after_s) (float64 $cfg.request_timeout_s) -}}
{{- fail (printf "config.probes.stuck_after_s (%v) must exceed config.request_timeout_s (%v): liveness would restart pods whose requests are merely slow." $cfg.probes.stuck_after_s $cfg.request_timeout_s) -}}
{{- end -}}

{{- /* TLS and auth */ -}}
{{- if and $cfg.tls.enabled (not $v.tls.secretName) -}}
{{- fail "config.tls.enabled is set but tls.secretName is empty: the chart mounts certificates only from a Secret. Set tls.secretName (a kubernetes.io/tls Secret) instead of config.tls.*." -}}
{{- end -}}
{{- if and $v.tls.requireClientCert (not $v.tls.secretName) -}}
{{- fail "tls.requireClientCert needs tls.secretName: a kubernetes.io/tls Secret with tls.crt, tls.key and the client CA as ca.crt." -}}
{{- end -}}
{{- if ne $cfg.auth.mode "none" -}}
{{- fail (printf "config.auth.mode is %q: the chart sets it. Use auth.tokenSecret.name (mode token) or tls.requireClientCert (mode mtls) instead." $cfg.auth.mode) -}}
{{- end -}}
{{- if $cfg.auth.tokens_file -}}
{{- fail "config.auth.tokens_file is set: the chart mounts the token table from auth.tokenSecret.name; set that instead." -}}
{{- end -}}
{{- if and $v.auth.tokenSecret.name (not $v.tls.secretName) -}}
{{- fail (printf "auth.tokenSecret.name (%s) needs tls.secretName: bearer tokens must not cross the network in plaintext." $v.auth.tokenSecret.name) -}}
{{- end -}}
{{- $authed := or $v.auth.tokenSecret.name (and $v.tls.secretName $v.tls.requireClientCert) -}}
{{- if and (not $authed) (not $v.auth.allowUnauthenticated) -}}
{{- fail "no authentication configured: any pod could read or delete KV derived from users' prompts. Set auth.tokenSecret.name and tls.secretName (token auth), or tls.secretName with tls.requireClientCert (mTLS tenants); auth.allowUnauthenticated=true only for development." -}}
{{- end -}}

{{- /* S3 */ -}}
{{- if $cfg.s3.enabled -}}
{{- if kindIs "invalid" $cfg.s3.port -}}
{{- fail "config.s3.enabled is true but config.s3.port is null: set the S3 endpoint's port (e.g. 9000)." -}}
{{- end -}}
{{- if not $v.s3.credentialsSecret.name -}}
{{- fail "config.s3.enabled is true but s3.credentialsSecret.name is empty: the S3 endpoint needs access keys. Create a Secret with access-key and secret-key and name it in s3.credentialsSecret.name." -}}
{{- end -}}
{{- end -}}

{{- /* secrets never as literal environment values */ -}}
{{- range $v.extraEnv -}}
{{- if and (hasKey . "value") (has .name (list "KVBM_CODEC_AUTH_TOKENS" "KVBM_CODEC_S3_ACCESS_KEY" "KVBM_CODEC_S3_SECRET_KEY")) -}}
{{- fail (printf "extraEnv %s holds a secret as a literal value (it would sit in the StatefulSet in plain text): use valueFrom.secretKeyRef, or auth.tokenSecret / s3.credentialsSecret." .name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
