// A short memory of the gate's "yes", inside nginx, in front of the gate.
//
// Why: MLflow clients send many tiny calls (one per log_metric). Asking the gate every time
// costs a round trip to a Python process, ~1.3 ms of CPU on a 2-core box, about a tenth of
// what MLflow itself spends on a log-metric. Remembered here, a repeated call costs nginx a
// hash and a shared-memory lookup instead.
//
// Contract, for auth_request (see templates/mlflow.conf.template):
// - the key is an HMAC of the Authorization header (a random key made once per nginx start,
//   so no password, nor anything that tests one offline without that key, is stored) plus
//   the method and the normalized path: the gate alone decides what a role may do, and its
//   answer is remembered only for the exact request it judged;
// - only 2xx answers are remembered, so a wrong password or a refused role always reaches
//   the gate (and costs its bcrypt check or role check every time);
// - an answer is remembered for at most the zone's timeout (AUTH_CACHE_TTL, default 2 s). The
//   gate sees a changed users file on its very next request, so a removed, disabled or
//   re-passworded user is refused within that timeout. The gate's own cache follows the file,
//   so an expiry here costs one gate round trip, never a bcrypt check.
//
// Contract of the nginx -> gate boundary (the other end: scripts/mlflowstack/forwarded.py):
// - nothing decoded and client-controlled goes into a header: the path goes to the gate
//   percent-encoded byte by byte (escapePath), so it cannot hold a control character, and the
//   site refuses a decoded path with one (400) before it gets here anyway;
// - every question carries a fresh random nonce, and an answer that does not echo it is not
//   an answer to this question (a desynchronised keep-alive connection to the gate): it is
//   logged and refused, never granted, never remembered.
//
// The access log's "verdict" (nginx.conf): the answer of /_auth carries X-Gate-Verdict, set
// here and never copied from the gate: "cached" (a remembered yes), "checked" (the gate said
// yes), "refused" (the gate said no: 401, or 403 for the role), "throttled" (the gate's 403
// "busy", which the site answers with 429), "error" (no usable answer: a missing nonce, or no
// gate to ask, which the site answers with 503).

const hashes = require("crypto");

// Copied from the gate's answer onto ours, where auth_request_set reads them ($sent_http_*).
const RELAYED_HEADERS = [
    "X-Gate-User", "X-Gate-Role", "X-Gate-Kind", "X-Gate-Needs", "X-Gate-Reason", "WWW-Authenticate",
];
// Who a remembered "yes" was for: the gate's X-Gate-User (percent-encoded, no spaces), role and
// credential kind, space-separated (none of them can hold a space).
const IDENTITY_HEADERS = ["X-Gate-User", "X-Gate-Role", "X-Gate-Kind"];

// Bytes that stand for themselves in an escaped path; must match forwarded.py.
const PATH_SAFE = /^[A-Za-z0-9\/._~-]$/;

function escapePath(raw) {
    let escaped = "";
    for (let i = 0; i < raw.length; i++) {
        const byte = raw[i];
        const ch = String.fromCharCode(byte);
        escaped += PATH_SAFE.test(ch) ? ch : "%" + (byte < 16 ? "0" : "") + byte.toString(16).toUpperCase();
    }
    return escaped;
}

function randomHex(bytes) {
    return Buffer.from(crypto.getRandomValues(new Uint8Array(bytes))).toString("hex");
}

function hmacKey() {
    const zone = ngx.shared.gate_secret;
    let key = zone.get("hmac");
    if (key === undefined) {
        // (crypto: the WebCrypto global.) add() keeps the first worker's key when two
        // workers race here.
        zone.add("hmac", randomHex(32));
        key = zone.get("hmac");
    }
    return key;
}

function verdictKey(r, authorization, path) {
    const digest = hashes.createHmac("sha256", hmacKey()).update(authorization).digest("base64");
    return `${digest} ${r.variables.request_method} ${path}`;
}

async function authorize(r) {
    const authorization = r.headersIn.Authorization;
    // $mlflow_path: the client request's normalized $uri, set in its location (this runs in
    // the auth_request subrequest, whose own $uri is /_auth).
    const path = escapePath(r.rawVariables.mlflow_path);
    const key = authorization ? verdictKey(r, authorization, path) : null;
    if (key !== null) {
        const remembered = ngx.shared.gate_verdicts.get(key);
        if (remembered !== undefined) {
            const identity = remembered.split(" ");
            IDENTITY_HEADERS.forEach((name, i) => {
                r.headersOut[name] = identity[i];
            });
            r.headersOut["X-Gate-Verdict"] = "cached";
            r.return(204);
            return;
        }
    }
    const nonce = randomHex(16);
    // Both are [0-9A-Za-z%/._~-] only, safe as they are in the subrequest's query string; the
    // /_gate location copies them into the gate's X-Gate-Nonce and X-Original-Path headers.
    const reply = await r.subrequest("/_gate", { args: `nonce=${nonce}&path=${path}` });
    if (reply.headersOut["X-Gate-Nonce"] !== nonce) {
        r.headersOut["X-Gate-Verdict"] = "error";
        if (reply.status === 502 || reply.status === 504) {
            // nginx could not reach the gate (stopped, restarting): refused like any "no",
            // marked so that the site answers 503 and Retry-After, which clients retry,
            // instead of the 500 that auth_request makes of anything but 2xx, 401 and 403.
            r.headersOut["X-Gate-Reason"] = "unavailable";
            r.return(403);
            return;
        }
        r.error(`gate answered ${reply.status} without this request's nonce; refused`);
        r.return(502);
        return;
    }
    // (njs has no for...of.)
    RELAYED_HEADERS.forEach((name) => {
        const value = reply.headersOut[name];
        if (value !== undefined) {
            r.headersOut[name] = value;
        }
    });
    const identity = IDENTITY_HEADERS.map((name) => reply.headersOut[name]);
    const complete = identity.every((value) => value && value.indexOf(" ") < 0);
    if (key !== null && reply.status >= 200 && reply.status < 300 && complete) {
        ngx.shared.gate_verdicts.set(key, identity.join(" "));
    }
    r.headersOut["X-Gate-Verdict"] = verdictOf(reply);
    r.return(reply.status);
}

// What the access log calls the gate's answer (see the top of this file).
function verdictOf(reply) {
    if (reply.status >= 200 && reply.status < 300) {
        return "checked";
    }
    if (reply.status === 403 && reply.headersOut["X-Gate-Reason"] === "busy") {
        return "throttled";
    }
    return reply.status === 401 || reply.status === 403 ? "refused" : "error";
}

export default { authorize };
