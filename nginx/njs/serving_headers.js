// The response headers of a served model's scorer: an allow-list (js_header_filter of the
// serving locations, imported by snippets/serving-proxy.conf).
//
// Why: a served model is code an editor registered, running in the scoring process, and its
// answers come from the stack's own address, where a browser is logged in. Any header it
// chose would act there: reporting endpoints (NEL, Report-To), HSTS, Alt-Svc, Accept-CH,
// Speculation-Rules, Permissions-Policy, CORP, a Content-Encoding that makes the browser
// decode the body, a second X-Content-Type-Options that voids nginx's nosniff, cache
// validators, Upgrade, Proxy-Authenticate, ... A deny-list always misses the next one.
//
// Contract:
// - Of the scorer's headers only Content-Length passes (the body's length; nginx frames the
//   body itself: chunked Transfer-Encoding, Connection and Keep-Alive are nginx's own, and the
//   upstream module never copies the scorer's).
// - Every other header the client sees is nginx's own: Date, Server (if any, no version), the
//   framing headers written by nginx's last header filter, and the add_header lines of the
//   serving locations (serving-proxy.conf and the site template: Content-Type forced per call,
//   X-Content-Type-Options nosniff, the sandboxing CSP, Cache-Control no-store,
//   X-Frame-Options, Referrer-Policy). njs is a dynamic module, loaded after nginx's static
//   ones, so its header filter runs before the headers filter that applies add_header: what
//   add_header adds is never deleted here, and what the scorer sent is gone before it runs.
// - The status passes unchanged (MLflow's 400 with its JSON message; error_page turns only
//   nginx's own 502/504 into the 503 of @serving_unavailable, a named location without this
//   filter).

// Lower-case names of the scorer's headers that pass.
const ALLOWED = { "content-length": true };

function filter(r) {
    const names = Object.keys(r.headersOut);
    for (let i = 0; i < names.length; i++) {
        if (ALLOWED[names[i].toLowerCase()] !== true) {
            delete r.headersOut[names[i]];
        }
    }
}

export default { filter };
