{{/* The chart's name for its objects: the release name, then the part. */}}
{{- define "tessera.name" -}}
{{- printf "%s-%s" .Release.Name .part | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tessera.labels" -}}
app.kubernetes.io/name: tessera
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The NATS servers, comma-separated, as tessera's --nats takes them. */}}
{{- define "tessera.natsUrls" -}}
{{- $servers := list -}}
{{- range $i := until (int .Values.nats.replicas) -}}
{{- $servers = append $servers (printf "nats://%s-nats-%d.%s-nats:4222" $.Release.Name $i $.Release.Name) -}}
{{- end -}}
{{- join "," $servers -}}
{{- end -}}
