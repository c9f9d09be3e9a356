// nginx's refusals, worded so that whoever is refused learns why and what to do.
//
// Why: a bare "Forbidden" tells a viewer nothing, and the MLflow client and the UI show an
// error's text only when it comes in MLflow's own JSON shape ({"error_code", "message"}): the
// client raises it as its exception's message and the UI puts it in its error banner.
//
// Contract (js_set variables that the named locations of templates/mlflow.conf.template answer
// with, by "return": a refusal never reads the request body, which js_content would first
// buffer whole, to disk, for a client nobody has authenticated):
// - API paths (/api/, /ajax-api/, /graphql, /v1/, /serving/, /invocations: what clients, the
//   UI's scripts and prediction clients call) get
//   MLflow's JSON error shape; every other path (a page a browser opens) gets plain text, and
//   a misdirected request from a browser a small HTML page.
// - A message holds only what nginx or the gate wrote: the gate's percent-encoded user name
//   (printable ASCII without quotes or backslashes), a role and an access class from fixed
//   lists, the PUBLIC_HOSTNAME names (checked by the entrypoint). Nothing of the request's own
//   text is echoed, and whatever is shown is escaped for its format anyway.
// - Status codes and headers are kept: 401 keeps the gate's Basic challenge (browsers then
//   ask for a password), 429 keeps Retry-After and its slow trickle, 421 stays 421, and 413
//   names the limit (REQUEST_BODY_LIMIT). No gate to ask is a 503 with Retry-After.

const API_PATH = /^\/(api\/|ajax-api\/|graphql(\/|$)|v1\/|serving\/|invocations$)/;
// Predictions (the serving locations of the site template), which have a limit of their own.
const SERVING_PATH = /^\/(serving\/|invocations$)/;

// What each role may do, and the role a refused access class needs.
const ROLE_SCOPE = {
    viewer: "may read experiments, runs, models, traces and artifacts, but not change them",
    editor: "may read and change experiments, runs, models, traces and artifacts, " +
        "but not server-wide settings (webhooks, AI gateway, workspaces, jobs, the assistant)",
    admin: "may do everything",
};
const NEEDED_ROLE = {
    write: "This call changes data and needs the role 'editor' or 'admin'",
    admin: "This call concerns server-wide settings and needs the role 'admin'",
};

function isApi(r) {
    return API_PATH.test(r.variables.uri || "");
}

function contentType(r) {
    return isApi(r) ? "application/json" : "text/plain; charset=utf-8";
}

function body(r, errorCode, message) {
    return isApi(r) ? JSON.stringify({ error_code: errorCode, message: message }) + "\n"
        : message + "\n";
}

// njs cannot hand auth_request the gate's challenge header itself; relayed by hand.
function challenge(r) {
    return r.variables.gate_challenge || 'Basic realm="MLflow"';
}

function unauthorized(r) {
    return body(r, "UNAUTHENTICATED",
        "Authentication required: the user name and password (or API token) were missing " +
        "or not accepted. MLflow clients set MLFLOW_TRACKING_USERNAME and " +
        "MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN.");
}

function permissionMessage(user, kind, role, needs) {
    const who = kind === "token" ? `The API token '${user}'` : `User '${user}'`;
    const scope = ROLE_SCOPE[role];
    if (!scope) {
        return `Permission denied: ${who} may not make this call.`;
    }
    const needed = NEEDED_ROLE[needs] || "This call needs another role";
    // A token's role is fixed when it is made: an administrator makes another one.
    const ask = kind === "token" ? "ask an administrator for a token with that role " +
        "(scripts/stackctl token add NAME --role ROLE)" :
        "ask an administrator (scripts/stackctl user role)";
    return `Permission denied: ${who} has the role '${role}', which ${scope}. ${needed}; ` +
        `${ask}.`;
}

// The gate marks "too many bcrypt checks under way" as a 403 with a reason (auth_request
// passes only 401/403 through); @gate_refused makes it the 429 it really is, with
// Retry-After and a tarpit (the answer trickles out over seconds, so a client that ignores
// Retry-After, a password flood, sends a few requests per connection and second instead of
// hundreds, each of which costs the gate ~1 ms of CPU: scripts/benchmark, the flood cell).
function refused(r) {
    const v = r.variables;
    if (v.gate_reason === "busy") {
        return body(r, "RESOURCE_EXHAUSTED",
            "Too many login attempts from this address are in progress; retry in 1 second.");
    }
    if (v.gate_reason === "unavailable") {
        return body(r, "TEMPORARILY_UNAVAILABLE",
            "The login service of this MLflow is not answering, so nothing is let through; " +
            "retry in a few seconds. The operator sees why in 'docker compose ps auth' and " +
            "'docker compose logs auth'.");
    }
    return body(r, "PERMISSION_DENIED",
        permissionMessage(v.gate_user, v.gate_kind, v.gate_role, v.gate_needs));
}

// A body past REQUEST_BODY_LIMIT (JSON calls; artifact uploads have no limit) or
// SERVING_BODY_LIMIT (predictions).
function tooLarge(r) {
    if (SERVING_PATH.test(r.variables.uri || "")) {
        return body(r, "RESOURCE_LIMIT_EXCEEDED",
            "Request body too large: this server accepts at most " +
            `${r.variables.serving_body_limit} for a prediction (SERVING_BODY_LIMIT in .env); ` +
            "send fewer rows per request.");
    }
    return body(r, "RESOURCE_LIMIT_EXCEEDED",
        `Request body too large: this server accepts at most ${r.variables.body_limit} for ` +
        "MLflow's JSON calls (REQUEST_BODY_LIMIT in .env); artifact uploads have no limit.");
}

// The serving location could not reach the model's scoring process: the serve profile is
// not running, or the model has not loaded (yet). Never a hang: nginx finds out at once.
function servingUnavailable(r) {
    return body(r, "TEMPORARILY_UNAVAILABLE",
        "This model is not being served right now: the serve profile is not running, or the " +
        "model has not loaded yet. The operator sees why in 'docker compose logs serving'.");
}

function escapeHtml(text) {
    return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
        .replace(/"/g, "&quot;");
}

// A Host outside PUBLIC_HOSTNAME (DNS-rebinding defence): say which names this server answers
// to. They are the names colleagues type, not secrets.
function wantsHtml(r) {
    return (r.headersIn.Accept || "").indexOf("text/html") >= 0;
}

function misdirectedType(r) {
    return wantsHtml(r) ? "text/html; charset=utf-8" : "text/plain; charset=utf-8";
}

function misdirected(r) {
    const names = (r.variables.public_names || "").split(",").filter((name) => name);
    const listed = names.length ? names.join(", ") : "(none configured)";
    if (wantsHtml(r)) {
        const items = names.map((name) => `<li>${escapeHtml(name)}</li>`).join("");
        return "<!doctype html><html><head><meta charset=\"utf-8\">" +
            "<title>Wrong address for this MLflow</title></head><body>" +
            "<h1>Wrong address for this MLflow</h1>" +
            "<p>This server does not answer to the name in your address bar. " +
            "It answers to:</p><ul>" + items + "</ul></body></html>\n";
    }
    return "Misdirected request: this server answers only to these names: " + listed + "\n";
}

export default {
    contentType, challenge, unauthorized, refused, tooLarge, servingUnavailable,
    misdirectedType, misdirected,
};
