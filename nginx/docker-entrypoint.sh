#!/bin/sh
# Render the site config, then run the command (nginx by default; "nginx -t" to check).
# Like nginx's official image: /etc/nginx/templates/*.template -> /etc/nginx/conf.d/*.conf.
# -f: settings are split into words below, and a word must never expand to file names
# (SERVE_MODELS="[x]roc/1" would become "proc/1" after its check).
set -euf

# PUBLIC_HOSTNAME ("host[:port],...") -> a map of allowed Host headers. An entry without a
# port allows that host on any port; unset allows any host (first start on a fresh clone).
render_hosts_map() {
    # shellcheck disable=SC2016  # $http_host is nginx's variable, not the shell's
    echo 'map $http_host $mlflow_host_allowed {'
    entries=$(printf '%s' "${PUBLIC_HOSTNAME:-}" | tr ',' ' ')
    if [ -z "$(printf '%s' "$entries" | tr -d ' ')" ]; then
        echo '    default 1;'
    else
        echo '    default 0;'
        for entry in $entries; do
            if ! printf '%s\n' "$entry" | grep -Eq '^([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?$'; then
                echo "docker-entrypoint: PUBLIC_HOSTNAME: '$entry' is not host[:port]" >&2
                return 1
            fi
            pattern=$(printf '%s' "$entry" | sed -e 's/[].[]/\\&/g')
            if printf '%s\n' "$entry" | grep -Eq '(^[^[]*|\]):[0-9]+$'; then
                port_part=''
            else
                port_part='(:[0-9]+)?'
            fi
            echo "    \"~*^${pattern}${port_part}\$\" 1;"
        done
        # The serving profile fetches models through this proxy by its service name.
        if [ -n "$(serve_model_names)" ]; then
            echo '    "nginx:8080" 1;'
        fi
    fi
    echo '}'
    # For the 421 answer (njs/refusals.js): the names, checked above, so safe in quotes.
    # shellcheck disable=SC2016  # $pid is nginx's variable
    printf 'map $pid $public_names {\n    default "%s";\n}\n' "$(printf '%s' "$entries" | tr -s ' ' ',' | sed 's/^,//; s/,$//')"
}

# SERVE_MODELS ("NAME@ALIAS,NAME/VERSION,..."; server/serving.py reads the same list with the
# same rule) -> the model names, one a line, in order (model i is model-i.sock, below).
serve_model_names() {
    printf '%s' "${SERVE_MODELS:-}" | tr ',' '\n' | tr -d ' \t' | grep -v '^$' | sed 's/[@/].*//' || true
}

# Each comma-separated entry (spaces around it allowed) must be NAME@ALIAS or NAME/VERSION, and
# no name may repeat in any case (nginx's map compares names without regard to case).
check_serve_models() {
    entries=$(printf '%s' "${SERVE_MODELS:-}" | tr ',' '\n' | sed 's/^[ \t]*//; s/[ \t]*$//' | grep -v '^$' || true)
    for entry in $entries; do
        if ! printf '%s\n' "$entry" \
            | grep -Eq '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(@[A-Za-z0-9_-]{1,255}|/[1-9][0-9]{0,9})$'; then
            echo "docker-entrypoint: SERVE_MODELS: an entry is not NAME@ALIAS or NAME/VERSION" >&2
            return 1
        fi
    done
    if [ -n "$entries" ] && [ "$(printf '%s\n' "$entries" | wc -l)" != "$(printf '%s\n' "$entries" | wc -w)" ]; then
        echo "docker-entrypoint: SERVE_MODELS: an entry holds a space" >&2
        return 1
    fi
    duplicate=$(serve_model_names | tr '[:upper:]' '[:lower:]' | sort | uniq -d | head -n 1)
    if [ -n "$duplicate" ]; then
        echo "docker-entrypoint: SERVE_MODELS: '$duplicate' is listed twice" >&2
        return 1
    fi
}

# /serving/NAME/... -> the model's upstream: its scorer's unix socket in the volume shared with
# the serving container (model i at model-i.sock, as server/serving.py binds it), with kept-alive
# connections. A socket that is missing or not listening is refused at once (nginx: 503). A name
# not served goes to this nginx's own 404 answer. The first model also answers /invocations,
# as in MLflow's docs.
render_serving_map() {
    index=0
    first=''
    names=''
    mapping=''
    for name in $(serve_model_names); do
        printf 'upstream serving_model_%s {\n' "$index"
        printf '    server unix:%s/model-%s.sock;\n' "${SERVING_SOCKET_DIR:-/run/mlflow-serving}" "$index"
        # Per worker; closed by nginx before the scorer would (its keep-alive: 75 s).
        printf '    keepalive 16;\n    keepalive_timeout 60s;\n}\n'
        # Keys carry a prefix: a bare "default", "include" or "hostnames" is a map keyword.
        mapping="$mapping    \"model:$name\" serving_model_$index;
"
        index=$((index + 1))
        first=${first:-$name}
        names="${names:+$names, }$name"
    done
    # shellcheck disable=SC2016  # nginx's variables
    printf 'map model:$serving_model $serving_backend {\n    default 127.0.0.1:8091;\n%s}\n' "$mapping"
    # shellcheck disable=SC2016
    printf 'map $pid $serving_default_model {\n    default "%s";\n}\n' "$first"
    # shellcheck disable=SC2016
    printf 'map $pid $serving_names {\n    default "%s";\n}\n' "${names:-none}"
}

