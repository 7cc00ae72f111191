#!/usr/bin/env bash
# End-to-end check of the test control plane, with curl only:
#   ensure-tools -> start -> namespace -> CRD (CEL rule + status subresource)
#   -> custom objects (CEL rejection, status update) -> ServiceAccount
#   -> TokenRequest -> authenticated but RBAC-denied request (403)
#   -> garbage collection via ownerReferences (needs kube-controller-manager)
#   -> namespace deletion -> stop.
# Usage: smoke.sh [WORKDIR]   (default: a fresh mktemp dir)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
W="${1:-$(mktemp -d /tmp/ht-smoke.XXXXXX)}"

t0=$SECONDS
"$HERE/ensure-tools.sh"
echo "smoke: ensure-tools took $((SECONDS - t0))s"

t0=$SECONDS
"$HERE/start.sh" "$W"
trap '"$HERE/stop.sh" "$W"' EXIT
echo "smoke: start.sh took $((SECONDS - t0))s"
# shellcheck disable=SC1091
source "$W/env"

fail() { echo "smoke: FAIL: $*" >&2; exit 1; }
# api METHOD PATH [JSON] [TOKEN]: prints the body, sets $code.
api() {
    local out
    out="$(curl -sS --cacert "$APISERVER_CA_FILE" -H "Authorization: Bearer ${4:-$APISERVER_TOKEN}" \
        -H 'Content-Type: application/json' -X "$1" ${3:+--data "$3"} \
        -w '\n%{http_code}' "$APISERVER_URL$2")"
    code="${out##*$'\n'}"
    body="${out%$'\n'*}"
}
expect() { [ "$code" = "$1" ] || fail "$2: HTTP $code (want $1): $body"; echo "smoke: ok   $2 (HTTP $code)"; }
jget() { python3 -c 'import json,sys; d=json.load(sys.stdin)
for k in sys.argv[1].split("."): d=d[int(k)] if isinstance(d,list) else d.get(k) if d is not None else None
print("" if d is None else d)' "$1" <<<"$body"; }

api GET /version; expect 200 "GET /version"
echo "smoke:      server gitVersion=$(jget gitVersion)"

api POST /api/v1/namespaces '{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"smoke"}}'
expect 201 "create namespace smoke"

crd='{
  "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
  "metadata": {"name": "widgets.smoke.high-templar.test"},
  "spec": {
    "group": "smoke.high-templar.test", "scope": "Namespaced",
    "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wdg"]},
    "versions": [{
      "name": "v1alpha1", "served": true, "storage": true,
      "subresources": {"status": {}},
      "schema": {"openAPIV3Schema": {
        "type": "object",
        "properties": {
          "spec": {
            "type": "object",
            "required": ["replicas", "maxReplicas"],
            "properties": {
              "replicas": {"type": "integer", "minimum": 0},
              "maxReplicas": {"type": "integer", "minimum": 0}
            },
            "x-kubernetes-validations": [
              {"rule": "self.replicas <= self.maxReplicas", "message": "replicas must not exceed maxReplicas"}
            ]
          },
          "status": {"type": "object", "properties": {"ready": {"type": "boolean"}}}
        }
      }}
    }]
  }
}'
api POST /apis/apiextensions.k8s.io/v1/customresourcedefinitions "$crd"
expect 201 "create CRD widgets.smoke.high-templar.test"
for _ in $(seq 1 100); do
    api GET /apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.smoke.high-templar.test
    est="$(python3 -c 'import json,sys; print(any(c["type"]=="Established" and c["status"]=="True" for c in json.load(sys.stdin).get("status",{}).get("conditions",[])))' <<<"$body")"
    [ "$est" = True ] && break
    sleep 0.1
done
[ "$est" = True ] || fail "CRD never became Established"
echo "smoke: ok   CRD Established"

W_PATH=/apis/smoke.high-templar.test/v1alpha1/namespaces/smoke/widgets
for _ in $(seq 1 50); do  # discovery of a fresh CRD can lag a moment
    api GET "$W_PATH"; [ "$code" = 200 ] && break; sleep 0.1
