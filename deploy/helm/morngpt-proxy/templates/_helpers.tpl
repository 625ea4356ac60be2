{{/* The name of every object: the release name when it already says morngpt-proxy. */}}
{{- define "morngpt.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* What selects the proxy pods; "component" tells them from the migrate job's. */}}
{{- define "morngpt.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: proxy
{{- end -}}

{{- define "morngpt.secretName" -}}
{{- .Values.secret.name | default (include "morngpt.fullname" .) -}}
{{- end -}}

{{/* The proxy config (values.config) as data, for the ports it names. */}}
{{- define "morngpt.server" -}}
{{- $config := .Values.config | fromYaml -}}
{{- toYaml ($config.server | default dict) -}}
{{- end -}}

{{- define "morngpt.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* Every *_env name of the config, filled from the Secret. */}}
{{- define "morngpt.env" -}}
{{- range .Values.secret.env }}
- name: {{ . }}
  valueFrom:
    secretKeyRef:
      name: {{ include "morngpt.secretName" $ }}
      key: {{ . }}
{{- end }}
{{- end -}}