# A remembered "yes" outlives a user's removal by up to this long: 1-5 s ("2s", "1500ms").
check_auth_cache_ttl() {
    case "${AUTH_CACHE_TTL:-}" in
        [1-5]s | [1-9]ms | [1-9][0-9]ms | [1-9][0-9][0-9]ms | [1-4][0-9][0-9][0-9]ms | 5000ms) ;;
        *)
            echo "docker-entrypoint: AUTH_CACHE_TTL: '${AUTH_CACHE_TTL:-}' is not 1s-5s (e.g. 2s, 1500ms)" >&2
            return 1
            ;;
    esac
}

# The per-installation secret nginx sends to the gate and the server, which refuse requests
# without it (scripts/mlflowstack/stacksecrets.py). Kept out of conf.d, so that
# "stackctl config render" never prints it; readable by nginx's user only (mode 0600).
render_proxy_secret() {
    secret_file=${PROXY_SECRET_FILE:-/var/lib/mlflow-stack/secrets/proxy-secret}
    secret=$(cat "$secret_file" 2>/dev/null || true)
    if ! printf '%s' "$secret" | grep -Eq '^[0-9a-f]{32,128}$'; then
        echo "docker-entrypoint: no proxy secret in $secret_file: the gate and the server will refuse every request" >&2
        secret=missing
    fi
    (
        umask 077
        # shellcheck disable=SC2016  # $pid is nginx's variable
        printf 'map $pid $stack_proxy_secret {\n    default "%s";\n}\n' "$secret" \
            > /etc/nginx/private/proxy-secret.conf
    )
}

# The serving profile's own secret (made by init when SERVE_MODELS is set): nginx sends it with
# every prediction, and the scoring processes refuse requests without it (server/serving.py).
# Missing (no serving): a value no scoring process accepts.
render_serving_secret() {
    secret=$(cat "${SERVING_SECRET_FILE:-/var/lib/mlflow-serving/serving-secret}" 2>/dev/null || true)
    if ! printf '%s' "$secret" | grep -Eq '^[0-9a-f]{64}$'; then
        secret=missing
    fi
    (
        umask 077
        # shellcheck disable=SC2016  # $pid is nginx's variable
        printf 'map $pid $serving_proxy_secret {\n    default "%s";\n}\n' "$secret" \
            > /etc/nginx/private/serving-secret.conf
    )
}

# nginx's size syntax: a number with an optional k or m (g is refused: bodies held in memory).
check_request_body_limit() {
    if ! printf '%s\n' "${REQUEST_BODY_LIMIT:-}" | grep -Eq '^[1-9][0-9]{0,8}[kKmM]?$'; then
        echo "docker-entrypoint: REQUEST_BODY_LIMIT: '${REQUEST_BODY_LIMIT:-}' is not a size such as 32m" >&2
        return 1
    fi
    if ! printf '%s\n' "${SERVING_BODY_LIMIT:-}" | grep -Eq '^[1-9][0-9]{0,8}[kKmM]?$'; then
        echo "docker-entrypoint: SERVING_BODY_LIMIT: '${SERVING_BODY_LIMIT:-}' is not a size such as 4m" >&2
        return 1
    fi
}

check_auth_cache_ttl
check_request_body_limit
check_serve_models
# The root file system is read-only: /etc/nginx/conf.d and /etc/nginx/private are tmpfs mounts
# (compose.yaml), and nginx's pid and temp files go to /tmp/nginx (nginx.conf).
mkdir -p /tmp/nginx
render_hosts_map > /etc/nginx/conf.d/00-hosts.conf
render_serving_map > /etc/nginx/conf.d/01-serving.conf
render_proxy_secret
render_serving_secret

# Only our variables are substituted, so nginx's own $variables survive.
# shellcheck disable=SC2016  # envsubst wants the names literally
variables='${SERVER_UPSTREAM} ${GATE_UPSTREAM} ${PROXY_TIMEOUT} ${AUTH_CACHE_TTL} ${REQUEST_BODY_LIMIT} ${SERVING_BODY_LIMIT}'
set +f  # the one glob of this script, over our own files
for template in /etc/nginx/templates/*.template; do
    target="/etc/nginx/conf.d/$(basename "$template" .template)"
    envsubst "$variables" < "$template" > "$target"
done

exec "$@"
