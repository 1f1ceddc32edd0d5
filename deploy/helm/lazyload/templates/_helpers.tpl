{{- define "lazyload.labels" -}}
app.kubernetes.io/name: lazyload
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}

{{/* The namespaces that get a global-sidecar. */}}
{{- define "lazyload.gsNamespaces" -}}
{{- if eq .Values.mode "namespace" -}}
{{ toJson .Values.namespaces }}
{{- else if eq .Values.mode "cluster" -}}
{{ toJson (list .Release.Namespace) }}
{{- else -}}
{{ fail "mode must be cluster or namespace" }}
{{- end -}}
{{- end }}
