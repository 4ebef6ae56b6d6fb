"""Sidecar injection, as `istioctl kube-inject` and Istio's injector do it: template (the pod
patch: capture init container, native Envoy sidecar, volumes, status annotation; pure),
workloads (which kinds hold a pod template and where; multi-document YAML), review (an
AdmissionReview in, an AdmissionReview with a JSON Patch out; pure), webhook (the HTTPS server
with a mesh-CA certificate) and ca_bundle (keeps the MutatingWebhookConfiguration's caBundle
on the mesh roots). settings holds what an operator chooses."""
