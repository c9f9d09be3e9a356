#!/bin/sh
# Render the site config, then run the command (nginx by default; "nginx -t" to check).
# Like nginx's official image: /etc/nginx/templates/*.template -> /etc/nginx/conf.d/*.conf.
# -f: settings are split into words below, and a word must never expand to file names
# (SERVE_MODELS="[x]roc/1" would become "proc/1" after its check).
set -euf
# What this script reads and writes (the rendered files still name /etc/nginx, where nginx
# finds them): another directory only for tests/unit/test_entrypoint_tls.py.
NGINX_DIR=${NGINX_DIR:-/etc/nginx}

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

# TLS_MODE: off (plain HTTP on 8080, as before), or self-signed / files (HTTPS on 8443 with
# the certificate `stackctl tls reload` put into the tls volume; plain HTTP only redirects).
# The two TLS modes differ in where the certificate comes from, not here.
TLS_PEM=${TLS_PEM:-/var/lib/mlflow-stack/tls/server.pem}
tls_on() {
    [ "${TLS_MODE:-off}" != off ]
}

check_tls() {
    case "${TLS_MODE:-off}" in
        off | self-signed | files) ;;
        *)
            echo "docker-entrypoint: TLS_MODE: '${TLS_MODE:-}' is not off, self-signed or files" >&2
            return 1
            ;;
    esac
    if ! printf '%s\n' "${HTTPS_PORT:-443}" | grep -Eq '^[1-9][0-9]{0,4}$'; then
        echo "docker-entrypoint: HTTPS_PORT: '${HTTPS_PORT:-}' is not a port number" >&2
        return 1
    fi
    # compose.tls.yaml publishes 8443 and mounts the tls volume; it says so with TLS_COMPOSE_FILE.
    if tls_on && [ -z "${TLS_COMPOSE_FILE:-}" ]; then
        echo "docker-entrypoint: TLS_MODE=${TLS_MODE} needs compose.tls.yaml (COMPOSE_FILE=compose.yaml:compose.tls.yaml in .env), which publishes HTTPS_PORT" >&2
        return 1
    fi
    if ! tls_on && [ -n "${TLS_COMPOSE_FILE:-}" ]; then
        echo "docker-entrypoint: compose.tls.yaml publishes HTTPS_PORT but TLS_MODE is off: set TLS_MODE, or drop compose.tls.yaml from COMPOSE_FILE" >&2
        return 1
    fi
    if tls_on && ! [ -r "$TLS_PEM" ]; then
        echo "docker-entrypoint: TLS_MODE=${TLS_MODE}: no certificate in the tls volume: run scripts/stackctl tls reload (after scripts/stackctl tls self-signed for self-signed)" >&2
        return 1
    fi
    # One line, and nginx still starts: a loopback-only or TLS-terminating setup is fine.
    if ! tls_on; then
        case "${BIND_ADDRESS:-}" in
            127.* | ::1 | '[::1]' | localhost | '') ;;
            *)
                echo "docker-entrypoint: warning: TLS_MODE=off and BIND_ADDRESS=${BIND_ADDRESS} is not loopback: passwords and tokens cross the network in the clear (README, HTTPS)" >&2
                ;;
        esac
    fi
}

# conf.d/site/listen.conf (the site server's listener, templates/mlflow.conf.template) and,
# with TLS on, the plain-HTTP redirect server and what its redirects may name: the host names
# of PUBLIC_HOSTNAME (already checked by render_hosts_map), ports dropped, or the self-signed
# certificate's names when it is empty; and the published HTTPS port.
render_tls() {
    mkdir -p "$NGINX_DIR/conf.d/site"
    if ! tls_on; then
        echo 'listen 8080 default_server;' > "$NGINX_DIR/conf.d/site/listen.conf"
        return 0
    fi
    printf 'listen 8443 ssl default_server;\ninclude /etc/nginx/tls/tls.conf;\n' \
        > "$NGINX_DIR/conf.d/site/listen.conf"
    # The serving profile fetches models from http://nginx:8080 on the backend network (no
    # certificate names "nginx"): that one name stays on the site over plain HTTP; every other
    # name on 8080 goes to the redirect server, the default there.
    if [ -n "$(serve_model_names)" ]; then
        printf 'listen 8080;\nserver_name nginx;\n' >> "$NGINX_DIR/conf.d/site/listen.conf"
    fi
    cp "$NGINX_DIR/tls/http-redirect.conf" "$NGINX_DIR/conf.d/02-http-redirect.conf"
    names=$(printf '%s' "${PUBLIC_HOSTNAME:-}" | tr ',' ' ')
    if [ -z "$(printf '%s' "$names" | tr -d ' ')" ]; then
        names='localhost 127.0.0.1'
    fi
    {
        # Keys carry a prefix: a bare "default" or "hostnames" is a map keyword.
        # shellcheck disable=SC2016  # $host is nginx's variable
        printf 'map host:$host $tls_redirect_host {\n    default "";\n'
        for entry in $names; do
            name=$(printf '%s' "$entry" | sed -E 's/:[0-9]+$//' | tr '[:upper:]' '[:lower:]')
            printf '    "host:%s" "%s";\n' "$name" "$name"
        done
        printf '}\n'
        port=":${HTTPS_PORT:-443}"
        [ "$port" = ":443" ] && port=''
        # shellcheck disable=SC2016  # $pid is nginx's variable
        printf 'map $pid $tls_redirect_port {\n    default "%s";\n}\n' "$port"
    } > "$NGINX_DIR/conf.d/02-tls-redirect-names.conf"
}

