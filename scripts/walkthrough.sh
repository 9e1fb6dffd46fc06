#!/usr/bin/env bash
# The README walkthrough against a running `make run`: two accounts, a transfer, its replay, /health.
set -euo pipefail
base=${PAYFLOW_BASE_URL:-http://127.0.0.1:${PAYFLOW_PORT:-8080}}
key=${PAYFLOW_KEY:?set PAYFLOW_KEY to the API key make run printed}
json=(-H 'Content-Type: application/json' -H "Authorization: Bearer $key")
new_account() {
  curl -sf "${json[@]}" -X POST "$base/v1/accounts" -d "{\"name\":\"$1\",\"currency\":\"USD\",\"overdraft_limit\":$2}" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'
}
a=$(new_account "walkthrough-a" 10000)
b=$(new_account "walkthrough-b" 0)
key="walkthrough-$(date +%s%N)"
body="{\"from_account_id\":\"$a\",\"to_account_id\":\"$b\",\"amount\":2500}"
echo "== transfer"; curl -si "${json[@]}" -H "X-Idempotency-Key: $key" -X POST "$base/v1/transfers" -d "$body"; echo
echo "== the same request again (a replay)"; curl -si "${json[@]}" -H "X-Idempotency-Key: $key" -X POST "$base/v1/transfers" -d "$body"; echo
echo "== entries of $a"; curl -s -H "Authorization: Bearer $key" "$base/v1/accounts/$a/entries"; echo
echo "== health"; curl -s "$base/health"; echo
