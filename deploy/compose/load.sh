#!/bin/sh
# The compose stack's load generator (deploy/compose.yaml): enough traffic
# for every panel of the dashboard to show something, and nothing more.
#
# - crm-sync reads one lead every half second (about 40 calls per 20 s);
# - every 30 s warehouse looks up 40 leads at once: more than its 5 calls
#   in flight, so requests queue and the queue panels move;
# - every 2 minutes the simulator is told to answer the next call with 606,
#   as if an integration outside the proxy had filled Marketo's window, so
#   the proxy's replay shows under "Replays by reason".
#
# At this rate (about 11,000 calls an hour) the simulator's 50,000 calls a
# day last four to five hours: the quota forecast alert (runs out within
# 6 h) fires after its 15 minutes, and the 80 % and 95 % alerts hours later.
# Stop the load with `docker compose -f deploy/compose.yaml stop load`.
set -u

echo "load: waiting for the proxy to be ready at $ADMIN/readyz"
until curl -fsS -o /dev/null "$ADMIN/readyz"; do
  sleep 1
done
echo "load: sending traffic to $PROXY"

round=0
while true; do
  round=$((round + 1))
  curl -fsS -o /dev/null -H "X-Api-Key: $CRM_SYNC_KEY" \
    "$PROXY/rest/v1/lead/$((round % 1000 + 1)).json" || echo "load: crm-sync call failed"

  if [ $((round % 60)) -eq 0 ]; then
    for id in $(seq 1 40); do
      curl -fsS -o /dev/null -H "X-Api-Key: $WAREHOUSE_KEY" \
        "$PROXY/rest/v1/leads.json?filterType=email&filterValues=lead$id%40example.com" \
        || echo "load: warehouse call failed" &
    done
    wait
  fi

  if [ $((round % 240)) -eq 0 ]; then
    curl -fsS -o /dev/null -X POST -H 'Content-Type: application/json' \
      -d '{"fail_next":{"count":1,"code":"606"}}' "$SIM/_sim/faults" \
      || echo "load: could not reach the simulator"
  fi

  sleep 0.5
done