# PUBLIC_PATH ("/mlflow", empty for the root): the prefix the whole site answers under. It is
# written into location lines and a regex, so it is held to a shape that is literal in both:
# "/segment" parts of [A-Za-z0-9._~-] only, no "." or ".." segment, no "//", no trailing "/",
# and no leading "_" (nginx's internal locations, /_auth, /_artifact_files/..., start so).
check_public_path() {
    value=${PUBLIC_PATH:-}
    [ -z "$value" ] && return 0
    # grep judges line by line: a value of several lines must not pass on one good line.
    if [ "$(printf '%s' "$value" | wc -l)" -ne 0 ] \
        || ! printf '%s\n' "$value" | grep -Eq '^(/[A-Za-z0-9._~-]+){1,16}$' \
        || printf '%s\n' "$value" | grep -Eq '(^|/)\.\.?(/|$)|^/_' \
        || [ "${#value}" -gt 200 ]; then
        value=$(printf '%s' "$value" | tr -c '[:print:]' '?')
        echo "docker-entrypoint: PUBLIC_PATH: '$value' is not a path such as /mlflow (one leading /, no trailing /, segments of A-Z a-z 0-9 . _ ~ -, no . or .., not /_...)" >&2
        return 1
    fi
}

# The path the gate judges and MLflow routes: the request's normalized $uri without PUBLIC_PATH.
# The site's locations all start with PUBLIC_PATH and proxy_pass replaces that prefix (nginx
# re-escapes the rest), so MLflow receives exactly this; outside the prefix no location
# proxies at all (render_outside_prefix). Not matching (impossible inside those locations):
# empty, which the gate refuses as malformed (forwarded.py), so any slip fails closed.
render_public_path_map() {
    # shellcheck disable=SC2016  # nginx's variables
    if [ -z "${PUBLIC_PATH:-}" ]; then
        printf 'map $uri $public_path_rest {\n    default $uri;\n}\n'
    else
        printf 'map $uri $public_path_rest {\n    "~(?s)^%s(?<public_path_tail>/.*)$" $public_path_tail;\n    default "";\n}\n' \
            "$(public_path_regex)"
    fi
}

# PUBLIC_PATH as a regex: "." is the only character check_public_path lets through that PCRE
# does not take literally.
public_path_regex() {
    printf '%s' "${PUBLIC_PATH:-}" | sed 's/\./\\./g'
}

# conf.d/site/outside-prefix.conf, included by the site's server: with PUBLIC_PATH set, every
# path outside it gets nginx's own 404 without a login (it names nothing of MLflow's), and the
# prefix itself redirects to the prefix with "/" (relative, so the published port and scheme
# stay what the client used; the UI's links are relative to that page).
render_outside_prefix() {
    mkdir -p "$NGINX_DIR/conf.d/site"
    target="$NGINX_DIR/conf.d/site/outside-prefix.conf"
    if [ -z "${PUBLIC_PATH:-}" ]; then
        echo '# PUBLIC_PATH is empty: the site answers at the root.' > "$target"
        return 0
    fi
    printf 'location / {\n    return 404 "Not found\\n";\n}\nlocation = %s {\n    absolute_redirect off;\n    return 301 %s/;\n}\n' \
        "$PUBLIC_PATH" "$PUBLIC_PATH" > "$target"
}

# TRUSTED_PROXIES (comma- or space-separated addresses or CIDRs, empty by default): proxies in
# front of this nginx whose X-Forwarded-For is believed. Rendered at http level into the realip
# module's settings, so $remote_addr (the access log, the per-address connection limit, the
# gate's X-Client-Address and with it the login throttling) is the right-most address of the
# chain that is not a trusted proxy. Empty: nobody's X-Forwarded-For is read. Each entry is
# held to digits, hex, dots and colons with an optional prefix length before it is written.
check_trusted_proxies() {
    for entry in $(printf '%s' "${TRUSTED_PROXIES:-}" | tr ',' ' '); do
        if ! trusted_proxy_ok "$entry"; then
            entry=$(printf '%s' "$entry" | tr -c '[:print:]' '?')
            echo "docker-entrypoint: TRUSTED_PROXIES: '$entry' is not an address or CIDR (e.g. 10.0.0.0/8)" >&2
            return 1
        fi
    done
}

