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

const hashes = require("crypto");

// Copied from the gate's answer onto ours, where auth_request_set reads them ($sent_http_*).
const RELAYED_HEADERS = ["X-Gate-User", "X-Gate-Reason", "WWW-Authenticate"];

function hmacKey() {
    const zone = ngx.shared.gate_secret;
    let key = zone.get("hmac");
    if (key === undefined) {
        const random = Buffer.from(crypto.getRandomValues(new Uint8Array(32)));
        // (crypto: the WebCrypto global.) add() keeps the first worker's key when two
        // workers race here.
        zone.add("hmac", random.toString("hex"));
        key = zone.get("hmac");
    }
    return key;
}

function verdictKey(r, authorization) {
    const digest = hashes.createHmac("sha256", hmacKey()).update(authorization).digest("base64");
    return `${digest} ${r.variables.request_method} ${r.variables.mlflow_path}`;
}

async function authorize(r) {
    const authorization = r.headersIn.Authorization;
    const key = authorization ? verdictKey(r, authorization) : null;
    if (key !== null) {
        const user = ngx.shared.gate_verdicts.get(key);
        if (user !== undefined) {
            r.headersOut["X-Gate-User"] = user;
            r.return(204);
            return;
        }
    }
    const reply = await r.subrequest("/_gate");
    // (njs has no for...of.)
    RELAYED_HEADERS.forEach((name) => {
        const value = reply.headersOut[name];
        if (value !== undefined) {
            r.headersOut[name] = value;
        }
    });
    if (key !== null && reply.status >= 200 && reply.status < 300) {
        ngx.shared.gate_verdicts.set(key, reply.headersOut["X-Gate-User"] || "-");
    }
    r.return(reply.status);
}

export default { authorize };
