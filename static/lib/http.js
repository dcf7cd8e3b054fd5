/* influence dashboard: JSON over HTTP to this server's API. api() resolves with the parsed body
   or rejects with an Error whose message says why (and whose status is the HTTP status);
   guardedApi() is api() for the writes a team API key may guard. Exposed as window.influence.http. */
(function () {
  "use strict";

  var storage = window.influence.storage;

  function describe(status, body) {
    var detail = body && body.detail;
    if (Array.isArray(detail)) {
      detail = detail.map(function (d) { return d && d.msg ? d.msg : String(d); }).join("; ");
    }
    var text = detail || "the server answered HTTP " + status;
    if (status === 403) { return "not allowed to edit this audit (HTTP 403): " + text; }
    if (status === 404) { return "not found (HTTP 404): " + text; }
    return text + " (HTTP " + status + ")";
  }

  /* fetch JSON with an optional bearer token (an audit's edit token or the team key) */
  function api(method, path, body, token) {
    var headers = { "Accept": "application/json" };
    if (body !== undefined) { headers["Content-Type"] = "application/json"; }
    if (token) { headers.Authorization = "Bearer " + token; }
    return fetch(path, {
      method: method, headers: headers, credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body)
    }).then(function (response) {
      if (response.status === 204) { return null; }
      return response.json().catch(function () { return null; }).then(function (data) {
        if (!response.ok) {
          var err = new Error(describe(response.status, data));
          err.status = response.status;
          throw err;
        }
        return data;
      });
    }, function () { throw new Error("the dashboard server cannot be reached"); });
  }

  /* A write the server may guard with its team API key (creating an audit, starting a job):
     send the key this browser holds; when the server answers 403 asking for its key, ask the
     user once, keep the key in localStorage (never in a URL) and try again. */
  function guardedApi(method, path, body) {
    return api(method, path, body, storage.teamKey()).catch(function (err) {
      if (err.status !== 403 || err.message.indexOf("API key") < 0) { throw err; }
      var key = (window.prompt("This dashboard server needs its team API key for this " +
                               "(kept in this browser only):") || "").trim();
      if (!key) { throw err; }
      storage.setTeamKey(key);
      return api(method, path, body, key);
    });
  }

  window.influence.http = { api: api, guardedApi: guardedApi };
})();