done
expect 200 "list widgets"
api POST "$W_PATH" '{"apiVersion":"smoke.high-templar.test/v1alpha1","kind":"Widget","metadata":{"name":"bad"},"spec":{"replicas":5,"maxReplicas":2}}'
expect 422 "CEL rule rejects replicas > maxReplicas"
grep -q 'replicas must not exceed maxReplicas' <<<"$body" || fail "CEL message missing: $body"
api POST "$W_PATH" '{"apiVersion":"smoke.high-templar.test/v1alpha1","kind":"Widget","metadata":{"name":"good"},"spec":{"replicas":1,"maxReplicas":2},"status":{"ready":true}}'
expect 201 "create valid widget"
[ -z "$(jget status.ready)" ] || fail "status must be ignored on create with the status subresource"
curl -sS -o /dev/null -w '%{http_code}' --cacert "$APISERVER_CA_FILE" -H "Authorization: Bearer $APISERVER_TOKEN" \
    -H 'Content-Type: application/merge-patch+json' -X PATCH --data '{"status":{"ready":true}}' \
    "$APISERVER_URL$W_PATH/good/status" >/tmp/ht-smoke-code.$$
code="$(cat /tmp/ht-smoke-code.$$)"; rm -f /tmp/ht-smoke-code.$$
expect 200 "PATCH widgets/good/status"
api GET "$W_PATH/good"
[ "$(jget status.ready)" = True ] || fail "status.ready not persisted: $body"
echo "smoke: ok   status subresource persisted status.ready=true"

api POST /api/v1/namespaces/default/serviceaccounts '{"apiVersion":"v1","kind":"ServiceAccount","metadata":{"name":"smoke"}}'
expect 201 "create ServiceAccount default/smoke"
api POST /api/v1/namespaces/default/serviceaccounts/smoke/token \
    '{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{"expirationSeconds":600}}'
expect 201 "TokenRequest for default/smoke"
SA_TOKEN="$(jget status.token)"
[ -n "$SA_TOKEN" ] || fail "no token in TokenRequest response"
api POST /apis/authentication.k8s.io/v1/selfsubjectreviews '{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}' "$SA_TOKEN"
expect 201 "SelfSubjectReview with the SA token"
[ "$(jget status.userInfo.username)" = system:serviceaccount:default:smoke ] || fail "token authenticates as $(jget status.userInfo.username)"
echo "smoke:      token authenticates as $(jget status.userInfo.username)"
api GET /api/v1/namespaces/kube-system/secrets "" "$SA_TOKEN"
expect 403 "RBAC denies SA token listing kube-system secrets"

if [ -n "${CONTROLLER_MANAGER_PID:-}" ]; then
    api POST /api/v1/namespaces/smoke/configmaps '{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"parent"}}'
    expect 201 "create ConfigMap parent"
    uid="$(jget metadata.uid)"
    api POST /api/v1/namespaces/smoke/configmaps "{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"metadata\":{\"name\":\"child\",\"ownerReferences\":[{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"name\":\"parent\",\"uid\":\"$uid\"}]}}"
    expect 201 "create ConfigMap child owned by parent"
    api DELETE /api/v1/namespaces/smoke/configmaps/parent
    expect 200 "delete ConfigMap parent"
    t0=$SECONDS
    for _ in $(seq 1 300); do api GET /api/v1/namespaces/smoke/configmaps/child; [ "$code" = 404 ] && break; sleep 0.2; done
    expect 404 "garbage collector deleted child ($((SECONDS - t0))s)"
    api DELETE /api/v1/namespaces/smoke
    expect 200 "delete namespace smoke"
    t0=$SECONDS
    for _ in $(seq 1 300); do api GET /api/v1/namespaces/smoke; [ "$code" = 404 ] && break; sleep 0.2; done
    expect 404 "namespace controller finished deleting smoke ($((SECONDS - t0))s)"
fi

echo "smoke: PASS"
