#!/usr/bin/env bash
# Makes sure the local RabbitMQ (127.0.0.1:5672) and Redis (127.0.0.1:6379) the tests talk to are
# up, starting them when they are down.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 name=$2
  for _ in $(seq 1 60); do
    port_open "$port" && return 0
    sleep 1
  done
  echo "services: $name did not come up on port $port" >&2
  return 1
}

if ! port_open 6379; then
  echo "services: starting redis"
  if command -v redis-server >/dev/null; then
    redis-server --daemonize yes --save '' --appendonly no >/dev/null
  else
    service redis-server start
  fi
  wait_port 6379 redis
fi

if ! port_open 5672; then
  echo "services: starting rabbitmq"
  if command -v rabbitmq-server >/dev/null; then
    (rabbitmq-server -detached || service rabbitmq-server start) >/dev/null 2>&1 || true
  else
    service rabbitmq-server start
  fi
  wait_port 5672 rabbitmq
fi
echo "services: redis and rabbitmq are up"
