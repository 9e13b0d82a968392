{{/* Names, labels and image references shared by every template. */}}

{{- define "kontext-lora.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "kontext-lora.fullname" -}}
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

{{- define "kontext-lora.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kontext-lora.labels" -}}
helm.sh/chart: {{ include "kontext-lora.chart" . }}
app.kubernetes.io/name: {{ include "kontext-lora.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kontext-lora
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of the operator pods: stable across upgrades (a Deployment's selector is immutable). */}}
{{- define "kontext-lora.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kontext-lora.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kontext-lora.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kontext-lora.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference from {repository, tag, digest}: repository[:tag][@digest], tag defaulting to appVersion. */}}
{{- define "kontext-lora.image" -}}
{{- $image := .image }}
{{- $tag := default .root.Chart.AppVersion $image.tag }}
{{- if $image.digest }}
{{- printf "%s:%s@%s" $image.repository $tag $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository $tag }}
{{- end }}
{{- end }}

{{/* The operator config (kontext_lora.api.operator_config.OperatorConfig) as YAML. */}}
{{- define "kontext-lora.operatorConfig" -}}
{{- $trainer := dict
  "image" (include "kontext-lora.image" (dict "image" .Values.trainer.image "root" .))
  "imagePullPolicy" .Values.trainer.image.pullPolicy
  "imagePullSecrets" .Values.trainer.imagePullSecrets
  "metricsPort" .Values.trainer.metricsPort
  "workDirSizeLimit" .Values.trainer.workDirSizeLimit
  "terminationGracePeriodSeconds" .Values.trainer.terminationGracePeriodSeconds
  "labels" .Values.trainer.podLabels
  "annotations" .Values.trainer.podAnnotations }}
{{- with .Values.trainer.priorityClassName }}
{{- $_ := set $trainer "priorityClassName" . }}
{{- end }}
{{- $storage := dict "region" .Values.storage.region }}
{{- with .Values.storage.endpoint }}
{{- $_ := set $storage "endpoint" . }}
{{- end }}
{{- $prep := .Values.preparation }}
{{- $preparation := dict
  "enabled" $prep.enabled
  "nodeSelector" $prep.nodeSelector
  "tolerations" $prep.tolerations
  "cpu" $prep.cpu
  "memory" $prep.memory
  "workDirSizeLimit" $prep.workDirSizeLimit
  "activeDeadlineSeconds" $prep.activeDeadlineSeconds
  "backoffLimit" $prep.backoffLimit
  "labels" $prep.podLabels
  "annotations" $prep.podAnnotations }}
{{- with $prep.affinity }}
{{- $_ := set $preparation "affinity" . }}
{{- end }}
{{- $hub := dict }}
{{- with .Values.hub.endpoint }}
{{- $_ := set $hub "endpoint" . }}
{{- end }}
{{- with .Values.hub.tokenSecret.name }}
{{- $_ := set $hub "tokenSecret" (dict "name" . "key" $.Values.hub.tokenSecret.key) }}
{{- end }}
{{- $config := dict
  "trainer" $trainer
  "preparation" $preparation
  "hub" $hub
  "gpuClasses" .Values.gpuClasses
  "defaultStorage" $storage
  "watchNamespaces" .Values.watchNamespaces
  "metricsPort" .Values.operator.metricsPort
  "healthPort" .Values.operator.healthPort }}
{{- toYaml $config }}
{{- end }}