trusted_proxy_ok() {
    if printf '%s\n' "$1" | grep -Eq '^([0-9]{1,3}\.){3}[0-9]{1,3}(/[0-9]{1,2})?$'; then
        address=${1%%/*}
        bits=${1#"$address"}
        bits=${bits#/}
        for octet in $(printf '%s' "$address" | tr '.' ' '); do
            [ "$octet" -le 255 ] || return 1
        done
        # /8 at the widest (edgesettings.MIN_PREFIX): 0.0.0.0/0 would believe anyone.
        [ -z "$bits" ] || { [ "$bits" -le 32 ] && [ "$bits" -ge 8 ]; }
        return
    fi
    if printf '%s\n' "$1" | grep -Eq '^[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(/[0-9]{1,3})?$'; then
        bits=${1#*/}
        [ "$bits" = "$1" ] || { [ "$bits" -le 128 ] && [ "$bits" -ge 8 ]; }
        return
    fi
    return 1
}

render_real_ip() {
    entries=$(printf '%s' "${TRUSTED_PROXIES:-}" | tr ',' ' ')
    if [ -z "$(printf '%s' "$entries" | tr -d ' ')" ]; then
        echo '# TRUSTED_PROXIES is empty: no X-Forwarded-For is believed.'
        return 0
    fi
    echo 'real_ip_header X-Forwarded-For;'
    # The right-most address that is not a trusted proxy: what a client prepends is ignored.
    echo 'real_ip_recursive on;'
    for entry in $entries; do
        printf 'set_real_ip_from %s;\n' "$entry"
    done
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
            > "$NGINX_DIR/private/proxy-secret.conf"
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
            > "$NGINX_DIR/private/serving-secret.conf"
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

# Every setting this script writes into nginx's config, one printable line each: the checks
# below use grep, which judges line by line, so "4m<newline>anything" would pass on its first
# line and carry the rest into the config.
check_single_lines() {
    for name in PUBLIC_HOSTNAME SERVE_MODELS REQUEST_BODY_LIMIT SERVING_BODY_LIMIT AUTH_CACHE_TTL \
        PROXY_TIMEOUT TLS_MODE HTTPS_PORT PUBLIC_PATH TRUSTED_PROXIES SERVER_UPSTREAM GATE_UPSTREAM; do
        eval "value=\${$name:-}"
        if [ "$(printf '%s' "$value" | tr -d '[:print:]' | wc -c)" -ne 0 ]; then
            echo "docker-entrypoint: $name: holds a line break or another control character" >&2
            return 1
        fi
    done
}

# PROXY_TIMEOUT: how long nginx waits on the server and on a client's body (nginx's time).
check_proxy_timeout() {
    [ -z "${PROXY_TIMEOUT:-}" ] && return 0  # the image's ENV sets it; unset only in unit tests
    if ! printf '%s\n' "${PROXY_TIMEOUT:-}" | grep -Eq '^[1-9][0-9]{0,6}(ms|s|m|h)?$'; then
        echo "docker-entrypoint: PROXY_TIMEOUT: '${PROXY_TIMEOUT:-}' is not a time such as 3600s" >&2
        return 1
    fi
}

check_single_lines
check_proxy_timeout
check_auth_cache_ttl
check_request_body_limit
check_serve_models
check_tls
check_public_path
check_trusted_proxies
# The root file system is read-only: /etc/nginx/conf.d and /etc/nginx/private are tmpfs mounts
# (compose.yaml), and nginx's pid and temp files go to /tmp/nginx (nginx.conf).
mkdir -p /tmp/nginx
render_hosts_map > "$NGINX_DIR/conf.d/00-hosts.conf"
render_serving_map > "$NGINX_DIR/conf.d/01-serving.conf"
render_proxy_secret
render_serving_secret
render_tls
render_public_path_map > "$NGINX_DIR/conf.d/00-public-path.conf"
render_outside_prefix
render_real_ip > "$NGINX_DIR/conf.d/00-real-ip.conf"
PUBLIC_PATH=${PUBLIC_PATH:-}
PUBLIC_PATH_REGEX=$(public_path_regex)
export PUBLIC_PATH PUBLIC_PATH_REGEX

# Only our variables are substituted, so nginx's own $variables survive.
# shellcheck disable=SC2016  # envsubst wants the names literally
variables='${SERVER_UPSTREAM} ${GATE_UPSTREAM} ${PROXY_TIMEOUT} ${AUTH_CACHE_TTL} ${REQUEST_BODY_LIMIT} ${SERVING_BODY_LIMIT} ${PUBLIC_PATH} ${PUBLIC_PATH_REGEX}'
set +f  # the one glob of this script, over our own files
for template in "$NGINX_DIR"/templates/*.template; do
    target="$NGINX_DIR/conf.d/$(basename "$template" .template)"
    envsubst "$variables" < "$template" > "$target"
done

exec "$@"
