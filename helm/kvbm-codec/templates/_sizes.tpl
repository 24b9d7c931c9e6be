{{/*
Sizes as byte counts, in the grammar kvbm_codec/service/sizes.py accepts: a plain number, or a number with
a Kubernetes quantity suffix (Ki..Ei binary, k/K..E decimal) or a byte-size suffix (KiB..EiB, kB/KB..EB).
Call with (dict "v" VALUE "name" "values.path"); a value it cannot read fails the render naming the path.
Output: the byte count as a decimal string (compare with `int64`).
*/}}
{{- define "kvbm-codec.bytes" -}}
{{- $v := .v -}}
{{- if or (kindIs "float64" $v) (kindIs "int" $v) (kindIs "int64" $v) -}}
{{- int64 $v -}}
{{- else -}}
{{- $s := toString $v | trim -}}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" $s -}}
{{- $unit := trimPrefix $num $s | trim -}}
{{- $units := dict "" 1 "B" 1
  "Ki" 1024 "KiB" 1024 "Mi" 1048576 "MiB" 1048576 "Gi" 1073741824 "GiB" 1073741824
  "Ti" 1099511627776 "TiB" 1099511627776 "Pi" 1125899906842624 "PiB" 1125899906842624
  "Ei" 1152921504606846976 "EiB" 1152921504606846976
  "k" 1000 "K" 1000 "kB" 1000 "KB" 1000 "M" 1000000 "MB" 1000000 "G" 1000000000 "GB" 1000000000
  "T" 1000000000000 "TB" 1000000000000 "P" 1000000000000000 "PB" 1000000000000000
  "E" 1000000000000000000 "EB" 1000000000000000000 -}}
{{- if or (not $num) (not (hasKey $units $unit)) -}}
{{- fail (printf "%s: %q is not a size (use e.g. 500Gi, 8GiB or a byte count)" .name $s) -}}
{{- end -}}
{{- if contains "." $num -}}
{{- mulf (float64 $num) (index $units $unit) | int64 -}}
{{- else -}}
{{- mul (int64 $num) (index $units $unit) -}}
{{- end -}}
{{- end -}}
{{- end -}}
